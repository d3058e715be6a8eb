"""
Who sent a request: the tenant the fair queue shares slots between.

The API key when keys are set (shown as C{key1}, C{key2}... in the order of
C{--api-keys}: never the key itself); otherwise the header the operator
names (C{--tenant-header}), else the body's own user field (OpenAI C{user},
Anthropic C{metadata.user_id}, Responses C{user} or C{safety_identifier});
otherwise the client's address.

Claude Code puts a new session id into C{metadata.user_id} at every start
(C{user_<device>_account_<uuid>_session_<uuid>}, or the same as a JSON
object): the person is the device and account, not the session, so one
developer's sessions share one tenant.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

from twisted.web.iweb import IRequest

from proxycache.web._auth import presented_key

MAX_LABEL = 48  # longer names (session ids, e-mail addresses) are shown as a hash
_SESSION_SUFFIX = re.compile(r"^(user_[0-9A-Za-z]+_account_[^_]*)_session_[^_]+$")


def _label(kind: str, value: str) -> str:
    value = value.strip()
    if len(value) <= MAX_LABEL and value.isprintable():
        return f"{kind}:{value}"
    return f"{kind}:#" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]


def _person(user_id: str) -> str:
    """A client's user id without the session it names (Claude Code's two forms)."""
    legacy = _SESSION_SUFFIX.match(user_id.strip())
    if legacy:
        return legacy.group(1)
    if user_id.lstrip().startswith("{"):
        try:
            named = json.loads(user_id)
        except ValueError:
            return user_id
        if isinstance(named, dict) and "session_id" in named:
            person = {k: v for k, v in named.items() if k in ("device_id", "account_uuid") and v}
            if person:
                return json.dumps(person, sort_keys=True)
    return user_id


def body_user(body: dict[str, Any]) -> str | None:
    """The user a client names in its own body, if any."""
    for field in ("user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str) and value.strip():
            return _person(value)
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        value = metadata.get("user_id")
        if isinstance(value, str) and value.strip():
            return _person(value)
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
