"""
CORS for browser clients, from an allow-list of origins (C{--cors-origins}).

An allowed C{Origin} is echoed back on every answer; a preflight
(C{OPTIONS} with C{Access-Control-Request-Method}) is answered here, before
auth, as browsers send it without credentials.  With no list, no CORS header
is ever sent and preflights fall through to the routes (which refuse them).
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

ALLOWED_METHODS = b"GET, HEAD, POST, OPTIONS"
EXPOSED_HEADERS = b"x-proxycache-decision, x-proxycache-slot, x-proxycache-cached-tokens, x-proxycache-prompt-tokens"
MAX_AGE = b"600"


class CorsResource(Resource):
    isLeaf = True

    def __init__(self, wrapped: Any, origins: tuple[str, ...]) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.origins = frozenset(o.rstrip("/") for o in origins)

    def allowed(self, origin: bytes | None) -> bool:
        if not origin or not self.origins:
            return False
        return "*" in self.origins or origin.decode("latin-1").rstrip("/") in self.origins

    def render(self, request: IRequest) -> Any:
        origin = request.getHeader(b"origin")
        if self.allowed(origin):
            request.setHeader(b"access-control-allow-origin", origin)
            request.setHeader(b"vary", b"Origin")
            request.setHeader(b"access-control-expose-headers", EXPOSED_HEADERS)
            if request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
                request.setResponseCode(204)
                request.setHeader(b"access-control-allow-methods", ALLOWED_METHODS)
                asked = request.getHeader(b"access-control-request-headers")
                request.setHeader(b"access-control-allow-headers", asked or b"authorization, content-type")
                request.setHeader(b"access-control-max-age", MAX_AGE)
                return b""
        return self.wrapped.render(request)
