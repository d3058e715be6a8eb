"""
Several choices (C{n} > 1) streamed: each choice is served through the
dispatcher after the one before (reusing the prompt it left in the slot), and
its chunks are relayed as they arrive, numbered with the choice's C{index},
under the first choice's C{id}.  One C{data: [DONE]} ends the whole stream.

With C{stream_options.include_usage}, llama.cpp reports each choice's usage;
those reports are held back and sent once, summed, just before the C{[DONE]}.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest, IResponse
from twisted.web.server import Request as HTTPRequest

from proxycache.backend import UPSTREAM_FAILURES, read_body
from proxycache.routing import Decision
from proxycache.slots import Lease, Progress
from proxycache.web._apis import Api
from proxycache.web._errors import ApiError
from proxycache.web._exchange import ClientExchange, no_buffering, relay_headers
from proxycache.web._fanout import for_choice, one_choice, summed_usage

if TYPE_CHECKING:
    from proxycache.web._app import Proxy

log = Logger()

DONE = b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class ChoiceStream:
    """What the choices of one client stream share: its id, and the usage held back."""

    def __init__(self, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.id: Any = None
        self.usages: list[dict[str, Any]] = []
        self.usage_chunk: dict[str, Any] | None = None  # the first usage report, sent summed at the end

    def end(self) -> bytes:
        if self.usage_chunk is None:
            return DONE
        return _event(dict(self.usage_chunk, choices=[], usage=summed_usage(self.usages))) + DONE


class ChoiceRelay:
    """One choice's stream, rewritten event by event as its bytes come (llama.cpp sends C{data: ...\\n\\n})."""

    def __init__(self, stream: ChoiceStream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.ended = False  # its [DONE] went by
        self.errored = False  # llama.cpp sent an error event, relayed as it was
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        events = (self._partial + data).split(b"\n\n")
        self._partial = events.pop()
        return b"".join(self._rewrite(event) for event in events)

    def _rewrite(self, event: bytes) -> bytes:
        as_is = event + b"\n\n"
        if not event.startswith(b"data:"):
            return as_is
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self.ended = True
            return b""  # one [DONE] for the whole stream, after the last choice
        try:
            chunk = json.loads(payload)
        except ValueError:
            return as_is
        if not isinstance(chunk, dict):
            return as_is
        if "error" in chunk:
            self.errored = True
            return as_is
        stream, changed = self.stream, False
        if "id" in chunk:
            if stream.id is None:
                stream.id = chunk["id"]
            elif chunk["id"] != stream.id:
                chunk["id"], changed = stream.id, True
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index") != self.index:
                choice["index"], changed = self.index, True
        if stream.include_usage and isinstance(chunk.get("usage"), dict):
            stream.usages.append(chunk.pop("usage"))
            changed = True
            if stream.usage_chunk is None:
                stream.usage_chunk = chunk
            if not choices:  # a usage-only chunk: the summed one replaces it
                return b""
        return _event(chunk) if changed else as_is  # the first choice's bytes stay untouched


class StreamedChoiceExchange(ClientExchange):
    """
    Relays one choice of a stream; only the first sets the response's status
    and headers.  A failure is kept in C{error} for the caller to end the stream with.
    """

    def __init__(self, request: IRequest, clock: IReactorTime, idle_timeout: float, backend_numbers: dict[str, int],
                 api: Api, relay: ChoiceRelay, client_stall_timeout: float | None = None) -> None:
        super().__init__(request, clock, idle_timeout, True, backend_numbers, api, client_stall_timeout)
        self.relay = relay
        self.first = relay.index == 0
        self.error: str | None = None
        self.answered = False  # the first choice's error answer was relayed whole: nothing more to send

    def begin(
        self, lease: Lease, decision: Decision, restored_tokens: int, path: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        if self.first:
            super().begin(lease, decision, restored_tokens, path)

    async def deliver(self, response: IResponse, progress: Progress) -> None:
        if response.code != 200:
            if self.first:  # nothing sent yet: the client gets llama.cpp's answer as it is
                self.answered = True
                await super().deliver(response, progress)
            else:
                self.error = await self._refusal(response)
            return
        if self.first:
            relay_headers(response, self.request)
            no_buffering(self.request)
        broken, _ = await self.pipe_stream(response, progress, self.relay.feed)
        if broken is not None:
            self.error = broken
            return
        if not self.relay.ended and not self.relay.errored:
            self.error = "llama-server ended the stream early"

    async def _refusal(self, response: IResponse) -> str:
        try:
            raw = await read_body(response, self.clock, self.idle_timeout)
            message = json.loads(raw)["error"]["message"]
        except UPSTREAM_FAILURES as e:
            message = f"broken off: {e}"
        except (ValueError, KeyError, TypeError):
            message = "no error message"
        return f"llama-server answered {response.code}: {message}"


async def stream_choices(
    proxy: "Proxy", request: HTTPRequest, api: Api, route: str, body: dict[str, Any], count: int
) -> bytes:
    """Serve C{count} choices of C{body} one after another, as one stream."""
    wanted, upstream, single = one_choice(proxy, request, api, route, body)
    options = body.get("stream_options")
    stream = ChoiceStream(isinstance(options, dict) and options.get("include_usage") is True)
    # A client hanging up cancels this coroutine (Klein cancels on notifyFinish), stopping the choice in
    # flight; no further choice is dispatched for it even if an await ever swallows that cancellation.
    gone: list[Failure] = []
    request.notifyFinish().addErrback(gone.append)
    for index in range(count):
        if gone:
            return b""
        exchange = StreamedChoiceExchange(
            request, proxy.clock, proxy.config.stream_idle_timeout, proxy.backend_numbers, api,
            ChoiceRelay(stream, index), proxy.config.client_stall_timeout,
        )
        try:
            await proxy.dispatch(wanted, upstream, for_choice(single, index), exchange)
        except ApiError as e:
            if index == 0:  # nothing sent yet: answered as an error
                raise
            exchange.error = e.message
        if exchange.answered:
            return b""
        if exchange.error is not None:
            # The stream's headers are gone: end it with an error event the SDKs understand.
            log.warn("choice {index} of {count} failed: {error}", index=index, count=count, error=exchange.error)
            request.write(api.errors.stream_error(f"choice {index} of {count}: {exchange.error}", False))
            return b""
        if exchange.relay.errored:  # llama.cpp's own error event went through
            request.write(DONE)
            return b""
    request.write(stream.end())
    return b""
