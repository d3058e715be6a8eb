"""
Client API keys, checked in constant time.
"""

from __future__ import annotations

import hmac

from twisted.web.iweb import IRequest

from proxycache.web._errors import ApiError


def presented_key(request: IRequest) -> bytes:
    """The key a client sent: C{Authorization: Bearer KEY}, or C{X-Api-Key: KEY} (Anthropic's clients)."""
    header = request.getHeader(b"authorization") or b""
    scheme, _, token = header.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return (request.getHeader(b"x-api-key") or b"").strip()


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
