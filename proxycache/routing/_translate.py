"""
The API translations llama.cpp makes: an Anthropic Messages or an OpenAI
Responses body turned into a Chat Completions body before the chat template
is applied (system first, then the messages; tool uses become C{tool_calls},
tool results C{tool} messages).  The proxy makes the same conversion to
serve Messages through chat (L{proxycache.web._anthropic}) and to render each
API's fingerprint text in llama.cpp's prompt order (L{proxycache.routing._render}).
The functions never raise on odd input: llama.cpp is the judge of what it
accepts; a body it refuses is answered by its error.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["anthropic_to_chat", "as_string", "responses_to_chat"]

_BILLING_HEADER = "x-anthropic-billing-header:"


def as_string(value: Any) -> str:
    """A JSON value as text: a string as it is, null as nothing, anything else as sorted JSON."""
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, sort_keys=True)


def _value(source: Any, key: str, default: Any) -> Any:
    """llama.cpp's C{json_value}: C{source[key]} when it is there and of C{default}'s type, else C{default}."""
    value = source.get(key) if isinstance(source, dict) else None
    if value is None:
        return default
    if isinstance(default, str):
        return value if isinstance(value, str) else default
    if isinstance(default, dict):
        return value if isinstance(value, dict) else default
    if isinstance(default, int):
        return int(value) if isinstance(value, (int, float)) else default
    return value


def _unstamped(text: str) -> str:
    """
    Claude Code's billing header carries a 5-character checksum per request
    (C{cch=a5145;}); llama.cpp overwrites it with C{fffff} so that the
    prefix stays cacheable.
    """
    if not text.startswith(_BILLING_HEADER):
        return text
    at = text.find("cch=", len(_BILLING_HEADER))
    if at < 0:
        return text
    at += 4
    if at + 5 < len(text) and text[at + 5] == ";":
        return text[:at] + "fffff" + text[at + 5:]
    return text


def _function_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _anthropic_image(block: Any) -> dict[str, Any] | None:
    source = _value(block, "source", {})
    kind = _value(source, "type", "")
    if kind == "base64":
        media = _value(source, "media_type", "image/jpeg")
        url = f"data:{media};base64,{_value(source, 'data', '')}"
    elif kind == "url":
        url = _value(source, "url", "")
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: Any) -> dict[str, Any]:
    content = _value(block, "content", None)
    if isinstance(content, list):
        text = ""
        parts: list[dict[str, Any]] = []
        images = False
        for part in content:
            kind = _value(part, "type", "")
            if kind == "text":
                text += _value(part, "text", "")
                parts.append({"type": "text", "text": _value(part, "text", "")})
            elif kind == "image":
                images = True
                image = _anthropic_image(part)
                if image is not None:
                    parts.append(image)
        content = parts if images else text
    elif not isinstance(content, str):
        content = ""
    return {"role": "tool", "tool_call_id": _value(block, "tool_use_id", ""), "content": content}


def _tool_arguments(value: Any) -> str:
    # nlohmann's dump(): compact, keys in the order given, UTF-8 as is.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _anthropic_message(message: Any) -> list[Any]:
    """One Anthropic message as the chat messages llama.cpp makes of it (content blocks split up)."""
    if not isinstance(message, dict) or "content" not in message:
        return [] if _value(message, "role", "") == "assistant" else [message]
    if not isinstance(message["content"], list):
        return [message]
    text_parts: list[Any] = []
    tool_calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    reasoning = ""
    for block in message["content"]:
        kind = _value(block, "type", "")
        if kind == "text":
            text_parts.append(block)  # as it is, cache_control and all
        elif kind == "thinking":
            reasoning += _value(block, "thinking", "")
        elif kind == "image":
            image = _anthropic_image(block)
            if image is not None:
                text_parts.append(image)
        elif kind == "tool_use":
            tool_calls.append({"id": _value(block, "id", ""), "type": "function", "function": {
                "name": _value(block, "name", ""), "arguments": _tool_arguments(_value(block, "input", {}))}})
        elif kind == "tool_result":
            results.append(_tool_result(block))
    converted: list[Any] = []
    if text_parts or tool_calls or reasoning:
        chat: dict[str, Any] = {"role": _value(message, "role", ""), "content": text_parts or ""}
        if tool_calls:
            chat["tool_calls"] = tool_calls
        if reasoning:
            chat["reasoning_content"] = reasoning
        converted.append(chat)
    return converted + results


def anthropic_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """
    An Anthropic Messages body as the Chat Completions body llama.cpp makes of
    it (C{server_chat_convert_anthropic_to_oai}): the system prompt (a string
    or text blocks, billing checksum blanked) as a system message, content
    blocks split into text parts, C{tool_calls} and C{tool} messages,
    C{thinking} blocks into C{reasoning_content}, tools as functions, and the
    few parameters llama.cpp passes on.  Everything else is dropped, as
    llama.cpp drops it.
    """
    messages: list[Any] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": _unstamped(system)})
    elif system is not None:
        text = ""
        if isinstance(system, list):
            text = "".join(_unstamped(_value(b, "text", "")) for b in system if _value(b, "type", "") == "text")
        messages.append({"role": "system", "content": text})
    listed = body.get("messages")
    if isinstance(listed, list):
        for message in listed:
            messages.extend(_anthropic_message(message))
    chat: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if isinstance(tools, list):
        chat["tools"] = [
            _function_tool(_value(t, "name", ""), _value(t, "description", ""),
                           t["input_schema"] if isinstance(t, dict) and "input_schema" in t else {})
            for t in tools
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = _value(choice, "type", "")
        if kind == "auto":
            chat["tool_choice"] = "auto"
        elif kind in ("any", "tool"):
            chat["tool_choice"] = "required"
    if "stop_sequences" in body:
        chat["stop"] = body["stop_sequences"]
    chat["max_tokens"] = body["max_tokens"] if "max_tokens" in body else 4096
    for key in ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs"):
        if key in body:
            chat[key] = body[key]
    thinking = _value(body, "thinking", {})
    if _value(thinking, "type", "") == "enabled":
        chat["thinking_budget_tokens"] = _value(thinking, "budget_tokens", 10000)
    user = _value(_value(body, "metadata", {}), "user_id", "")
    if user:
        chat["__metadata_user_id"] = user
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
            parts.append({"type": "text", "text": as_string(part.get("text"))})
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
        messages.append({"role": "system", "content": as_string(body.get("instructions"))})
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
