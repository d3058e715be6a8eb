"""
The HTTP face of the proxy: OpenAI Chat Completions through the scheduler,
a few llama.cpp endpoints passed through, errors as OpenAI error JSON.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from proxycache import __version__
from proxycache.config import Config
from proxycache.errors import ApiError, error_body, upstream_unavailable
from proxycache.fingerprint import fingerprint
from proxycache.planner import Decision, Request, fell_short, is_small, reused_unplanned
from proxycache.scheduler import Lease, Outcome, QueueFull, Scheduler
from proxycache.sse import TimingsTap, timings_of
from proxycache.upstream import (
    UPSTREAM_FAILURES,
    Backend,
    StreamStalled,
    pipe_body,
    read_body,
)
from proxycache.validate import check_chat_request, parse_json_object

log = Logger()

_DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"

# llama.cpp endpoints clients may use directly. Generating ones go through the
# scheduler like chat, so they cannot land on (and overwrite) a hot slot.
PASSTHROUGH_GET = frozenset({"/v1/models", "/models", "/health", "/props"})
PASSTHROUGH_POST = frozenset(
    {"/v1/embeddings", "/embeddings", "/embedding", "/tokenize", "/detokenize", "/apply-template"}
)
SCHEDULED_COMPLETIONS = frozenset({"/v1/completions", "/completions", "/completion"})
OWN_ROUTES = frozenset(
    {"/v1/chat/completions", "/chat/completions", "/metrics", "/status", "/proxycache/health", "/dashboard"}
)
# Response headers worth relaying from llama.cpp; hop-by-hop ones are not.
RELAYED_HEADERS = (b"content-type", b"cache-control")


class SlotPreparer:
    """
    Hooks around a leased request; the disk tier replaces this.

    C{prepare} runs with the slot's lock held, before the request is sent:
    this is where an evicted hot slot is saved and a saved cache restored.
    """

    async def prepare(self, lease: Lease) -> Decision:
        """Returns the decision actually carried out (a failed restore is a miss)."""
        return lease.plan.decision

    def released(self, lease: Lease, outcome: Outcome) -> None:
        return None

    def settling(self, lease: Lease) -> Deferred | None:
        """Preparation still running after its request ended (cancelled): release after it."""
        return None

    def restored_tokens(self, lease: Lease) -> int:
        """Tokens loaded from disk into the slot for this request."""
        return 0


@attrs.define(eq=False)
class _Progress:
    answered: bool = False  # llama.cpp sent response headers: the prompt was processed
    status: int = 0
    decision: Decision | None = None
    # llama.cpp's timings as soon as they pass by: a client that hangs up right
    # after the last event must not cost us the truth about the slot.
    timings: dict[str, Any] = attrs.Factory(dict)


@attrs.frozen
class RequestRecord:
    """One finished request, as logs, metrics and the status page see it."""

    at: float
    decision: Decision
    slot: str
    status: int  # 0: no response from llama-server
    similarity: float
    blocks: int
    cache_n: int
    prompt_n: int
    predicted_n: int
    prompt_ms: float
    waited: float
    seconds: float


def _json_response(request: IRequest, status: int, body: bytes) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


class Proxy:
    app = Klein()

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        backends: list[Backend],
        scheduler: Scheduler,
        preparer: SlotPreparer | None = None,
        observers: list[Any] | None = None,
        stats: Any = None,
        health: Any = None,
        on_stale: Any = None,
        context_limit: Any = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.backends = {b.name: b for b in backends}
        self.backend_numbers = {b.name: i for i, b in enumerate(backends)}
        self.scheduler = scheduler
        self.preparer = preparer or SlotPreparer()
        self.observers = observers or []  # each called with every RequestRecord
        self.stats = stats  # proxycache.stats.Stats: /metrics, /status
        self.health = health  # callable -> (ok, details): /proxycache/health
        self.on_stale = on_stale or (lambda slot_id: None)  # the slot map looks wrong: look again
        self.context_limit = context_limit or (lambda: None)  # tokens a slot holds, once known
        self.draining = False
        self._noticed_ram_cache: set[str] = set()
        self._in_flight: set[IRequest] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def resource(self):
        return self.app.resource()

    # -- errors and auth ----------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure) -> bytes:
        error: ApiError = failure.value
        for name, value in error.headers:
            request.setHeader(name.encode(), value.encode())
        return _json_response(request, error.status, error.body())

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure) -> bytes:
        log.failure("unexpected error on {path}", failure, path=request.path)
        return _json_response(request, 500, error_body("internal error in proxycache", "server_error", "internal_error"))

    def _authorize(self, request: IRequest) -> None:
        if not self.config.api_keys:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        presented = token.strip() if scheme.lower() == b"bearer" else b""
        # Compare against every key so the time taken does not tell which matched.
        matched = False
        for key in self.config.api_keys:
            matched |= hmac.compare_digest(presented, key.encode())
        if not matched:
            raise ApiError(
                401, "missing or invalid API key", "invalid_request_error", "invalid_api_key",
                (("WWW-Authenticate", "Bearer"),),
            )

    def _read_body(self, request: IRequest) -> bytes:
        length = request.getHeader(b"content-length")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", "invalid_request_error", "body_too_large")
        body = request.content.read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", "invalid_request_error", "body_too_large")
        return body

    def _json_body(self, request: IRequest) -> dict[str, Any]:
        content_type = (request.getHeader(b"content-type") or b"application/json").lower()
        if not content_type.split(b";")[0].strip() in (b"application/json", b""):
            raise ApiError(415, "Content-Type must be application/json", "invalid_request_error", "unsupported_media_type")
        return parse_json_object(self._read_body(request))

    # -- chat ---------------------------------------------------------------

    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/chat/completions", methods=["POST"])
    async def chat_completions(self, request: IRequest) -> bytes:
        self._authorize(request)
        body = self._json_body(request)
        check_chat_request(body, self.context_limit())
        return await self._generate(request, body, "/v1/chat/completions", body)

    @app.route("/v1/completions", methods=["POST"])
    @app.route("/completions", methods=["POST"])
    @app.route("/completion", methods=["POST"])
    async def completions(self, request: IRequest) -> bytes:
        self._authorize(request)
        body = self._json_body(request)
        if "id_slot" in body:
            raise ApiError(400, "'id_slot' is chosen by the proxy and cannot be set by clients", code="slot_not_allowed")
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        shape = {"messages": [{"role": "prompt", "content": text}]}
        return await self._generate(request, body, request.path.decode(), shape)

    async def _generate(
        self, request: IRequest, body: dict[str, Any], path: str, shape: dict[str, Any]
    ) -> bytes:
        fp = fingerprint(shape, self.config.block_words)
        config = self.config
        if config.log_prompts:  # off by default: prompts are private on a shared box
            messages = shape.get("messages") or [{}]
            last = messages[-1] if isinstance(messages[-1], dict) else {}
            log.info("prompt ({words} words) ends with: {text!r}", words=fp.words, text=str(last.get("content"))[-200:])
        wanted = Request(
            fp,
            is_small(fp, config.min_prefix_chars, config.min_prefix_words, config.min_prefix_blocks),
            pinned=(request.getHeader(b"x-proxycache-pin") or b"").lower() in (b"1", b"true", b"yes"),
        )
        if self.draining:
            raise ApiError(503, "proxycache is shutting down", "server_error", "shutting_down", (("Retry-After", "10"),))
        if not self.scheduler.slots:
            raise upstream_unavailable("no slots known yet (is llama-server up?)")
        # In flight until the response is finished (or the client gone), not
        # merely until this handler returns: a drain must not cut the last bytes.
        self._in_flight.add(request)
        request.notifyFinish().addBoth(lambda _: self._finished(request))
        return await self._leased(request, body, path, wanted)

    def _finished(self, request: IRequest) -> None:
        self._in_flight.discard(request)
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def drain(self, grace: float) -> int:
        """
        Refuse new generations and wait up to C{grace} seconds for those in
        flight (queued ones included) to be answered.  Returns how many were
        still running.
        """
        self.draining = True
        if self._in_flight:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            idle.addTimeout(grace, self.clock).addErrback(lambda f: f.trap(TimeoutError))
            await idle
        return len(self._in_flight)

    async def _leased(self, request: IRequest, body: dict[str, Any], path: str, wanted: Request) -> bytes:
        try:
            lease = await self.scheduler.acquire(wanted)
        except QueueFull:
            raise ApiError(
                429, "all slots are busy and the queue is full; retry shortly",
                "rate_limit_error", "queue_full", (("Retry-After", "5"),),
            )
        started = self.clock.seconds()
        progress = _Progress()
        outcome = Outcome(succeeded=False)
        try:
            progress.decision = _shown(lease, await self.preparer.prepare(lease))
            self._lease_headers(request, lease, progress.decision)
            outcome = await self._relay(request, lease, path, body, progress)
            return b""
        finally:
            if not outcome.succeeded and progress.answered:
                outcome = _outcome(progress.status == 200, progress.timings)
            finished = self.clock.seconds()
            settling = self.preparer.settling(lease)
            if settling is None:
                self._release(lease, outcome)
            else:  # cancelled during a save or restore: the slot is released when it ends
                settling.addBoth(lambda _: self._release(lease, outcome))
            self._record(lease, outcome, progress, started, finished)

    def _release(self, lease: Lease, outcome: Outcome) -> None:
        self.scheduler.release(lease, outcome)
        self.preparer.released(lease, outcome)

    def _lease_headers(self, request: IRequest, lease: Lease, decision: Decision) -> None:
        plan = lease.plan
        headers = {
            b"x-proxycache-slot": str(lease.slot.id.index),
            b"x-proxycache-backend": str(self.backend_numbers[lease.slot.id.backend]),
            b"x-proxycache-decision": decision.value,
            b"x-proxycache-similarity": f"{plan.similarity:.3f}",
            b"x-proxycache-reused-blocks": str(plan.common_blocks),
            b"x-proxycache-restored-tokens": str(self.preparer.restored_tokens(lease)),
            b"x-proxycache-queue-wait-ms": f"{lease.waited * 1000:.0f}",
            b"x-proxycache-version": __version__,
        }
        for name, value in headers.items():
            request.setHeader(name, value.encode())

    async def _relay(
        self, request: IRequest, lease: Lease, path: str, body: dict[str, Any], progress: _Progress
    ) -> Outcome:
        backend = self.backends[lease.slot.id.backend]
        payload = dict(body, id_slot=lease.slot.id.index, cache_prompt=True)
        try:
            response = await backend.request(
                "POST", path, body=json.dumps(payload).encode(),
                headers={b"content-type": [b"application/json"]},
                timeout=self.config.first_byte_timeout,
            )
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))
        progress.answered, progress.status = True, response.code
        request.setResponseCode(response.code)
        for name in RELAYED_HEADERS:
            for value in response.headers.getRawHeaders(name, []):
                request.setHeader(name, value)

        streaming = response.code == 200 and body.get("stream") is True
        if streaming:
            return await self._relay_stream(request, response, progress)
        try:
            raw = await read_body(response, self.clock, self.config.stream_idle_timeout)
        except StreamStalled as e:
            raise ApiError(504, str(e), "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise ApiError(502, f"llama-server broke off the response: {e}", "server_error", "upstream_error")
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = None
        timings = progress.timings = timings_of(decoded)
        if timings:
            request.setHeader(b"x-proxycache-cached-tokens", str(timings.get("cache_n", 0)).encode())
            request.setHeader(b"x-proxycache-prompt-tokens", str(timings.get("prompt_n", 0)).encode())
        request.write(raw)
        return _outcome(response.code == 200, timings)

    async def _relay_stream(self, request: IRequest, response: Any, progress: _Progress) -> Outcome:
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        tap = TimingsTap()
        progress.timings = tap.timings

        def relay(data: bytes) -> None:
            request.write(data)
            tap.feed(data)

        try:
            await pipe_body(response, relay, self.clock, self.config.stream_idle_timeout, request)
        except UPSTREAM_FAILURES as e:
            # Headers are gone already: end the stream with an error event the SDKs understand.
            error = {"error": {"message": f"llama-server broke off the stream: {e}", "type": "server_error", "code": "upstream_error"}}
            request.write(b"data: " + json.dumps(error).encode() + b"\n\n")
            if not tap.done:
                request.write(b"data: [DONE]\n\n")
            return Outcome(succeeded=False)
        return _outcome(True, tap.timings)

    def _record(
        self, lease: Lease, outcome: Outcome, progress: _Progress, started: float, finished: float
    ) -> None:
        decision = progress.decision or _shown(lease, lease.plan.decision)
        record = RequestRecord(
            at=finished, decision=decision, slot=str(lease.slot.id.index), status=progress.status,
            similarity=lease.plan.similarity, blocks=len(lease.request.fingerprint.blocks),
            cache_n=outcome.cache_n, prompt_n=outcome.prompt_n, predicted_n=outcome.predicted_n,
            prompt_ms=outcome.prompt_ms, waited=lease.waited, seconds=finished - started,
        )
        log.info(
            "{decision} slot={slot} status={status} similarity={similarity:.2f} blocks={blocks} "
            "cache_n={cache_n} prompt_n={prompt_n} predicted_n={predicted_n} prompt_ms={prompt_ms:.0f} "
            "wait={wait:.3f}s took={took:.3f}s",
            decision=decision.value, slot=str(lease.slot.id), status=progress.status or "-",
            similarity=record.similarity, blocks=record.blocks, cache_n=record.cache_n,
            prompt_n=record.prompt_n, predicted_n=record.predicted_n, prompt_ms=record.prompt_ms,
            wait=record.waited, took=record.seconds,
        )
        for observer in self.observers:
            observer(record)
        if outcome.measured and reused_unplanned(lease.plan, outcome.cache_n, outcome.prompt_n):
            if lease.slot.id.backend not in self._noticed_ram_cache:
                self._noticed_ram_cache.add(lease.slot.id.backend)
                log.info(
                    "llama-server {backend} reused {cache_n} tokens the proxy did not place there: its own "
                    "prompt cache (--cache-ram) is active and moves conversations between slots; proxycache "
                    "follows what timings report (said once)",
                    backend=lease.slot.id.backend, cache_n=outcome.cache_n,
                )
        if outcome.measured and fell_short(lease.plan, lease.request, outcome.cache_n, outcome.prompt_n):
            log.warn(
                "slot {slot} reused {cache_n} tokens, far below the plan ({blocks} blocks): checking llama-server",
                slot=str(lease.slot.id), cache_n=outcome.cache_n, blocks=lease.plan.common_blocks,
            )
            self.on_stale(lease.slot.id)

    # -- the proxy's own pages -----------------------------------------------

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._authorize(request)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.stats.registry)

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        self._authorize(request)
        return _json_response(request, 200, json.dumps(self.stats.status()).encode())

    @app.route("/proxycache/health", methods=["GET"])
    def own_health(self, request: IRequest) -> bytes:
        ok, details = self.health()
        details = dict(details, version=__version__, ok=ok)
        return _json_response(request, 200 if ok else 503, json.dumps(details).encode())

    @app.route("/", methods=["GET"])
    @app.route("/dashboard", methods=["GET"])
    def dashboard(self, request: IRequest) -> bytes:
        # The page holds no data: it fetches /status, with the API key when one is set.
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return _DASHBOARD.read_bytes()

    # -- everything else ----------------------------------------------------

    @app.route("/slots", branch=True)
    def slots(self, request: IRequest) -> bytes:
        raise ApiError(403, "slots are managed by proxycache and not exposed to clients", "invalid_request_error", "slots_forbidden")

    @app.route("/", branch=True, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def passthrough(self, request: IRequest) -> bytes:
        self._authorize(request)
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode()
        allowed = PASSTHROUGH_GET if method == "GET" else PASSTHROUGH_POST if method == "POST" else frozenset()
        if path not in allowed:
            if path in PASSTHROUGH_GET | PASSTHROUGH_POST | SCHEDULED_COMPLETIONS | OWN_ROUTES:
                raise ApiError(405, f"{method} is not allowed on {path}", "invalid_request_error", "method_not_allowed")
            raise ApiError(404, f"no route {method} {path}", "invalid_request_error", "unknown_route")
        backend = next(iter(self.backends.values()))
        query = request.uri.partition(b"?")[2]
        target = path + ("?" + query.decode("ascii", "replace") if query else "")
        body = self._read_body(request) if method == "POST" else None
        headers = {b"content-type": [request.getHeader(b"content-type") or b"application/json"]} if body is not None else None
        try:
            response = await backend.request(method, target, body=body, headers=headers, timeout=self.config.first_byte_timeout)
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))
        request.setResponseCode(response.code)
        for name in RELAYED_HEADERS:
            for value in response.headers.getRawHeaders(name, []):
                request.setHeader(name, value)
        try:
            await pipe_body(response, request.write, self.clock, self.config.stream_idle_timeout, request)
        except UPSTREAM_FAILURES as e:
            log.warn("passthrough {path} broken off: {error}", path=path, error=e)
        return b""


def _shown(lease: Lease, decision: Decision) -> Decision:
    """A small request computed from scratch is reported as 'small', not 'miss'."""
    return Decision.SMALL if lease.request.small and decision is Decision.MISS else decision


def _outcome(succeeded: bool, timings: dict[str, Any]) -> Outcome:
    def count(name: str) -> int:
        value = timings.get(name, 0)
        return int(value) if isinstance(value, (int, float)) else 0

    prompt_ms = timings.get("prompt_ms", 0.0)
    return Outcome(
        succeeded, count("cache_n"), count("prompt_n"), count("predicted_n"),
        float(prompt_ms) if isinstance(prompt_ms, (int, float)) else 0.0,
        measured="cache_n" in timings,
    )
