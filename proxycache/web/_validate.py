"""
Checks on a Chat Completions request before it takes a slot.

Only what would break the proxy or waste a slot is refused; fields the proxy
does not know pass through to llama.cpp untouched.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from proxycache.web._errors import bad_request
from proxycache.web._responses import check_arguments, check_input

# llama.cpp takes any role; these are the ones chat templates know (ipython: Llama 3 tool results).
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "ipython"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    # 1e999 is valid JSON but Infinity to Python, which would be sent on as the non-JSON "Infinity".
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is too large")
    return value


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", "invalid_utf8")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except ValueError as e:
        raise bad_request(f"request body is not valid JSON: {e}", "invalid_json")
    except RecursionError:  # a few kilobytes of "[" are enough
        raise bad_request(f"request body is nested more than {MAX_DEPTH} deep", "invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("request body must be a JSON object", "invalid_json")
    _check_nesting(value)
    if _SURROGATE_ESCAPE.search(text):  # valid UTF-8 holds no surrogate: only an escape makes one
        _check_strings(value)
    return value


# Far deeper than any real request (tool schemas nest a dozen levels), and far enough from Python's
# recursion limit that encoding the body again for llama.cpp cannot hit it.
MAX_DEPTH = 200
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_nesting(value: Any) -> None:
    """Refuse a body with anything deeper than L{MAX_DEPTH}: a walk over its arrays and objects only."""
    level, depth = [value], 0
    while level:
        if depth >= MAX_DEPTH and any(level):  # their items would be deeper
            raise bad_request(f"request body is nested more than {MAX_DEPTH} deep", "invalid_json")
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (dict, list))
        ]
        depth += 1


def _check_strings(value: Any, path: str = "body") -> None:
    """
    Refuse lone surrogates, which cannot be encoded for llama.cpp.  (An escaped
    NUL is valid JSON and llama.cpp takes it; a raw NUL byte fails json.loads.)
    """
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{where} contains a lone surrogate", "invalid_string")
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
            stack.extend((k, f"{where} key") for k in item)
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _check_content(content: Any, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string, an array of parts or null")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{where}.content[{i}] must be an object with a 'type'")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{i}].text must be a string")


def check_stream(body: dict[str, Any]) -> None:
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be true or false")


def check_no_slot(body: dict[str, Any]) -> None:
    if "id_slot" in body:
        raise bad_request("'id_slot' is chosen by the proxy and cannot be set by clients", "slot_not_allowed")


# llama-server refuses more choices than it has slots; served one after another on one slot, any
# number would fit, but a request asking for a million would hold its slot for ever.
MAX_CHOICES = 16


def choices_wanted(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    """
    How many choices a request asks for (C{n} or C{n_cmpl}).  llama.cpp runs
    the extra ones on other slots than the one the proxy pinned, overwriting
    their caches unseen: the proxy serves them one after another on its slot
    (L{proxycache.web._fanout}), up to L{MAX_CHOICES}.
    """
    wanted = 1
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"'{field}' must be a positive integer")
        if value > MAX_CHOICES:
            raise bad_request(f"'{field}' cannot be greater than {MAX_CHOICES}", "unsupported_n")
        wanted = max(wanted, value)
    return wanted


def check_chat_request(body: dict[str, Any]) -> None:
    """
    @raise ApiError: 400 naming the first problem found.
    """
    messages = body.get("messages")
    if messages is None:
        raise bad_request("'messages' is required", "missing_messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array")
    if not messages:
        raise bad_request("'messages' must not be empty")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object")
        role = message.get("role")
        if role is None:
            raise bad_request(f"{where}.role is required")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not one of {', '.join(sorted(ROLES))}")
        _check_content(message.get("content"), where)
        _check_tool_calls(message.get("tool_calls"), where)
    _check_tools(body.get("tools"))
    check_stream(body)
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        # Larger than a slot's context is fine: llama.cpp stops at the context, as it does without the proxy.
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad_request(f"'{field}' must be an integer")
    check_no_slot(body)


def _check_function(item: Any, at: str, type_code: str = "invalid_request") -> dict[str, Any]:
    """
    A tool or a tool call as llama.cpp parses it (it answers 500 to a mistake
    in one): C{{"type": "function", "function": {"name": ...}}}; its function.
    """
    if not isinstance(item, dict) or item.get("type") != "function":
        raise bad_request(f"{at} must be an object whose 'type' is \"function\"", type_code)
    function = item.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"{at}.function must be an object with a 'name'")
    return function


def _check_tool_calls(calls: Any, where: str) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be an array")
    for i, call in enumerate(calls):
        function = _check_function(call, f"{where}.tool_calls[{i}]")
        if not isinstance(call.get("id", ""), str):
            raise bad_request(f"{where}.tool_calls[{i}].id must be a string")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # llama.cpp parses them (answering 500 when it cannot); an object is dumped
            check_arguments(arguments, f"{where}.tool_calls[{i}].function.arguments")


def _check_tools(tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of tools")
    for i, tool in enumerate(tools):
        if not _check_function(tool, f"tools[{i}]", "unsupported_tool")["name"]:
            raise bad_request(f"tools[{i}].function must be an object with a 'name'")


def check_completion_request(body: dict[str, Any]) -> None:
    check_stream(body)
    check_no_slot(body)


def check_messages_request(body: dict[str, Any]) -> None:
    """
    An Anthropic Messages body: what the proxy itself needs to route it, and
    what llama.cpp answers with a 500 (which the SDKs retry) although the
    client is at fault.
    """
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' is required and must be an array", "missing_messages")
    if not messages:  # llama.cpp answers it; Anthropic refuses it
        raise bad_request("'messages' must hold at least one message", "missing_messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object")
        if not isinstance(message.get("role"), str):
            raise bad_request(f"messages[{i}].role must be a string (\"user\" or \"assistant\")")
        content = message.get("content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and not isinstance(block.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}].text must be a string")
            if kind == "tool_use" and not isinstance(block.get("input", {}), dict):
                raise bad_request(f"messages[{i}].content[{j}].input must be an object", "invalid_tool_arguments")
    check_stream(body)
    check_no_slot(body)


def check_responses_request(body: dict[str, Any]) -> None:
    """An OpenAI Responses body; the proxy keeps no responses, so it cannot continue one."""
    check_responses_input(body)
    check_stream(body)
    check_no_slot(body)


def check_responses_input(body: dict[str, Any]) -> None:
    """The input of a Responses body (also what C{/v1/responses/input_tokens} counts)."""
    if "input" not in body:
        raise bad_request("'input' is required", "missing_input")
    if body.get("previous_response_id"):
        raise bad_request(
            "'previous_response_id' is not supported: neither llama.cpp nor proxycache stores responses; "
            "send the whole conversation in 'input' (the proxy reuses its cached prefix)",
            "previous_response_id_not_supported",
        )
    check_input(body)


def check_infill_request(body: dict[str, Any]) -> None:
    extra = body.get("input_extra")
    if extra is not None and (not isinstance(extra, list) or not all(isinstance(c, dict) for c in extra)):
        raise bad_request("'input_extra' must be an array of {filename, text} objects")
    check_stream(body)
    check_no_slot(body)
