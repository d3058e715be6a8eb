"""A response body relayed to a client, in process: back-pressure and a client that takes nothing."""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxycache.backend import pipe_body


class _Response:
    """llama.cpp's response: its body's transport pauses and resumes like a TCP one."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(self.transport)


class _ClientConnection:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Client:
    """A request as the relay sees it: it pauses its producer while its connection is full."""

    channel = object()  # still connected

    def __init__(self) -> None:
        self.transport = _ClientConnection()
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def relay(stall_timeout: float | None) -> tuple[Clock, _Response, _Client]:
    clock, response, client = Clock(), _Response(), _Client()
    pipe_body(response, lambda data: None, clock, 300, client, stall_timeout).addErrback(lambda f: None)  # type: ignore
    return clock, response, client


def test_a_client_that_reads_again_in_time_is_kept():
    clock, response, client = relay(stall_timeout=5)
    client.producer.pauseProducing()
    assert response.transport.producerState == "paused"  # llama.cpp waits for the client
    clock.advance(4)
    client.producer.resumeProducing()
    clock.advance(10)
    assert response.transport.producerState == "producing" and not client.transport.aborted


def test_a_client_that_takes_nothing_for_the_stall_timeout_is_let_go():
    clock, response, client = relay(stall_timeout=5)
    client.producer.pauseProducing()
    clock.advance(5)
    assert client.transport.aborted  # as a hang-up: the request is cancelled, the slot freed


def test_without_a_stall_timeout_only_the_upstream_idle_timeout_applies():
    clock, response, client = relay(stall_timeout=None)
    client.producer.pauseProducing()
    clock.advance(299)
    assert not client.transport.aborted and response.transport.producerState == "paused"
