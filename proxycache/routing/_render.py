"""
Each client API's request body as the text its fingerprint is made of.

The text follows the order of the prompt llama.cpp builds: a Messages or a
Responses body is rendered as the Chat Completions body llama.cpp turns it
into (L{proxycache.routing._translate}), so turn 2 of a conversation renders
as turn 1's text followed by more, and one conversation fingerprints alike
whichever API it comes through.

Pure code: no I/O, no Twisted.
"""

from __future__ import annotations

import json
from typing import Any

from proxycache.routing._fingerprint import conversation_text
from proxycache.routing._translate import anthropic_to_chat, as_string, responses_to_chat

__all__ = ["chat_text", "completion_text", "infill_text", "messages_text", "responses_text"]


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
                pieces.append(f"<|file {as_string(chunk.get('filename'))}|>\n{as_string(chunk.get('text'))}")
    pieces.append("<|fim_prefix|>\n" + as_string(body.get("input_prefix")) + as_string(body.get("prompt")))
    pieces.append("<|fim_suffix|>\n" + as_string(body.get("input_suffix")))
    return "\n".join(pieces)


def messages_text(body: dict[str, Any]) -> str:
    """An Anthropic Messages body, rendered as the chat body llama.cpp makes of it."""
    return conversation_text(anthropic_to_chat(body))


def responses_text(body: dict[str, Any]) -> str:
    """An OpenAI Responses body, rendered as the chat body llama.cpp makes of it."""
    return conversation_text(responses_to_chat(body))
