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


def test_one_developers_claude_code_sessions_are_one_tenant():
    def of(user_id: str) -> str:
        return tenant_of(FakeRequest(), {"metadata": {"user_id": user_id}}, (), None)

    device, other_device = "ab" * 32, "cd" * 32
    legacy = "user_{}_account_{}_session_{}"
    first = of(legacy.format(device, "", "0" * 36))
    assert first == of(legacy.format(device, "", "1" * 36))
    assert first != of(legacy.format(other_device, "", "0" * 36))
    # the same id forwarded as OpenAI's user field (litellm and other gateways do)
    assert first == tenant_of(FakeRequest(), {"user": legacy.format(device, "", "9" * 36)}, (), None)
    with_account = of(legacy.format(device, "5" * 36, "0" * 36))
    assert with_account == of(legacy.format(device, "5" * 36, "2" * 36)) != first

    as_json = '{{"device_id": "{}", "account_uuid": "", "session_id": "{}"}}'
    newer = of(as_json.format(device, "3" * 36))
    assert newer == of(as_json.format(device, "4" * 36))
    assert newer != of(as_json.format(other_device, "3" * 36))
    assert of('{"session_id": "x"}') != of('{"session_id": "y"}')  # nobody named: the id as sent
    assert of("alice_session_1") != of("alice_session_2")  # not Claude Code's form
