"""
The rule every scheduled request obeys where it reaches llama.cpp: it runs on
the one slot the proxy leased, and on no other.

llama.cpp runs the extra choices of C{n} / C{n_cmpl} > 1 (an alias of each
other, read on every generating route: chat, completions, Responses, infill)
and each prompt of a list of several prompts as tasks of their own, on
whatever other slot it picks, overwriting the conversation cached there
without the proxy knowing.  Chat and C{/v1/completions} serve several choices
one after another on their slot (L{proxycache.web._fanout}) and reach this
rule with one; everything else that asks for more is refused here.
"""

from __future__ import annotations

from typing import Any

from proxycache.web._errors import bad_request

CHOICE_FIELDS = ("n", "n_cmpl")
# Where llama.cpp reads "prompt" as a list of prompts (tokenize_input_prompts on the body's own prompt).
PROMPT_LIST_PATHS = frozenset({"/completion", "/completions", "/v1/completions"})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_one_slot(path: str, body: dict[str, Any]) -> None:
    """
    @param path: the llama.cpp path C{body} is sent to.
    @raise ApiError: 400 saying why, when C{body} would make llama.cpp use another slot.
    """
    for field in CHOICE_FIELDS:
        value = body.get(field)
        if value is None or (_number(value) and value == 1):
            continue
        raise bad_request(
            f"'{field}' = {value!r} asks for several choices, which this route does not serve: llama.cpp would "
            "generate the extra ones on other slots than the one proxycache chose, wiping the conversations "
            "cached there; send one request per choice (chat and /v1/completions serve 'n' one choice after "
            "another on one slot)",
            "unsupported_n",
        )
    if "id_slot" in body:
        raise bad_request("'id_slot' is chosen by the proxy and cannot be set by clients", "slot_not_allowed")
    prompt = body.get("prompt")
    if (
        path in PROMPT_LIST_PATHS
        and isinstance(prompt, list)
        and len(prompt) > 1
        and not any(_number(item) for item in prompt)  # token ids (mixed with text or not) are one prompt
    ):
        raise bad_request(
            f"'prompt' is a list of {len(prompt)} prompts: llama.cpp would compute all but one of them on other "
            "slots than the one proxycache chose, wiping the conversations cached there; send one request per "
            "prompt",
            "unsupported_prompt_list",
        )
