"""
OpenAI Responses C{input} items, made into what llama.cpp takes.

llama.cpp b11549 converts a Responses body to chat itself, but knows fewer
shapes than the Responses reference allows (the openai SDK's
C{ResponseInputItemParam}).  What it refuses and the reference allows is
rewritten here, before the body is fingerprinted and sent:

- an easy input message from the assistant (C{{"role": "assistant",
  "content": "..."}}, no C{"type"}: OpenAI's conversation-state guide writes
  turns that way): a C{message} item with C{output_text} parts;
- a C{refusal} part of an assistant message: its text, as C{output_text};
- a C{reasoning} item without readable content (a C{summary} only, or
  C{encrypted_content}): left out, there is nothing in it a local model can
  read; one with content but no C{summary} gets an empty one.

Items no local server can take (an C{item_reference}, which needs stored
responses; items of hosted tools: web search, computer use, MCP, ...) and
items llama.cpp would answer with a 500 (a C{function_call} whose arguments
are not JSON: cut off) are refused with a 400 saying which one and why.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import json
from typing import Any

from proxycache.web._errors import bad_request

__all__ = ["check_input", "upstream_body"]

ROLES = ("user", "assistant", "system", "developer")
# What llama.cpp converts itself (server_chat_convert_responses_to_chatcmpl).
_KNOWN = frozenset({"message", "function_call", "function_call_output", "reasoning"})


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def check_arguments(arguments: Any, where: str) -> None:
    """
    A tool call's C{arguments} as llama.cpp parses them: a string holding
    JSON.  A call cut off mid-arguments (or C{""}) makes it answer 500.
    """
    if not isinstance(arguments, str):
        raise bad_request(f"{where} must be a string of JSON")
    if not _is_json(arguments):
        raise bad_request(f"{where} is not valid JSON (cut off?): {arguments[:80]!r}", "invalid_tool_arguments")


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object (a message or another input item)")
    kind = item.get("type")
    if kind is None and "role" not in item and "id" in item or kind == "item_reference":
        raise bad_request(
            f"{where} is an item reference: neither llama.cpp nor proxycache stores items; "
            "send the item itself", "item_reference_not_supported",
        )
    if kind is not None and not isinstance(kind, str):
        raise bad_request(f"{where}.type must be a string")
    if kind is None or kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(item.get("content"), (str, list)):
            raise bad_request(f"{where}.content must be a string or an array of content parts")
        return
    if kind not in _KNOWN:
        raise bad_request(
            f"{where} is a {kind!r} item: llama.cpp serves function tools only "
            "(function_call and function_call_output items)", "unsupported_item",
        )
    if kind in ("function_call", "function_call_output"):
        for field in ("call_id",) + (("name",) if kind == "function_call" else ()):
            if not isinstance(item.get(field), str):
                raise bad_request(f"{where}.{field} must be a string")
    if kind == "function_call":
        check_arguments(item.get("arguments"), f"{where}.arguments")


def check_input(body: dict[str, Any]) -> None:
    """
    @raise ApiError: a 400 for an input item the proxy cannot make into one
        llama.cpp takes.
    """
    given = body.get("input")
    if isinstance(given, str):
        return
    if not isinstance(given, list):
        raise bad_request("'input' must be a string or an array of items")
    for i, item in enumerate(given):
        _check_item(item, f"input[{i}]")


def _assistant_part(part: Any) -> Any:
    # An easy message's content is input content by the reference; llama.cpp b11434+ takes input_text for the
    # assistant, older builds only output_text: output_text is what both take.
    if isinstance(part, dict) and part.get("type") == "input_text":
        return dict(part, type="output_text")
    # A refusal passes llama.cpp's Responses conversion, then its chat parser refuses it ("unsupported
    # content[].type"): it is what the assistant said, as text.
    if isinstance(part, dict) and part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "output_text", "text": part["refusal"]}
    return part


def _item(item: dict[str, Any]) -> dict[str, Any] | None:
    """One input item as llama.cpp takes it, or None to leave it out."""
    kind = item.get("type")
    if kind in (None, "message") and item.get("role") == "assistant":
        content = item.get("content")
        if isinstance(content, str):
            content = [{"type": "output_text", "text": content}]
        elif isinstance(content, list):
            content = [_assistant_part(part) for part in content]
        return dict(item, type="message", content=content)
    if kind == "reasoning":
        content = item.get("content")
        readable = isinstance(content, list) and content and isinstance(content[0], dict) \
            and isinstance(content[0].get("text"), str)
        if not readable:
            return None
        if not isinstance(item.get("summary"), list):
            return dict(item, summary=[])
    return item


def upstream_body(body: dict[str, Any]) -> dict[str, Any]:
    """The Responses body sent to llama.cpp: its input items in shapes llama.cpp takes (see the module)."""
    given = body.get("input")
    if not isinstance(given, list):
        return body
    items = [_item(item) if isinstance(item, dict) else item for item in given]
    return dict(body, input=[item for item in items if item is not None])
