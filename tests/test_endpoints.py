"""Where the client connects for a backend's URL, in process (a memory reactor)."""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from proxycache.backend import UpstreamError, unreachable
from proxycache.backend._llama import LlamaServer


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def test_a_refused_connection_to_an_address_fails_at_once():
    # With HostnameEndpoint it failed only when its next-address timer fired, 0.3 s later:
    # every request to a dead backend waited that long before it went elsewhere.
    reactor = MemoryReactorClock()
    backend = LlamaServer.create(reactor, "http://127.0.0.1:8081", None, pool_size=2)
    failed: list[Failure] = []
    Deferred.fromCoroutine(backend.call("GET", "/props")).addErrback(failed.append)
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8081)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert failed and failed[0].check(UpstreamError) and unreachable(failed[0].value)


def test_a_host_name_is_still_resolved():
    reactor = MemoryReactorClock()
    backend = LlamaServer.create(reactor, "http://llama.internal:8081", None, pool_size=2)
    Deferred.fromCoroutine(backend.call("GET", "/props")).addErrback(lambda f: None)
    host, port, _, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8081)  # where the memory reactor's resolver says the name is


def test_https_is_still_spoken_over_tls():
    reactor = MemoryReactorClock()
    backend = LlamaServer.create(reactor, "https://127.0.0.1:8443", None, pool_size=2)
    Deferred.fromCoroutine(backend.call("GET", "/props")).addErrback(lambda f: None)
    _, port, factory, _, _ = reactor.tcpClients[0]
    transport = _TCPTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert port == 8443 and transport.value()[:1] == b"\x16"  # a TLS handshake record, not "GET /props"


def _sent(reactor: MemoryReactorClock) -> bytes:
    """What the backend's first connection was given to send, once connected."""
    _, _, factory, _, _ = reactor.tcpClients[0]
    transport = _TCPTransport()
    factory.buildProtocol(None).makeConnection(transport)
    return transport.value()


def test_a_generating_request_goes_out_whole_in_the_call_that_sends_it():
    # Its body is written with its headers, not on a later cooperator tick (treq's default
    # FileBodyProducer): nothing else runs on the reactor between the two on every request's way.
    reactor = MemoryReactorClock()
    backend = LlamaServer.create(reactor, "http://127.0.0.1:8081", "k", pool_size=2)
    backend.generate("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 1, 30.0)
    head, _, body = _sent(reactor).partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in head.split(b"\r\n")[1:])}
    assert headers[b"content-type"] == b"application/json" and headers[b"authorization"] == b"Bearer k"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert json.loads(body) == {
        "messages": [{"role": "user", "content": "hi"}], "id_slot": 1, "cache_prompt": True,
    }
