"""
CORS for browser clients, from an allow-list of origins (C{--cors-origins}).

An allowed C{Origin} is echoed back on every answer.  A preflight (C{OPTIONS}
with C{Access-Control-Request-Method}) is answered here, before auth and
whatever keys are set, as browsers never send credentials with one: 204 with
the allow headers for an allowed origin, 403 without them for any other.
Requests from origins not allowed are refused on their headers before they
get here (L{proxycache.web._browsers}).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from proxycache.web._browsers import BrowserPolicy, forbidden
from proxycache.web._shapes import ErrorShape

ALLOWED_METHODS = b"GET, HEAD, POST, OPTIONS"
EXPOSED_HEADERS = b"x-proxycache-decision, x-proxycache-slot, x-proxycache-cached-tokens, x-proxycache-prompt-tokens"
MAX_AGE = b"600"


class CorsResource(Resource):
    isLeaf = True

    def __init__(self, wrapped: Any, origins: tuple[str, ...], shape_of: Callable[[str], ErrorShape]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.policy = BrowserPolicy(origins)
        self.shape_of = shape_of  # the error shape of a path's API

    def allowed(self, origin: bytes | None) -> bool:
        return origin is not None and self.policy.origin_allowed(origin.decode("latin-1"))

    def render(self, request: IRequest) -> Any:
        origin = request.getHeader(b"origin")
        preflight = request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method")
        if self.allowed(origin):
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")
            request.setHeader(b"access-control-expose-headers", EXPOSED_HEADERS)
            if preflight:
                request.setResponseCode(204)
                request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
                asked = request.getHeader(b"access-control-request-headers")
                request.setHeader(b"access-control-allow-headers", asked or b"authorization, content-type")
                request.setHeader(b"access-control-max-age", MAX_AGE)
                return b""
        elif preflight:
            error = forbidden("this origin may not call proxycache from a web page (see --cors-origins)",
                              "origin_not_allowed")
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"application/json")
            return self.shape_of(request.path.decode("utf-8", "replace")).body(error)
        return self.wrapped.render(request)
