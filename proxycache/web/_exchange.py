"""
One client's generating request as the dispatcher serves it: the proxy's
headers, then llama.cpp's response relayed (streamed or whole).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.web.iweb import IRequest, IResponse

from proxycache import __version__
from proxycache.backend import UPSTREAM_FAILURES, StreamStalled, pipe_body, read_body
from proxycache.routing import Decision, carried_out
from proxycache.slots import Lease, Progress
from proxycache.web._apis import CHAT, Api
from proxycache.web._errors import ApiError

# Response headers worth relaying from llama.cpp; hop-by-hop ones are not.
RELAYED_HEADERS = (b"content-type", b"cache-control")


def no_buffering(request: IRequest) -> None:
    """A stream's headers: nothing on the way (caches, nginx) may hold its events back."""
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-accel-buffering", b"no")


def relay_headers(response: IResponse, request: IRequest) -> None:
    request.setResponseCode(response.code)
    for name in RELAYED_HEADERS:
        for value in response.headers.getRawHeaders(name, []):
            request.setHeader(name, value)


class UsageTap:
    """
    Fed every relayed chunk of a stream; keeps llama.cpp's cache counts from
    the C{data:} lines that carry them (merged: a Messages stream has its input
    counts at the start and its output count at the end), and whether the
    API's end marker went by.
    """

    END_MARKERS = (b"[DONE]", b'"type":"message_stop"', b'"type":"response.completed"')

    def __init__(self, counts: Callable[[Any], dict[str, Any]], markers: tuple[bytes, ...]) -> None:
        self.counts = counts
        self.markers = markers
        self._partial = b""
        self.timings: dict[str, Any] = {}
        self.done = False

    def feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if any(marker in payload for marker in self.END_MARKERS):
                self.done = True
            if not any(marker in payload for marker in self.markers):
                continue
            try:
                found = self.counts(json.loads(payload))
            except ValueError:
                continue
            self.timings.update(found)  # in place: the dispatcher holds on to this dict


class ClientExchange:
    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        idle_timeout: float,
        streaming: bool,
        backend_numbers: dict[str, int],
        api: Api = CHAT,
        client_stall_timeout: float | None = None,
    ) -> None:
        self.api = api
        self.request = request
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.client_stall_timeout = client_stall_timeout
        self.streaming = streaming
        self.backend_numbers = backend_numbers
        self.begun: tuple[Lease, Decision] | None = None  # the slot, and what was done before sending

    def begin(
        self, lease: Lease, decision: Decision, restored_tokens: int, path: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        self.begun = (lease, decision)
        plan = lease.plan
        save, restore = path
        save_wait = lease.save_waited  # queued only because slots were busy with background saves
        headers = {
            b"x-proxycache-slot": str(lease.slot.id.index),
            b"x-proxycache-backend": str(self.backend_numbers.get(lease.slot.id.backend, 0)),
            b"x-proxycache-decision": decision.value,
            b"x-proxycache-similarity": f"{plan.similarity:.3f}",
            b"x-proxycache-reused-blocks": str(plan.common_blocks),
            b"x-proxycache-restored-tokens": str(restored_tokens),
            b"x-proxycache-queue-wait-ms": f"{lease.waited * 1000:.0f}",
            # what saves and restores cost this request before llama.cpp got it (issue 24): the sum of the three
            b"x-proxycache-path-ms": f"{(save + restore + save_wait) * 1000:.0f}",
            b"x-proxycache-save-ms": f"{save * 1000:.0f}",
            b"x-proxycache-restore-ms": f"{restore * 1000:.0f}",
            b"x-proxycache-save-wait-ms": f"{save_wait * 1000:.0f}",  # also counted in queue-wait-ms
            b"x-proxycache-version": __version__,
        }
        for name, value in headers.items():
            self.request.setHeader(name, value.encode())

    async def deliver(self, response: IResponse, progress: Progress) -> None:
        relay_headers(response, self.request)
        if self.streaming and response.code == 200:
            await self._stream(response, progress)
        else:
            await self._whole(response, progress)

    async def _whole(self, response: IResponse, progress: Progress) -> None:
        try:
            raw = await read_body(response, self.clock, self.idle_timeout)
        except StreamStalled as e:
            raise ApiError(504, str(e), "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise ApiError(502, f"llama-server broke off the response: {e}", "server_error", "upstream_error")
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        timings = progress.timings = self.api.counts(decoded)
        if response.code != 200:
            status, raw = self.api.errors.convert(response.code, raw)
            self.request.setResponseCode(status)
        elif self.api.answer is not None and isinstance(decoded, dict):
            raw = json.dumps(self.api.answer(decoded), ensure_ascii=False).encode()
        if timings:
            self.request.setHeader(b"x-proxycache-cached-tokens", str(timings.get("cache_n", 0)).encode())
            self.request.setHeader(b"x-proxycache-prompt-tokens", str(timings.get("prompt_n", 0)).encode())
        if "cache_n" in timings and self.begun is not None:  # a whole answer's headers go with it: what was done
            lease, decision = self.begun
            cache_n, prompt_n = _tokens(timings, "cache_n"), _tokens(timings, "prompt_n")
            done = carried_out(decision, lease.plan, lease.request, cache_n, prompt_n)
            self.request.setHeader(b"x-proxycache-decision", done.value)
        self.request.write(raw)

    async def _stream(self, response: IResponse, progress: Progress) -> None:
        no_buffering(self.request)
        translator = self.api.stream() if self.api.stream is not None else None
        broken, tap = await self.pipe_stream(response, progress, translator.feed if translator is not None else None)
        # Headers are gone already: a stream that broke off or ended without its end marker ends with
        # an error event the SDKs understand.
        if broken is not None and (translator is None or not translator.ended):
            self.request.write(self.api.errors.stream_error(broken, tap.done))
        elif broken is None and translator is not None and not translator.ended:
            self.request.write(self.api.errors.stream_error("llama-server ended the stream early", tap.done))

    async def pipe_stream(
        self, response: IResponse, progress: Progress, rewrite: Callable[[bytes], bytes] | None
    ) -> tuple[str | None, UsageTap]:
        """
        Relay llama.cpp's stream to the client as it comes (through C{rewrite}),
        reading its usage and timings; returns why it broke off (or None) and the tap.
        """
        request = self.request
        tap = UsageTap(self.api.counts, self.api.markers)
        progress.timings = tap.timings
        started = False

        def relay(data: bytes) -> None:
            nonlocal started
            if not started:  # llama.cpp sends its headers before the prompt, its first event after it
                started = True
                progress.decoding()
            # Written in the same call as it arrives: the client's back-pressure pauses llama.cpp's stream.
            out = data if rewrite is None else rewrite(data)
            if out:
                request.write(out)
            tap.feed(data)

        try:
            await pipe_body(
                response, relay, self.clock, self.idle_timeout, IConsumer(request), self.client_stall_timeout
            )
        except UPSTREAM_FAILURES as e:
            progress.failed = True
            return f"llama-server broke off the stream: {e}", tap
        return None, tap


def _tokens(timings: dict[str, Any], name: str) -> int:
    value = timings.get(name)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0
