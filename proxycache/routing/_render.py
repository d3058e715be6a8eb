"""
Each client API's request body as the text its fingerprint is made of.

llama.cpp turns an Anthropic Messages or an OpenAI Responses body into a Chat
Completions body before applying the chat template (system first, then the
messages; tool uses become C{tool_calls}, tool results C{tool} messages).  The
functions here do the same conversion, so that the rendered text follows the
order of the prompt llama.cpp builds, turn 2 of a conversation renders as
turn 1's text followed by more, and one conversation fingerprints alike
whichever API it comes through.  They never raise on odd input: llama.cpp is
the judge of what it accepts; a body it refuses is answered by its error.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from proxycache.routing._fingerprint import conversation_text

__all__ = ["anthropic_to_chat", "chat_text", "completion_text", "infill_text", "messages_text", "responses_text",
           "responses_to_chat"]

# Claude Code stamps its system prompt with a per-request checksum; llama.cpp
# blanks it so that the prefix stays cacheable, and so must the fingerprint.
_BILLING_HEADER = "x-anthropic-billing-header:"
_CCH = re.compile(r"cch=[^;]*;")


def chat_text(body: dict[str, Any]) -> str:
    """A Chat Completions body: tools, then each message."""
    return conversation_text(body)


def completion_text(body: dict[str, Any]) -> str:
    """A (legacy) completions body: its prompt, a string or token ids."""
    prompt = body.get("prompt")
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
    return conversation_text({"messages": [{"role": "prompt", "content": text}]})


def infill_text(body: dict[str, Any]) -> str:
    """
    An C{/infill} body in llama.cpp's order: the extra context chunks
    (C{input_extra}, which editors resend request after request), then the
    prefix and the prompt, then the suffix.
    """
    pieces = []
    extra = body.get("input_extra")
    if isinstance(extra, list):
        for chunk in extra:
            if isinstance(chunk, dict):
                pieces.append(f"<|file {_string(chunk.get('filename'))}|>\n{_string(chunk.get('text'))}")
    pieces.append("<|fim_prefix|>\n" + _string(body.get("input_prefix")) + _string(body.get("prompt")))
    pieces.append("<|fim_suffix|>\n" + _string(body.get("input_suffix")))
    return "\n".join(pieces)


def messages_text(body: dict[str, Any]) -> str:
    """An Anthropic Messages body, rendered as the chat body llama.cpp makes of it."""
    return conversation_text(anthropic_to_chat(body))


def responses_text(body: dict[str, Any]) -> str:
    """An OpenAI Responses body, rendered as the chat body llama.cpp makes of it."""
    return conversation_text(responses_to_chat(body))


def _string(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, sort_keys=True)


def _unstamped(text: str) -> str:
    if text.startswith(_BILLING_HEADER):
        return _CCH.sub("cch=;", text, count=1)
    return text


def _function_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _anthropic_image(block: dict[str, Any]) -> dict[str, Any]:
    given = block.get("source")
    source = given if isinstance(given, dict) else {}
    # The digest covers the payload (data or URL), never the bytes themselves.
    return {"type": "image_url", "image_url": {"url": source.get("data") or source.get("url") or ""}}


def _tool_result(block: dict[str, Any]) -> dict[str, Any]:
    content = block.get("content")
    if isinstance(content, list):
        parts = [c for c in content if isinstance(c, dict)]
        if any(c.get("type") == "image" for c in parts):
            content = [_anthropic_image(c) if c.get("type") == "image" else c for c in parts]
        else:
            content = "".join(_string(c.get("text")) for c in parts if c.get("type") == "text")
    elif not isinstance(content, str):
        content = ""
    return {"role": "tool", "tool_call_id": _string(block.get("tool_use_id")), "content": content}


def _anthropic_message(message: Any) -> list[Any]:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        if isinstance(message, dict) and "content" not in message and message.get("role") == "assistant":
            return []
        return [message]
    text_parts: list[Any] = []
    tool_calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    reasoning = ""
    for block in message["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text_parts.append({"type": "text", "text": _string(block.get("text"))})
        elif kind == "thinking":
            reasoning += _string(block.get("thinking"))
        elif kind == "image":
            text_parts.append(_anthropic_image(block))
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, sort_keys=True)
            tool_calls.append({"id": _string(block.get("id")), "type": "function",
                               "function": {"name": _string(block.get("name")), "arguments": arguments}})
        elif kind == "tool_result":
            results.append(_tool_result(block))
    converted: list[Any] = []
    if text_parts or tool_calls or reasoning:
        chat: dict[str, Any] = {"role": message.get("role"), "content": text_parts or ""}
        if tool_calls:
            chat["tool_calls"] = tool_calls
        if reasoning:
            chat["reasoning_content"] = reasoning
        converted.append(chat)
    return converted + results


def anthropic_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions tools and messages of an Anthropic Messages body."""
    messages: list[Any] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": _unstamped(system)})
    elif isinstance(system, list):
        text = "".join(
            _unstamped(_string(b.get("text"))) for b in system if isinstance(b, dict) and b.get("type") == "text"
        )
        messages.append({"role": "system", "content": text})
    listed = body.get("messages")
    if isinstance(listed, list):
        for message in listed:
            messages.extend(_anthropic_message(message))
    chat: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if isinstance(tools, list):
        chat["tools"] = [
            _function_tool(t.get("name"), t.get("description"), t.get("input_schema"))
            if isinstance(t, dict) else t for t in tools
        ]
    return chat


def _responses_content(content: Any) -> Any:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": _string(part.get("text"))})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": part.get("image_url")}})
        elif kind == "refusal":
            parts.append({"type": "refusal", "refusal": part.get("refusal")})
        else:
            parts.append(part)
    return parts


def _responses_item(item: Any, messages: list[Any]) -> None:
    if not isinstance(item, dict):
        messages.append(item)
        return
    previous = messages[-1] if messages and isinstance(messages[-1], dict) else None
    after_assistant = previous is not None and previous.get("role") == "assistant"
    kind = item.get("type")
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        if after_assistant:
            previous.setdefault("tool_calls", []).append(call)  # type: ignore[union-attr]
        else:
            messages.append({"role": "assistant", "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            output = [dict(o, type="text") if isinstance(o, dict) else o for o in output]
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
    elif kind == "reasoning":
        content = item.get("content")
        first = content[0] if isinstance(content, list) and content and isinstance(content[0], dict) else {}
        if after_assistant:
            previous["reasoning_content"] = first.get("text")  # type: ignore[index]
        else:
            messages.append({"role": "assistant", "content": [], "reasoning_content": first.get("text")})
    elif item.get("role") == "assistant" and after_assistant:
        previous.setdefault("content", [])  # type: ignore[union-attr]
        if isinstance(previous["content"], list):  # type: ignore[index]
            previous["content"].extend(_responses_content(item.get("content")) or [])  # type: ignore[index]
    else:
        messages.append({"role": item.get("role"), "content": _responses_content(item.get("content"))})


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The Chat Completions tools and messages of an OpenAI Responses body."""
    messages: list[Any] = []
    if "instructions" in body:
        messages.append({"role": "system", "content": _string(body.get("instructions"))})
    given = body.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            _responses_item(item, messages)
    chat: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if isinstance(tools, list):
        chat["tools"] = [
            _function_tool(t.get("name"), t.get("description"), t.get("parameters"))
            for t in tools if isinstance(t, dict) and t.get("type") == "function"
        ]
    return chat
