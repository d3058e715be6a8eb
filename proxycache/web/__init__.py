"""
The HTTP layer: routes, auth, errors, passthrough and pages.  It parses,
calls the dispatcher and writes; it decides nothing about slots.
"""

from proxycache.web._app import Proxy
from proxycache.web._body import BodyReader
from proxycache.web._errors import ApiError
from proxycache.web._guard import GuardedRequest, GuardedRequests, guarded_site

__all__ = ["ApiError", "BodyReader", "GuardedRequest", "GuardedRequests", "Proxy", "guarded_site"]
