"""
A web page in a browser cannot drive the proxy: a foreign C{Origin} is refused
on every route, a rebound C{Host} on a loopback connection too, before the
body is read; curl, the SDKs and editors (no C{Origin}) are not affected.
In-process: the daemon's own L{Site} and request factory over a transport
(L{tests.fakes.InProcessDaemon}).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from tests.fakes import InProcessDaemon

CHAT = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}).encode()
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 8081)
LAN = IPv4Address("TCP", "192.168.1.20", 8081)


def request(method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def error_of(reply: bytes) -> dict[str, Any]:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


# Every kind of route: generating, the proxy's own, admin, passthrough.
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/responses", b'{"input": "hi"}'),
    ("POST", "/infill", b'{"input_prefix": "a", "input_suffix": "b"}'),
    ("GET", "/status", None),
    ("GET", "/metrics", None),
    ("GET", "/proxycache/backends", None),
    ("POST", "/tokenize", b'{"content": "x"}'),
    ("GET", "/v1/models", None),
]


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_a_foreign_origin_is_refused_on_every_route(method, path, body):
    proxy = InProcessDaemon()
    # A "simple" request: text/plain needs no preflight, so the browser sends it as it is.
    reply = proxy.send_raw(request(method, path, {
        "Host": "127.0.0.1:8081", "Origin": "https://evil.example", "Content-Type": "text/plain",
    }, body))
    assert status_of(reply) == 403
    assert error_of(reply)["error"]["code"] == "origin_not_allowed"
    assert proxy.backend.sent == []


def test_the_body_of_a_refused_request_is_not_read():
    proxy = InProcessDaemon()
    head = request("POST", "/v1/chat/completions", {
        "Host": "localhost:8081", "Origin": "null", "Content-Length": str(300 * 1024 * 1024),
    })
    reply = proxy.send_raw(head)  # not one byte of the body was sent: the answer comes on the headers
    assert status_of(reply) == 403
    assert b"Connection: close" in reply


def test_anthropic_clients_get_their_error_shape():
    reply = InProcessDaemon().send_raw(request("POST", "/v1/messages", {
        "Host": "localhost", "Origin": "https://evil.example", "anthropic-version": "2023-06-01",
    }, b"{}"))
    assert status_of(reply) == 403
    assert error_of(reply) == {"type": "error", "error": {"type": "permission_error", "message": error_of(reply)["error"]["message"]}}


def test_no_origin_is_let_in():
    proxy = InProcessDaemon()
    reply = proxy.send_raw(request("POST", "/v1/chat/completions", {"Host": "127.0.0.1:8081"}, CHAT))
    assert reply == b""  # waiting for the (fake) llama.cpp, which got it
    assert len(proxy.backend.sent) == 1
    assert status_of(proxy.send_raw(request("GET", "/status", {"Host": "localhost:8081"}))) == 200


@pytest.mark.parametrize("origins, origin", [
    (("https://app.example",), "https://app.example"),
    (("https://app.example/",), "https://APP.example"),
    (("*",), "https://anything.example"),
])
def test_allowed_origins_are_let_in(origins, origin):
    reply = InProcessDaemon(cors_origins=origins).send_raw(request("GET", "/status", {"Host": "localhost", "Origin": origin}))
    assert status_of(reply) == 200
    assert b"Access-Control-Allow-Origin: " + origin.encode() in reply


def test_the_proxys_own_page_is_same_origin():
    # The dashboard at http://localhost:8081/ (browsers send Origin on a same-origin POST).
    reply = InProcessDaemon().send_raw(request("GET", "/status", {"Host": "localhost:8081", "Origin": "http://localhost:8081"}))
    assert status_of(reply) == 200
    # A same-looking origin on another port is another site.
    reply = InProcessDaemon().send_raw(request("GET", "/status", {"Host": "localhost:8081", "Origin": "http://localhost:3000"}))
    assert status_of(reply) == 403


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8081", "localhost.evil.example", "10.0.0.5:8081"])
def test_a_rebound_host_is_refused_on_loopback(host):
    # DNS rebinding: the page's own name now points at 127.0.0.1; it is same-origin with itself.
    proxy = InProcessDaemon()
    reply = proxy.send_raw(request("POST", "/v1/chat/completions", {"Host": host, "Origin": f"http://{host}"}, CHAT))
    assert status_of(reply) == 403
    assert error_of(reply)["error"]["code"] == "host_not_allowed"
    reply = proxy.send_raw(request("GET", "/status", {"Host": host}))
    assert status_of(reply) == 403
    assert proxy.backend.sent == []


@pytest.mark.parametrize("host", ["localhost", "localhost:8081", "LOCALHOST.", "127.0.0.1:8081", "127.0.0.2",
                                  "[::1]:8081", "app.localhost:8081"])
def test_loopback_names_are_let_in(host):
    assert status_of(InProcessDaemon().send_raw(request("GET", "/status", {"Host": host}))) == 200


def test_allowed_hosts():
    proxy = InProcessDaemon(allowed_hosts=("proxy.internal",))
    assert status_of(proxy.send_raw(request("GET", "/status", {"Host": "proxy.internal:8081"}))) == 200
    assert status_of(proxy.send_raw(request("GET", "/status", {"Host": "other.internal"}))) == 403
    anything = InProcessDaemon(allowed_hosts=("*",))
    assert status_of(anything.send_raw(request("GET", "/status", {"Host": "other.internal"}))) == 200


@pytest.mark.parametrize("local", [LAN, IPv6Address("TCP", "fd00::5", 8081), UNIXAddress(b"/run/proxycache.sock")])
def test_host_is_not_checked_off_loopback(local):
    # A team server: its clients name it as they like; Origin still counts.
    proxy = InProcessDaemon()
    assert status_of(proxy.send_raw(request("GET", "/status", {"Host": "gpu-box.lan:8081"}), local)) == 200
    reply = proxy.send_raw(request("GET", "/status", {"Host": "gpu-box.lan:8081", "Origin": "https://evil.example"}), local)
    assert status_of(reply) == 403


def test_ipv6_loopback_connection_checks_host():
    reply = InProcessDaemon().send_raw(request("GET", "/status", {"Host": "evil.example"}), IPv6Address("TCP", "::1", 8081))
    assert status_of(reply) == 403


PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/status", "/tokenize"])
def test_a_preflight_never_needs_a_key(path):
    # Browsers send preflights without credentials: an allowed origin gets its allow headers whatever the keys...
    keyed = InProcessDaemon(api_keys=("k",), cors_origins=("https://app.example",))
    reply = keyed.send_raw(request("OPTIONS", path, {"Host": "localhost", "Origin": "https://app.example", **PREFLIGHT}))
    assert status_of(reply) == 204
    assert b"Access-Control-Allow-Origin: https://app.example" in reply
    # ...and any other, or none, a 403 without them: never a 401.
    for settings in ({"api_keys": ("k",)}, {"api_keys": ("k",), "cors_origins": ("https://app.example",)}):
        for headers in ({"Origin": "https://evil.example"}, {}):
            reply = InProcessDaemon(**settings).send_raw(request("OPTIONS", path, {"Host": "localhost", **headers, **PREFLIGHT}))
            assert status_of(reply) == 403, reply
            assert b"Access-Control-Allow" not in reply


def test_health_answers_probes_without_a_key():
    keyed = InProcessDaemon(api_keys=("k",))
    for path in ("/health", "/v1/health", "/proxycache/health"):
        assert status_of(keyed.send_raw(request("GET", path, {"Host": "localhost"}))) == 200, path
        assert status_of(keyed.send_raw(request("HEAD", path, {"Host": "localhost"}))) == 200, path
    assert status_of(keyed.send_raw(request("GET", "/status", {"Host": "localhost"}))) == 401
    assert status_of(keyed.send_raw(request("GET", "/v1/models", {"Host": "localhost"}))) == 401
    strict = InProcessDaemon(api_keys=("k",), health_requires_key=True)
    for path in ("/health", "/v1/health", "/proxycache/health"):
        assert status_of(strict.send_raw(request("GET", path, {"Host": "localhost"}))) == 401, path
        assert status_of(strict.send_raw(request("GET", path, {"Host": "localhost", "Authorization": "Bearer k"}))) == 200
