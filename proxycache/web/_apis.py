"""
The client APIs the proxy serves, one L{Api} each.

Adding an API is adding one row: the routes it answers, the llama.cpp path
it is sent to, its checks, how its body renders to fingerprint text (in the
order llama.cpp builds the prompt, L{proxycache.routing._render}), its slot
class, how its errors look and where llama.cpp's cache counts are in its
answers.  Every generating API goes through the dispatcher the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import attrs

from proxycache.routing import _render
from proxycache.web import _anthropic, _responses, _validate
from proxycache.web._shapes import (
    ANTHROPIC,
    OPENAI,
    RESPONSES,
    ErrorShape,
    llama_timings,
    responses_counts,
)


class StreamTranslator(Protocol):
    """Turns an upstream stream into the client API's, bytes as they come."""

    ended: bool  # the client's stream is complete (its end marker, or an error, was written)

    def feed(self, data: bytes) -> bytes:
        """The client's bytes that C{data} (the next upstream bytes) completes."""


@attrs.frozen
class Api:
    name: str
    routes: tuple[str, ...]
    upstream: str | None  # the llama.cpp path; None: the route's own path
    validate: Callable[[dict[str, Any]], None]  # raises ApiError
    render: Callable[[dict[str, Any]], str]  # fingerprint text
    kind: str = "chat"  # slot class: "chat", or "fim" for editor completions (see --fim-slots)
    errors: ErrorShape = OPENAI
    counts: Callable[[Any], dict[str, Any]] = llama_timings  # cache counts out of an answer or event
    markers: tuple[bytes, ...] = (b'"timings"',)  # stream lines worth decoding for counts
    choices: tuple[str, ...] = ()  # fields asking for several choices (served one by one)
    passthrough: tuple[str, ...] = ()  # non-generating routes of this API, relayed to llama.cpp
    # The body sent on those routes (checked, raising ApiError); None: the client's bytes as they are.
    passthrough_body: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # An API the proxy converts itself: the body sent upstream (rendered, fingerprinted and dispatched),
    # the whole upstream answer back in the client's shape, and a translator of its stream (feed(bytes) -> bytes).
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    answer: Callable[[Any], Any] | None = None
    stream: Callable[[], StreamTranslator] | None = None

    def upstream_path(self, route: str) -> str:
        return self.upstream or route


CHAT = Api(
    "chat", ("/v1/chat/completions", "/chat/completions"), "/v1/chat/completions",
    _validate.check_chat_request, _render.chat_text, choices=("n", "n_cmpl"),
    passthrough=("/v1/chat/completions/input_tokens",),
)
COMPLETIONS = Api(
    "completions", ("/v1/completions", "/completions", "/completion"), None,
    _validate.check_completion_request, _render.completion_text, choices=("n", "n_cmpl"),
)


def _messages_count(body: dict[str, Any]) -> dict[str, Any]:
    # /v1/messages/count_tokens: llama.cpp converts it as it converts /v1/messages, the same way the proxy
    # converts a Messages request, so its count is the request's; what /v1/messages refuses up front (in
    # Anthropic's shape, where llama.cpp answered a 500 the SDKs retry, or counted an empty conversation)
    # is refused here too.
    _validate.check_messages_request(body)
    return body


# llama.cpp b11549 drops id_slot on /v1/messages: the proxy converts Messages to chat itself (as llama.cpp
# does) so that the request is pinned, and renders the converted body like any chat body.
MESSAGES = Api(
    "messages", ("/v1/messages",), "/v1/chat/completions",
    _validate.check_messages_request, _render.chat_text, errors=ANTHROPIC, passthrough=("/v1/messages/count_tokens",),
    passthrough_body=_messages_count, translate=_anthropic.upstream_body, answer=_anthropic.chat_to_message, stream=_anthropic.MessagesStream,
)
def _responses_count(body: dict[str, Any]) -> dict[str, Any]:
    # /v1/responses/input_tokens: llama.cpp converts it as it converts /v1/responses, so it is sent as the
    # proxy sends that (its input items normalised): the count is that of the prompt a request computes.
    _validate.check_responses_input(body)
    return _responses.upstream_body(body)


RESPONSES_API = Api(
    "responses", ("/v1/responses", "/responses"), "/v1/responses",
    _validate.check_responses_request, _render.responses_text, errors=RESPONSES,
    counts=responses_counts, markers=(b'"timings"',), passthrough=("/v1/responses/input_tokens",),
    translate=_responses.upstream_body, passthrough_body=_responses_count,
)
INFILL = Api(
    "infill", ("/infill",), "/infill", _validate.check_infill_request, _render.infill_text, kind="fim",
)

APIS: tuple[Api, ...] = (CHAT, COMPLETIONS, MESSAGES, RESPONSES_API, INFILL)
BY_ROUTE: dict[str, Api] = {route: api for api in APIS for route in api.routes}
PASSTHROUGH_BY_ROUTE: dict[str, Api] = {route: api for api in APIS for route in api.passthrough}


def error_shape(path: str) -> ErrorShape:
    """The error shape of whatever API C{path} belongs to (OpenAI's for the rest)."""
    api = BY_ROUTE.get(path) or PASSTHROUGH_BY_ROUTE.get(path)
    return api.errors if api is not None else OPENAI
