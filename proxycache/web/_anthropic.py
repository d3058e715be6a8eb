"""
Anthropic Messages served through llama.cpp's Chat Completions.

llama.cpp b11549 drops C{id_slot} when it converts a Messages body, so a
Messages request cannot be pinned to a slot.  The proxy converts the body
itself, the way llama.cpp does (L{proxycache.routing._translate.anthropic_to_chat}),
sends it to C{/v1/chat/completions} (which keeps C{id_slot}), and turns the
chat answer back into a Messages answer the way llama.cpp's own Messages
endpoint writes it: C{to_json_anthropic} for a whole answer,
C{to_json_anthropic_stream} and its partial twin for a stream, which
L{MessagesStream} translates chunk by chunk as it arrives.

Usage is Anthropic's: C{input_tokens} are the prompt tokens computed,
C{cache_read_input_tokens} those reused from the slot (llama.cpp's
C{timings.cache_n}, or C{usage.prompt_tokens_details.cached_tokens}).

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import json
from typing import Any

from proxycache.routing._translate import anthropic_to_chat

__all__ = ["MessagesStream", "chat_to_message", "upstream_body", "usage_of"]

# Chat finish reasons as Anthropic stop reasons (llama.cpp: length -> max_tokens, eos/word -> end_turn or tool_use).
STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    """
    The chat body sent for Messages body C{body}.  A stream also asks for its
    usage at the end and for C{timings} on every chunk, so that C{message_start}
    can say how much of the prompt was reused, as llama.cpp's own stream does.
    """
    chat = anthropic_to_chat(body)
    if isinstance(chat.get("stop"), list) and chat["stop"]:
        # Chat answers do not say which stop string ended them; llama.cpp's debugging fields (__verbose) do.
        chat["verbose"] = True
    if chat.get("stream") is True:
        chat["stream_options"] = {"include_usage": True}
        chat["timings_per_token"] = True
    return chat


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage_of(usage: Any, timings: Any, output: bool = True) -> dict[str, int]:
    """Anthropic usage out of a chat answer's C{usage} and/or C{timings} (C{usage} wins)."""
    usage = usage if isinstance(usage, dict) else {}
    timings = timings if isinstance(timings, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else None
    prompt = _count(usage.get("prompt_tokens"))
    if cached is None:
        cached = _count(timings.get("cache_n"))
    if prompt is not None and cached is not None:
        computed: int | None = max(prompt - cached, 0)
    else:
        computed = _count(timings.get("prompt_n")) if prompt is None else prompt
    result = {"cache_read_input_tokens": cached or 0, "input_tokens": computed or 0}
    if output:
        result["output_tokens"] = _count(usage.get("completion_tokens")) or _count(timings.get("predicted_n")) or 0
    return result


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tool_input(arguments: Any) -> Any:
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except (ValueError, RecursionError):  # the model wrote them: anything, nested any deep
        parsed = None
    return parsed if isinstance(parsed, dict) else {}


def stop_word(chunk: dict[str, Any]) -> str | None:
    """The stop string that ended an answer, where llama.cpp says so (C{__verbose}, asked for by L{upstream_body})."""
    verbose = _dict(chunk.get("__verbose"))
    word = verbose.get("stopping_word")
    return word if verbose.get("stop_type") == "word" and isinstance(word, str) and word else None


def _stop(finish: Any, word: str | None) -> tuple[str, str | None]:
    """Anthropic's C{stop_reason} and C{stop_sequence}."""
    if word is not None and finish == "stop":
        return "stop_sequence", word
    return STOP_REASONS.get(str(finish), "end_turn"), None


def chat_to_message(answer: Any) -> Any:
    """A whole chat answer as an Anthropic message (anything else is left as it is)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        return answer
    choice = _dict(answer["choices"][0])
    message = _dict(choice.get("message"))
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = _dict(call).get("function")
        if isinstance(function, dict):
            content.append({"type": "tool_use", "id": call.get("id") or "", "name": function.get("name") or "",
                            "input": _tool_input(function.get("arguments"))})
    stop_reason, stop_sequence = _stop(choice.get("finish_reason"), stop_word(answer))
    return {
        "id": answer.get("id"), "type": "message", "role": "assistant", "content": content,
        "model": answer.get("model"), "stop_reason": stop_reason,
        "stop_sequence": stop_sequence, "usage": usage_of(answer.get("usage"), answer.get("timings")),
    }


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class MessagesStream:
    """
    A chat completion stream (SSE) in, the Anthropic Messages events out, as
    it goes: L{feed} takes whatever bytes arrived and returns the events they
    complete.  C{message_start} goes out once llama.cpp's timings (or the first
    content) are known, each block (thinking, text, each tool use) is opened
    with C{content_block_start} and closed when the next one starts, and the
    end (C{[DONE]}) becomes C{message_delta} with the stop reason and usage,
    then C{message_stop}.  A chat error event becomes an Anthropic C{error}.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._id: Any = None
        self._model: Any = None
        self._timings: dict[str, Any] = {}
        self._usage: dict[str, Any] = {}
        self._started = False
        self._blocks = 0  # content blocks opened so far
        self._open: tuple[str, int] | None = None  # ("text" / "thinking" / "tool:N", its index)
        self._finish: Any = None
        self._stop_word: str | None = None
        self.ended = False  # message_stop (or an error) was sent

    def feed(self, data: bytes) -> bytes:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out: list[bytes] = []
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                out.append(self._data(line[5:].strip()))
            elif line.startswith(b"error:"):
                out.append(self._error(line[6:].strip()))
        return b"".join(out)

    def _data(self, payload: bytes) -> bytes:
        if self.ended:
            return b""
        if payload == b"[DONE]":
            return self._end()
        try:
            chunk = json.loads(payload)
        except ValueError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            return self._error(payload)
        self._id = self._id or chunk.get("id")
        self._model = self._model or chunk.get("model")
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        self._stop_word = stop_word(chunk) or self._stop_word
        out: list[bytes] = []
        choices = chunk.get("choices")
        choice = _dict(choices[0]) if isinstance(choices, list) and choices else {}
        delta = _dict(choice.get("delta"))
        reasoning, text = delta.get("reasoning_content"), delta.get("content")
        if isinstance(reasoning, str) and reasoning:
            out.append(self._delta("thinking", {"type": "thinking", "thinking": ""},
                                   {"type": "thinking_delta", "thinking": reasoning}))
        if isinstance(text, str) and text:
            out.append(self._delta("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                out.append(self._tool_call(call))
        if choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]
        if not self._started and (self._timings or self._usage):
            out.insert(0, self._start())
        return b"".join(out)

    def _start(self) -> bytes:
        self._started = True
        usage = dict(usage_of(self._usage, self._timings, output=False), output_tokens=0)
        return _event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "content": [], "model": self._model,
            "stop_reason": None, "stop_sequence": None, "usage": usage}})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        kind, index = self._open
        self._open = None
        closing = b""
        if kind == "thinking":  # Anthropic wants a signature before a thinking block ends; local models have none
            closing = _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                     "delta": {"type": "signature_delta", "signature": ""}})
        return closing + _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = (b"" if self._started else self._start()) + self._close()
        self._open = (kind, self._blocks)
        self._blocks += 1
        return out + _event("content_block_start", {"type": "content_block_start", "index": self._open[1],
                                                    "content_block": block})

    def _delta(self, kind: str, block: dict[str, Any], delta: dict[str, Any]) -> bytes:
        out = b"" if self._open is not None and self._open[0] == kind else self._open_block(kind, block)
        assert self._open is not None
        return out + _event("content_block_delta", {"type": "content_block_delta", "index": self._open[1],
                                                     "delta": delta})

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        kind = f"tool:{call.get('index', 0)}"
        function = _dict(call.get("function"))
        out = b""
        if self._open is None or self._open[0] != kind:
            out = self._open_block(kind, {"type": "tool_use", "id": call.get("id") or "",
                                          "name": function.get("name") or "", "input": {}})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            assert self._open is not None
            out += _event("content_block_delta", {"type": "content_block_delta", "index": self._open[1],
                                                  "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out

    def _end(self) -> bytes:
        out = (b"" if self._started else self._start()) + self._close()
        self.ended = True
        stop, sequence = _stop(self._finish, self._stop_word)
        out += _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop, "stop_sequence": sequence},
                                        "usage": usage_of(self._usage, self._timings)})
        return out + _event("message_stop", {"type": "message_stop"})

    def _error(self, payload: bytes) -> bytes:
        if self.ended:
            return b""
        self.ended = True
        try:
            error = json.loads(payload)
            message = error.get("error", error).get("message") or str(error)
        except (ValueError, AttributeError):
            message = payload.decode("utf-8", "replace")
        return _event("error", {"type": "error", "error": {"type": "api_error", "message": str(message)}})
