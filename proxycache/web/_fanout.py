"""
Several choices (C{n} > 1) served as single-choice requests on one slot.

llama.cpp generates the extra choices of one request on other slots than the
pinned one, overwriting their caches behind the proxy's back.  Served one after
another through the dispatcher instead, every choice after the first reuses
the prompt its predecessor left in the slot; the answers are merged into one
(streamed ones are relayed one after another, L{proxycache.web._fanout_stream}).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest, IResponse
from twisted.web.server import Request as HTTPRequest

from proxycache.backend import UPSTREAM_FAILURES, StreamStalled, read_body
from proxycache.routing import Decision, Request
from proxycache.slots import Lease, Progress
from proxycache.web._apis import Api
from proxycache.web._errors import ApiError, bad_request
from proxycache.web._exchange import ClientExchange

if TYPE_CHECKING:
    from proxycache.web._app import Proxy


class CollectingExchange(ClientExchange):
    """Reads one choice's answer instead of relaying it; only the first sets the proxy's headers."""

    def __init__(self, request: IRequest, clock: IReactorTime, idle_timeout: float, backend_numbers: dict[str, int],
                 api: Api, first: bool) -> None:
        super().__init__(request, clock, idle_timeout, False, backend_numbers, api)
        self.first = first
        self.status = 0
        self.raw = b""
        self.decoded: Any = None

    def begin(
        self, lease: Lease, decision: Decision, restored_tokens: int, path: tuple[float, float] = (0.0, 0.0)
    ) -> None:
        if self.first:
            super().begin(lease, decision, restored_tokens, path)

    async def deliver(self, response: IResponse, progress: Progress) -> None:
        self.status = response.code
        try:
            self.raw = await read_body(response, self.clock, self.idle_timeout)
        except StreamStalled as e:
            raise ApiError(504, str(e), "server_error", "upstream_timeout")
        except UPSTREAM_FAILURES as e:
            raise ApiError(502, f"llama-server broke off the response: {e}", "server_error", "upstream_error")
        try:
            self.decoded = json.loads(self.raw)
        except ValueError:
            self.decoded = None
        progress.timings = self.api.counts(self.decoded)


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer holding every answer's choices, renumbered, and their usage added up."""
    merged = dict(answers[0])
    choices: list[Any] = []
    for answer in answers:
        for choice in answer.get("choices") or []:
            choices.append(dict(choice, index=len(choices)) if isinstance(choice, dict) else choice)
    merged["choices"] = choices
    usages: list[dict[str, Any]] = [a["usage"] for a in answers if isinstance(a.get("usage"), dict)]
    if usages:
        merged["usage"] = summed_usage(usages)
    return merged


def summed_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The first choice's usage (its prompt) with every choice's completion tokens added up."""
    usage = dict(usages[0])
    completion = sum(u.get("completion_tokens", 0) for u in usages if isinstance(u.get("completion_tokens"), int))
    usage["completion_tokens"] = completion
    if isinstance(usage.get("prompt_tokens"), int):
        usage["total_tokens"] = usage["prompt_tokens"] + completion
    return usage


# llama.cpp's LLAMA_DEFAULT_SEED: a seed drawn at random for the request (so is -1)
RANDOM_SEED = 0xFFFFFFFF


def for_choice(body: dict[str, Any], index: int) -> dict[str, Any]:
    """
    The body choice C{index} is sent as.  With a fixed C{seed}, every choice
    sent alone would sample alike: each gets its own (seed + index), as the
    choices of one llama.cpp request differ; the same request gives the same
    choices again.
    """
    seed = body.get("seed")
    if index == 0 or not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < RANDOM_SEED:
        return body
    return dict(body, seed=(seed + index) % RANDOM_SEED)


def one_choice(
    proxy: "Proxy", request: HTTPRequest, api: Api, route: str, body: dict[str, Any]
) -> tuple[Request, str, dict[str, Any]]:
    """
    The routing request, llama.cpp path and single-choice body every choice
    is sent as; the request is then in flight.
    """
    if route == "/completion":
        raise bad_request(
            "several choices are only served on /v1/completions: llama.cpp's /completion would generate them "
            "on other slots and overwrite their caches", "unsupported_n",
        )
    single = {k: v for k, v in body.items() if k not in api.choices}
    wanted = proxy.wanted(request, api, body)
    proxy.check_ready(request)
    proxy.in_flight.track(request)
    return wanted, api.upstream_path(route), single


async def serve_choices(
    proxy: "Proxy", request: HTTPRequest, api: Api, route: str, body: dict[str, Any], count: int
) -> bytes:
    """Serve C{count} choices of C{body} one after another, and answer them merged."""
    wanted, upstream, single = one_choice(proxy, request, api, route, body)
    answers = []
    for index in range(count):
        exchange = CollectingExchange(
            request, proxy.clock, proxy.config.stream_idle_timeout, proxy.backend_numbers, api, first=index == 0
        )
        await proxy.dispatch(wanted, upstream, for_choice(single, index), exchange)
        if exchange.status != 200 or not isinstance(exchange.decoded, dict):
            status, raw = api.errors.convert(exchange.status or 502, exchange.raw)
            request.setResponseCode(status)
            request.setHeader(b"content-type", b"application/json")
            return raw
        answers.append(exchange.decoded)
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(merge(answers)).encode()
