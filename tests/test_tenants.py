"""
Who a request belongs to (L{proxycache.web._tenant}): the fair queue's unit.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address

from proxycache.web._tenant import tenant_of


class FakeRequest:
    def __init__(self, headers: dict[bytes, bytes] | None = None, host: str = "10.0.0.7") -> None:
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.host = host

    def getHeader(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, 40000)


def test_api_key_is_the_tenant_shown_by_its_number_never_itself():
    keys = ("sk-alpha", "sk-beta")
    bearer = FakeRequest({b"Authorization": b"Bearer sk-beta"})
    assert tenant_of(bearer, {"user": "alice"}, keys, None) == "key2"
    anthropic = FakeRequest({b"X-Api-Key": b"sk-alpha"})
    assert tenant_of(anthropic, {}, keys, "X-User") == "key1"


def test_without_keys_the_operators_header_then_the_body_user_then_the_address():
    assert tenant_of(FakeRequest({b"X-User": b"bob"}), {"user": "alice"}, (), "X-User") == "user:bob"
    assert tenant_of(FakeRequest(), {"user": "alice"}, (), "X-User") == "user:alice"
    assert tenant_of(FakeRequest(), {"metadata": {"user_id": "carol"}}, (), None) == "user:carol"
    assert tenant_of(FakeRequest(), {"safety_identifier": "dave"}, (), None) == "user:dave"
    assert tenant_of(FakeRequest(host="10.1.2.3"), {"user": ""}, (), None) == "ip:10.1.2.3"


def test_long_user_ids_are_shown_as_a_stable_hash():
    session = "user_" + "ab" * 32 + "_account__session_" + "0" * 36
    label = tenant_of(FakeRequest(), {"metadata": {"user_id": session}}, (), None)
    assert label.startswith("user:#") and len(label) < 24 and "ab" * 8 not in label
    assert label == tenant_of(FakeRequest(host="10.9.9.9"), {"metadata": {"user_id": session}}, (), None)
