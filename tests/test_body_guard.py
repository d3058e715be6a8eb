"""
A request body is refused on its headers, before Twisted reads (and stores) it:
an over-limit Content-Length answers 413, a body without a valid key 401, and a
chunked body is cut off once it passes the limit.
"""

from __future__ import annotations

import socket

import pytest

from proxycache.testing import ProxyProcess

LIMIT = 64 * 1024
HUGE = 300 * 1024 * 1024
CHUNKED_TOTAL = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def guarded_proxy(module_llama, tmp_path_factory):
    proxy = ProxyProcess(
        tmp_path_factory.mktemp("guarded"), module_llama.url, api_keys="team-key", max_body_bytes=LIMIT
    ).start()
    yield proxy
    proxy.stop()


def _send_headers(port: int, headers: list[str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(15)  # without the guard the proxy waits for the body: the read times out
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: localhost", "Content-Type: application/json", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def test_over_limit_length_answers_413_before_any_body(guarded_proxy):
    sock = _send_headers(guarded_proxy.port, [f"Content-Length: {HUGE}", "Authorization: Bearer team-key"])
    with sock:
        reply = _read_all(sock)  # not one body byte was sent
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"body_too_large" in reply


def test_body_without_key_answers_401_before_any_body(guarded_proxy):
    sock = _send_headers(guarded_proxy.port, [f"Content-Length: {LIMIT}"])
    with sock:
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 401 ")
    assert b"invalid_api_key" in reply


def test_anthropic_clients_get_their_error_shape(guarded_proxy):
    sock = _send_headers(guarded_proxy.port, [f"Content-Length: {HUGE}", "anthropic-version: 2023-06-01"])
    with sock:
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b'"type": "error"' in reply


def test_chunked_body_is_cut_off_past_the_limit(guarded_proxy):
    sock = _send_headers(guarded_proxy.port, ["Transfer-Encoding: chunked", "Authorization: Bearer team-key"])
    chunk = b"x" * 8192
    sent = 0
    reply = b""
    with sock:
        try:
            while sent < CHUNKED_TOTAL:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                sock.setblocking(False)
                try:
                    reply += sock.recv(65536)
                except BlockingIOError:
                    pass
                sock.setblocking(True)
                if reply:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(15)
        try:
            reply += _read_all(sock)
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 413 ")
    # The proxy answered and closed long before the whole body went out (socket buffers hold a few MB).
    assert sent < CHUNKED_TOTAL // 2


def test_the_daemon_keeps_serving(guarded_proxy):
    completion = guarded_proxy.client(api_key="team-key").chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert completion.choices
