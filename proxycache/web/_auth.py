"""
Client API keys, checked in constant time.
"""

from __future__ import annotations

import hmac

from twisted.web.iweb import IRequest

from proxycache.web._errors import ApiError


def presented_key(request: IRequest) -> bytes:
    """The key a client sent: C{Authorization: Bearer KEY}."""
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def authorize(request: IRequest, keys: tuple[str, ...]) -> None:
    """
    @raise ApiError: 401 when keys are set and the request holds none of them.
    """
    if not keys:
        return
    presented = presented_key(request)
    # Compare against every key so the time taken does not tell which matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise ApiError(
            401, "missing or invalid API key", "invalid_request_error", "invalid_api_key",
            (("WWW-Authenticate", "Bearer"),),
        )
