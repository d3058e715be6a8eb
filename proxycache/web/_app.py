"""
The HTTP face of the proxy: parse, hand generating requests to the
dispatcher, pass a few llama.cpp endpoints through, answer errors as OpenAI
error JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from klein import Klein
from twisted.internet.defer import TimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from proxycache import __version__
from proxycache.backend import UPSTREAM_FAILURES, Backend, pipe_body
from proxycache.config import Config
from proxycache.routing import Request, fingerprint, is_small
from proxycache.slots import Dispatcher, QueueFull
from proxycache.web._auth import authorize
from proxycache.web._errors import ApiError, error_body, upstream_unavailable
from proxycache.web._exchange import ClientExchange, relay_headers
from proxycache.web._inflight import InFlight
from proxycache.web._validate import check_chat_request, parse_json_object

log = Logger()

_DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"

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
PIN_HEADER_VALUES = (b"1", b"true", b"yes")


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
        dispatcher: Dispatcher,
        backends: list[Backend],
        *,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        health: Callable[[], tuple[bool, dict[str, Any]]],
        context_limit: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.dispatcher = dispatcher
        self.backends = backends
        self.backend_numbers = {b.name: i for i, b in enumerate(backends)}
        self.status_of = status  # /status
        self.metrics_text = metrics  # /metrics
        self.health = health  # /proxycache/health: (ok, details)
        self.context_limit = context_limit  # tokens a slot holds, once known
        self.in_flight = InFlight(clock)

    def resource(self) -> Any:
        return self.app.resource()

    # -- errors and auth ----------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error: ApiError = failure.value
        for name, value in error.headers:
            request.setHeader(name.encode(), value.encode())
        return _json_response(request, error.status, error.body())

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error on {path}", failure, path=request.path)
        return _json_response(request, 500, error_body("internal error in proxycache", "server_error", "internal_error"))

    def _authorize(self, request: IRequest) -> None:
        authorize(request, self.config.api_keys)

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

    # -- generating routes --------------------------------------------------

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

    async def _generate(self, request: IRequest, body: dict[str, Any], path: str, shape: dict[str, Any]) -> bytes:
        config = self.config
        fp = fingerprint(shape, config.block_words)
        if config.log_prompts:  # off by default: prompts are private on a shared box
            messages = shape.get("messages") or [{}]
            last = messages[-1] if isinstance(messages[-1], dict) else {}
            log.info("prompt ({words} words) ends with: {text!r}", words=fp.words, text=str(last.get("content"))[-200:])
        wanted = Request(
            fp,
            is_small(fp, config.min_prefix_chars, config.min_prefix_words, config.min_prefix_blocks),
            # Pinning exempts a cache from eviction: the operator's call, not any client's.
            pinned=config.allow_client_pins
            and (request.getHeader(b"x-proxycache-pin") or b"").lower() in PIN_HEADER_VALUES,
        )
        if self.in_flight.draining:
            raise ApiError(503, "proxycache is shutting down", "server_error", "shutting_down", (("Retry-After", "10"),))
        if not self.dispatcher.scheduler.slots:
            raise upstream_unavailable("no slots known yet (is llama-server up?)")
        self.in_flight.track(request)
        exchange = ClientExchange(
            request, self.clock, config.stream_idle_timeout, body.get("stream") is True, self.backend_numbers
        )
        try:
            await self.dispatcher.dispatch(wanted, path, body, exchange)
        except QueueFull:
            raise ApiError(
                429, "all slots are busy and the queue is full; retry shortly",
                "rate_limit_error", "queue_full", (("Retry-After", "5"),),
            )
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))
        return b""

    # -- the proxy's own pages -----------------------------------------------

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST

        self._authorize(request)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return self.metrics_text()

    @app.route("/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        self._authorize(request)
        return _json_response(request, 200, json.dumps(self.status_of()).encode())

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
        request.setHeader(
            b"content-security-policy", b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
        )
        return _DASHBOARD.read_bytes()

    # -- everything else ----------------------------------------------------

    @app.route("/slots", branch=True)
    def slots(self, request: IRequest) -> bytes:
        raise ApiError(
            403, "slots are managed by proxycache and not exposed to clients", "invalid_request_error", "slots_forbidden"
        )

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
        backend = self.backends[0]
        query = request.uri.partition(b"?")[2]
        target = path + ("?" + query.decode("ascii", "replace") if query else "")
        body = self._read_body(request) if method == "POST" else None
        headers = (
            {b"content-type": [request.getHeader(b"content-type") or b"application/json"]} if body is not None else None
        )
        try:
            response = await backend.request(method, target, body=body, headers=headers,
                                              timeout=self.config.first_byte_timeout)
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))
        relay_headers(response, request)
        try:
            await pipe_body(response, request.write, self.clock, self.config.stream_idle_timeout, IConsumer(request))
        except UPSTREAM_FAILURES as e:
            log.warn("passthrough {path} broken off: {error}", path=path, error=e)
        return b""
