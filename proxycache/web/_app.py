"""
The HTTP face of the proxy: parse, hand generating requests to the
dispatcher, pass a few llama.cpp endpoints through, answer errors as OpenAI
error JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from klein import Klein
from twisted.internet.defer import TimeoutError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request as HTTPRequest

from proxycache import __version__
from proxycache.backend import UPSTREAM_FAILURES, Backend, StreamStalled, pipe_body, read_body
from proxycache.config import Config
from proxycache.routing import Request, fingerprint_text, is_small
from proxycache.slots import Dispatcher, NoBackend, QueueFull, TenantLimit
from proxycache.web._admin import Admin
from proxycache.web._apis import APIS, BY_ROUTE, PASSTHROUGH_BY_ROUTE, Api, error_shape
from proxycache.web._auth import authorize
from proxycache.web._cors import CorsResource
from proxycache.web._body import BodyReader
from proxycache.web._errors import ApiError, upstream_unavailable
from proxycache.web._exchange import ClientExchange, relay_headers
from proxycache.web._inflight import InFlight, close_after
from proxycache.web._one_slot import check_one_slot
from proxycache.web._tenant import tenant_of
from proxycache.web._fanout import serve_choices
from proxycache.web._fanout_stream import stream_choices
from proxycache.web._validate import choices_wanted

log = Logger()

_DASHBOARD = Path(__file__).parent.parent / "static" / "dashboard.html"

# llama.cpp endpoints clients may use directly. Generating ones go through the
# scheduler like chat, so they cannot land on (and overwrite) a hot slot.
PASSTHROUGH_GET = frozenset({"/v1/models", "/models", "/health", "/v1/health", "/props"})
# Load balancers and uptime probes send no key (see --health-requires-key).
HEALTH_ROUTES = frozenset({"/health", "/v1/health", "/proxycache/health"})
PASSTHROUGH_POST = frozenset(
    {"/v1/embeddings", "/embeddings", "/embedding", "/tokenize", "/detokenize", "/apply-template"}
) | frozenset(PASSTHROUGH_BY_ROUTE)
SCHEDULED = frozenset(BY_ROUTE)
OWN_ROUTES = frozenset({"/metrics", "/status", "/proxycache/health", "/dashboard"})
# Health probes are answered at once: a load balancer asking must hear "not yet", not wait.
NO_WAIT = frozenset({"/health", "/v1/health"})
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
        backends: Mapping[str, Backend],
        *,
        status: Callable[[], dict[str, Any]],
        metrics: Callable[[], bytes],
        health: Callable[[], tuple[bool, dict[str, Any]]],
        context_limit: Callable[[], int | None] = lambda: None,
        healthy_backend: Callable[[], Backend | None] = lambda: None,
        admin: Admin | None = None,
        body_reader: BodyReader = BodyReader(),
    ) -> None:
        self.config = config
        self.clock = clock
        self.dispatcher = dispatcher
        self.backends = backends  # by name; changes when backends are added or removed
        self.status_of = status  # /status
        self.metrics_text = metrics  # /metrics
        self.health = health  # /proxycache/health: (ok, details)
        self.context_limit = context_limit  # tokens a slot holds, once known
        self.healthy_backend = healthy_backend  # where passthrough requests go
        self.admin = admin  # web._admin.Admin: /proxycache/backends
        self.in_flight = InFlight(clock)
        self.body_reader = body_reader  # large bodies are decoded and parsed in a worker thread

    @property
    def backend_numbers(self) -> dict[str, int]:
        """Each backend's number, as the X-Proxycache-Backend header shows it."""
        return {name: i for i, name in enumerate(self.backends)}

    def resource(self) -> Any:
        resource = self.app.resource()
        return CorsResource(resource, self.config.cors_origins, error_shape)

    # -- errors and auth ----------------------------------------------------

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error: ApiError = failure.value
        for name, value in error.headers:
            request.setHeader(name.encode(), value.encode())
        return _json_response(request, error.status, error_shape(request.path.decode("utf-8", "replace")).body(error))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error on {path}", failure, path=request.path)
        error = ApiError(500, "internal error in proxycache", "server_error", "internal_error")
        return _json_response(request, 500, error_shape(request.path.decode("utf-8", "replace")).body(error))

    def _authorize(self, request: IRequest) -> None:
        authorize(request, self.config.api_keys)

    def _authorize_health(self, request: IRequest) -> None:
        if self.config.health_requires_key:
            self._authorize(request)

    def _raw_body(self, request: IRequest) -> bytes:
        length = request.getHeader(b"content-length")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", "invalid_request_error", "body_too_large")
        body = request.content.read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", "invalid_request_error", "body_too_large")
        return body

    async def _read_body(self, request: IRequest) -> bytes:
        return await self.body_reader.decoded(
            request.getHeader(b"content-encoding"), self._raw_body(request), self.config.max_body_bytes
        )

    async def _json_body(self, request: IRequest) -> dict[str, Any]:
        # A JSON body is taken whatever its Content-Type, as llama.cpp does (curl -d sends a form type).
        return await self.body_reader.json_object(
            request.getHeader(b"content-encoding"), self._raw_body(request), self.config.max_body_bytes
        )

    # -- generating routes --------------------------------------------------

    async def generating(self, request: HTTPRequest, route: str) -> bytes:
        # The route Klein matched, not request.path: "/v1/chat%2Fcompletions" and "//v1/chat/completions"
        # match "/v1/chat/completions" too.
        api = BY_ROUTE[route]
        self._authorize(request)
        body = await self._json_body(request)
        api.validate(body)
        wanted = choices_wanted(body, api.choices) if api.choices else 1
        if wanted > 1:
            serve = stream_choices if body.get("stream") is True else serve_choices
            return await serve(self, request, api, route, body, wanted)
        return await self._generate(request, api, route, body)

    for _route in APIS[::-1]:
        for _path in _route.routes[::-1]:
            generating = app.route(_path, methods=["POST"], defaults={"route": _path})(generating)
    del _route, _path

    def tenant(self, request: IRequest, body: dict[str, Any]) -> str:
        """Who sent C{body} (as the client sent it, before any conversion)."""
        return tenant_of(request, body, self.config.api_keys, self.config.tenant_header)

    def wanted(self, request: IRequest, api: Api, body: dict[str, Any], tenant: str | None = None) -> Request:
        """The routing request for C{body}: its fingerprint, size, slot class and tenant."""
        config = self.config
        text = api.render(body)
        fp = fingerprint_text(text, config.block_words)
        if config.log_prompts:  # off by default: prompts are private on a shared box
            log.info("{api} prompt ({words} words) ends with: {text!r}", api=api.name, words=fp.words, text=text[-200:])
        return Request(
            fp,
            is_small(fp, config.min_prefix_chars, config.min_prefix_words, config.min_prefix_blocks),
            # Pinning exempts a cache from eviction: the operator's call, not any client's.
            pinned=config.allow_client_pins
            and (request.getHeader(b"x-proxycache-pin") or b"").lower() in PIN_HEADER_VALUES,
            kind=api.kind,
            tenant=self.tenant(request, body) if tenant is None else tenant,
        )

    def check_ready(self, request: IRequest) -> None:
        # No slot known yet is no reason to refuse: the dispatcher's gate holds the request until a
        # backend is ready (or its queue timeout runs out).
        self.close_if_draining(request)

    def close_if_draining(self, request: IRequest) -> None:
        """
        Stopping: a request on a connection accepted before is still served (a client cannot tell
        a keep-alive connection went stale), then that connection closes, so that the client's next
        request goes to the listening socket: the next process's, with socket activation.
        """
        if self.in_flight.draining:
            close_after(request)

    async def _generate(self, request: HTTPRequest, api: Api, route: str, body: dict[str, Any]) -> bytes:
        tenant = self.tenant(request, body)
        if api.translate is not None:  # an API the proxy converts (Messages): route and send the converted body
            body = api.translate(body)
        wanted = self.wanted(request, api, body, tenant)
        self.check_ready(request)
        self.in_flight.track(request)
        exchange = ClientExchange(
            request, self.clock, self.config.stream_idle_timeout, body.get("stream") is True, self.backend_numbers, api,
            client_stall_timeout=self.config.client_stall_timeout,
        )
        await self.dispatch(wanted, api.upstream_path(route), body, exchange)
        return b""

    async def dispatch(self, wanted: Request, path: str, body: dict[str, Any], exchange: Any) -> None:
        """The dispatcher's failures as API errors; the one place every scheduled request passes."""
        check_one_slot(path, body)
        try:
            await self.dispatcher.dispatch(wanted, path, body, exchange)
        except NoBackend as e:
            raise upstream_unavailable(str(e), e.retry_after)
        except TenantLimit as e:
            raise ApiError(429, f"{e}; retry shortly", "rate_limit_error", "tenant_queue_full", (("Retry-After", "5"),))
        except QueueFull:
            if not self.dispatcher.gate.ready:  # it could not even wait for a backend: say why
                raise upstream_unavailable("no llama-server is ready and the queue is full")
            raise ApiError(
                429,
                "all slots are busy and the queue is full; retry shortly",
                "rate_limit_error",
                "queue_full",
                (("Retry-After", "5"),),
            )
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))

    async def _healthy_soon(self) -> Backend | None:
        """A backend that answers, waiting for one to come up (the queue timeout at most)."""
        try:
            await self.dispatcher.gate.until(lambda: self.healthy_backend() is not None)
        except NoBackend:
            return None  # try the first one anyway: its own answer says what is wrong
        return self.healthy_backend()

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

    # -- run-time backends (web._admin) -------------------------------------

    def _admin(self) -> Admin:
        if self.admin is None:
            raise ApiError(404, "no run-time backend management here", "invalid_request_error", "unknown_route")
        return self.admin

    @app.route("/proxycache/backends", methods=["GET"])
    def list_backends(self, request: IRequest) -> bytes:
        return self._admin().list_backends(request)

    @app.route("/proxycache/backends", methods=["POST"])
    def add_backend(self, request: IRequest) -> bytes:
        return self._admin().add(request)

    @app.route("/proxycache/backends/drain", methods=["POST"])
    async def drain_backend(self, request: IRequest) -> bytes:
        return await self._admin().drain(request)

    @app.route("/proxycache/backends", methods=["DELETE"])
    async def remove_backend(self, request: IRequest) -> bytes:
        return await self._admin().remove(request)

    @app.route("/proxycache/health", methods=["GET"])
    def own_health(self, request: IRequest) -> bytes:
        self._authorize_health(request)
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
            403,
            "slots are managed by proxycache and not exposed to clients",
            "invalid_request_error",
            "slots_forbidden",
        )

    @app.route("/", branch=True, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def passthrough(self, request: IRequest) -> bytes:
        path = request.path.decode("utf-8", "replace")
        method = request.method.decode()
        if method == "HEAD":  # a GET whose body twisted.web leaves out
            method = "GET"
        if method == "GET" and path in HEALTH_ROUTES:
            self._authorize_health(request)
        else:
            self._authorize(request)
        allowed = PASSTHROUGH_GET if method == "GET" else PASSTHROUGH_POST if method == "POST" else frozenset()
        if path not in allowed:
            if path in PASSTHROUGH_GET | PASSTHROUGH_POST | SCHEDULED | OWN_ROUTES:
                raise ApiError(405, f"{method} is not allowed on {path}", "invalid_request_error", "method_not_allowed")
            raise ApiError(404, f"no route {method} {path}", "invalid_request_error", "unknown_route")
        self.close_if_draining(request)
        backend = self.healthy_backend()
        if backend is None and path not in NO_WAIT:
            backend = await self._healthy_soon()
        backend = backend or next(iter(self.backends.values()), None)
        if backend is None:
            raise upstream_unavailable("no backend configured")
        query = request.uri.partition(b"?")[2]
        target = path + ("?" + query.decode("ascii", "replace") if query else "")
        api = PASSTHROUGH_BY_ROUTE.get(path)
        if method == "POST" and api is not None and api.passthrough_body is not None:
            # normalised as the API's generating route normalises it (Responses input items)
            body: bytes | None = json.dumps(api.passthrough_body(await self._json_body(request))).encode()
        else:
            body = await self._read_body(request) if method == "POST" else None
        sent_type = b"application/json" if api is not None and api.passthrough_body is not None else None
        headers = (
            {b"content-type": [sent_type or request.getHeader(b"content-type") or b"application/json"]}
            if body is not None else None
        )
        try:
            response = await backend.request(
                method, target, body=body, headers=headers, timeout=self.config.first_byte_timeout
            )
        except TimeoutError:
            raise ApiError(504, "llama-server did not answer in time", "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise upstream_unavailable(str(e))
        relay_headers(response, request)
        if response.code >= 400 and api is not None and api.passthrough_body is not None:
            # llama.cpp's error in the API's shape, as the API's generating route answers it
            try:
                raw = await read_body(response, self.clock, self.config.stream_idle_timeout)
            except StreamStalled as e:
                raise ApiError(504, str(e), "server_error", "upstream_timeout")
            except UPSTREAM_FAILURES as e:
                raise ApiError(502, f"llama-server broke off the response: {e}", "server_error", "upstream_error")
            status, raw = api.errors.convert(response.code, raw)
            request.setResponseCode(status)
            return raw
        try:
            await pipe_body(
                response, request.write, self.clock, self.config.stream_idle_timeout, IConsumer(request),
                self.config.client_stall_timeout,
            )
        except UPSTREAM_FAILURES as e:
            log.warn("passthrough {path} broken off: {error}", path=path, error=e)
        return b""
