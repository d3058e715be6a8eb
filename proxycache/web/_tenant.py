"""
Who sent a request: the tenant the fair queue shares slots between.

The API key when keys are set (shown as C{key1}, C{key2}... in the order of
C{--api-keys}: never the key itself); otherwise the header the operator
names (C{--tenant-header}), else the body's own user field (OpenAI C{user},
Anthropic C{metadata.user_id}, Responses C{user} or C{safety_identifier});
otherwise the client's address.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.web.iweb import IRequest

from proxycache.web._auth import presented_key

MAX_LABEL = 48  # longer names (session ids, e-mail addresses) are shown as a hash


def _label(kind: str, value: str) -> str:
    value = value.strip()
    if len(value) <= MAX_LABEL and value.isprintable():
        return f"{kind}:{value}"
    return f"{kind}:#" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]


def body_user(body: dict[str, Any]) -> str | None:
    """The user a client names in its own body, if any."""
    for field in ("user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str) and value.strip():
            return value
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        value = metadata.get("user_id")
        if isinstance(value, str) and value.strip():
            return value
    return None


def tenant_of(request: IRequest, body: dict[str, Any], keys: tuple[str, ...], header: str | None) -> str:
    """The tenant label of an authorized request (C{body} as the client sent it)."""
    if keys:
        presented = presented_key(request)
        for number, key in enumerate(keys, 1):
            if hmac.compare_digest(presented, key.encode()):
                return f"key{number}"
    if header:
        named = request.getHeader(header.encode("latin-1"))
        if named is not None and named.strip():
            return _label("user", named.decode("utf-8", "replace"))
    user = body_user(body)
    if user is not None:
        return _label("user", user)
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"ip:{host}" if host else "local"
