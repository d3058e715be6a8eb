"""
A team's long-context chat workload, for any OpenAI-compatible base URL.

Each of N users has a large private context (a system message of about
C{context_tokens} bytes; the generated models tokenize one byte to one token)
and asks a short question per turn, so the conversation grows turn by turn.
With C{shared_tokens}, every user's system message starts with the same long
prompt of that size (a coding agent's system prompt), then the private part.
Users take turns round-robin; with C{concurrency} K, K users of a round run at
once.  Optional small side calls (a title request, a short prompt of its own)
follow a user's turn, as IDE chat clients send them.

Every request streams through the C{openai} SDK, so time to first token is
measured as the client sees it.  Per request the driver records user, turn,
kind (turn/side), ttft, total seconds, llama.cpp's C{timings.prompt_n} and
C{timings.cache_n} (extra fields of the last stream chunk), the prompt size, and
proxycache's C{x-proxycache-decision} header when present.

Run alone:  python -m proxycache.testing.workload --base-url http://127.0.0.1:8081/v1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import attrs

WORDS = (
    "def class return import self value list dict async await yield lambda for while if else "
    "try except raise with open read write parse render cache slot token prefix block hash "
    "route proxy server client request response stream chunk event error config option path "
    "file buffer socket thread queue lock timer retry budget index entry metric gauge counter "
    "table column record field schema query commit branch merge rebase patch test fixture mock"
).split()


# Token ids of proxycache.tinymodel's vocabulary: <unk> <s> </s>, then bytes 0x00..0xFF.
END_OF_STREAM = 2
BYTE_TOKEN_BASE = 3


@attrs.frozen(kw_only=True)
class Workload:
    """The shape of the traffic; sizes are in tokens (= bytes for the generated models)."""

    users: int = 8
    context_tokens: int = 4000
    shared_tokens: int = 0  # a system prompt every user's context starts with (a team's agent)
    turns: int = 4
    question_tokens: int = 150
    answer_tokens: int = 32
    side_calls: int = 0  # side calls after each turn of each user
    side_tokens: int = 200
    concurrency: int = 1
    seed: int = 0
    model: str = "any"
    # Ban non-ASCII bytes and end-of-stream through logit_bias, by the token ids of
    # proxycache's generated models.  Their random weights mostly emit bytes that
    # are not UTF-8, which llama.cpp holds back until the stream ends: without
    # this, the first chunk (TTFT) would come only after the whole answer.
    ascii_answers: bool = False

    def sampling(self) -> dict[str, Any]:
        if not self.ascii_answers:
            return {}
        banned = [END_OF_STREAM] + [BYTE_TOKEN_BASE + b for b in range(0x80, 0x100)]
        return {"logit_bias": {str(token): -100 for token in banned}}

    def final_tokens(self) -> int:
        """About how many tokens a conversation holds after its last turn (template included)."""
        answer = self.answer_tokens if self.ascii_answers else self.answer_tokens * 3  # U+FFFD is 3 bytes
        return self.shared_tokens + self.context_tokens + 64 + self.turns * (self.question_tokens + answer + 32)


@attrs.frozen(kw_only=True)
class Record:
    user: int
    turn: int
    kind: str  # "turn" or "side"
    started: float  # seconds since the workload started
    ttft: float | None  # seconds to the first stream chunk
    seconds: float  # seconds to the end of the stream
    prompt_n: int | None  # prompt tokens llama.cpp computed
    cache_n: int | None  # prompt tokens llama.cpp reused
    prompt_ms: float | None  # llama.cpp's time computing them
    prompt_tokens: int | None  # the whole prompt (usage, else prompt_n + cache_n)
    completion_tokens: int | None
    decision: str | None  # x-proxycache-decision
    slot: str | None  # x-proxycache-slot
    error: str | None = None
    queue_wait_ms: float | None = None  # x-proxycache-queue-wait-ms: time queued for a slot


def filler(rng: random.Random, size: int) -> str:
    """About C{size} bytes of code-like words, with line breaks."""
    out, length = [], 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        out.append(line)
        length += len(line) + 1
    return "\n".join(out)[:size]


class Conversation:
    """One user's growing chat."""

    def __init__(self, user: int, workload: Workload) -> None:
        self.user = user
        self.workload = workload
        self.rng = random.Random(f"{workload.seed}-{user}")
        context = f"Project notes of user {user}.\n" + filler(self.rng, workload.context_tokens)
        if workload.shared_tokens:
            shared = filler(random.Random(f"{workload.seed}-shared"), workload.shared_tokens)
            context = f"Team agent instructions.\n{shared}\n{context}"
        self.messages: list[dict[str, str]] = [{"role": "system", "content": context}]

    def question(self) -> str:
        return "Question: " + filler(self.rng, self.workload.question_tokens)

    def side_messages(self) -> list[dict[str, str]]:
        """A title/summary request: a short prompt of its own about the last question."""
        last = next(m["content"] for m in reversed(self.messages) if m["role"] == "user")
        prompt = "Write a five word title for this question: " + last
        prompt += "\n" + filler(self.rng, max(0, self.workload.side_tokens - len(prompt)))
        return [{"role": "system", "content": "You name chats."}, {"role": "user", "content": prompt}]


@attrs.frozen
class _Reply:
    ttft: float | None
    seconds: float
    text: str
    timings: dict[str, Any]
    usage: dict[str, Any]
    headers: dict[str, str]


def stream_chat(client: Any, model: str, messages: list[dict], max_tokens: int, **extra: Any) -> _Reply:
    """One streamed chat completion, timed from before the request to the first and last chunk."""
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra,
    )
    headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-proxycache-")}
    ttft, parts, timings, usage = None, [], {}, {}
    for chunk in raw.parse():
        if ttft is None:
            ttft = time.perf_counter() - started
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                parts.append(choice.delta.content)
        extra_fields = chunk.model_extra or {}
        if isinstance(extra_fields.get("timings"), dict):
            timings = extra_fields["timings"]
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return _Reply(ttft, time.perf_counter() - started, "".join(parts), timings, usage, headers)


def _record(user: int, turn: int, kind: str, t0: float, started: float, reply: _Reply) -> Record:
    timings, usage = reply.timings, reply.usage
    prompt_n, cache_n = timings.get("prompt_n"), timings.get("cache_n")
    prompt_tokens = usage.get("prompt_tokens")
    if prompt_tokens is None and prompt_n is not None:
        prompt_tokens = prompt_n + (cache_n or 0)
    return Record(
        user=user, turn=turn, kind=kind, started=started - t0, ttft=reply.ttft, seconds=reply.seconds,
        prompt_n=prompt_n, cache_n=cache_n, prompt_ms=timings.get("prompt_ms"), prompt_tokens=prompt_tokens,
        completion_tokens=usage.get("completion_tokens", timings.get("predicted_n")),
        decision=reply.headers.get("x-proxycache-decision"), slot=reply.headers.get("x-proxycache-slot"),
        queue_wait_ms=_float(reply.headers.get("x-proxycache-queue-wait-ms")),
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _failed(user: int, turn: int, kind: str, t0: float, started: float, error: Exception) -> Record:
    return Record(
        user=user, turn=turn, kind=kind, started=started - t0, ttft=None,
        seconds=time.perf_counter() - started, prompt_n=None, cache_n=None, prompt_ms=None, prompt_tokens=None,
        completion_tokens=None, decision=None, slot=None, error=f"{type(error).__name__}: {error}",
    )


def make_client(base_url: str, api_key: str = "unused", timeout: float = 1800.0) -> Any:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)


def run(
    base_url: str,
    workload: Workload,
    between_turns: Callable[[int], None] | None = None,
    api_key: str = "unused",
    progress: Callable[[Record], None] | None = None,
    replies: Callable[[Record, dict[str, str] | None], None] | None = None,
    t0: float | None = None,
) -> list[Record]:
    """
    Play the workload against C{base_url} (".../v1"); C{between_turns(t)} runs
    after every user finished turn C{t}.  Failed requests are recorded, not raised.
    C{replies} hears each record with its response's headers (None when it failed);
    C{Record.started} counts from C{t0} (default: now).
    """
    client = make_client(base_url, api_key)
    conversations = [Conversation(user, workload) for user in range(workload.users)]
    records: list[Record] = []
    t0 = time.perf_counter() if t0 is None else t0

    def keep(record: Record, headers: dict[str, str] | None = None) -> None:
        records.append(record)
        if replies is not None:
            replies(record, headers)
        if progress is not None:
            progress(record)

    def play_turn(conversation: Conversation, turn: int) -> None:
        question = conversation.question()
        conversation.messages.append({"role": "user", "content": question})
        started = time.perf_counter()
        try:
            reply = stream_chat(client, workload.model, conversation.messages, workload.answer_tokens,
                                **workload.sampling())
        except Exception as e:
            conversation.messages.pop()  # the question goes unanswered; the next turn asks again
            keep(_failed(conversation.user, turn, "turn", t0, started, e))
            return
        conversation.messages.append({"role": "assistant", "content": reply.text})
        keep(_record(conversation.user, turn, "turn", t0, started, reply), reply.headers)
        for _ in range(workload.side_calls):
            started = time.perf_counter()
            try:
                side = stream_chat(client, workload.model, conversation.side_messages(), 8, **workload.sampling())
            except Exception as e:
                keep(_failed(conversation.user, turn, "side", t0, started, e))
                continue
            keep(_record(conversation.user, turn, "side", t0, started, side), side.headers)

    with ThreadPoolExecutor(max_workers=workload.concurrency) as pool:
        for turn in range(workload.turns):
            list(pool.map(lambda c: play_turn(c, turn), conversations))
            if between_turns is not None:
                between_turns(turn)
    return records


def oracle_prefill(records: list[Record], shared_tokens: int = 0) -> int:
    """
    Prompt tokens a perfect cache would still compute: a user's whole first
    prompt, then per turn only what is new since that user's previous turn
    (the previous answer as re-sent, the question, the template around them),
    and every side call in full.  A prompt of C{shared_tokens} every user's
    context starts with is computed once: the first user to send it.
    """
    firsts = [r for r in records if r.kind == "turn" and r.prompt_tokens is not None]
    first_user = min(firsts, key=lambda r: (r.turn, r.started)).user if firsts else None
    total = 0
    previous: dict[int, int] = {}  # user -> prompt tokens of their previous turn
    for record in sorted(records, key=lambda r: (r.user, r.turn, r.kind != "turn", r.started)):
        if record.prompt_tokens is None:
            continue
        if record.kind != "turn":
            total += record.prompt_tokens
            continue
        known = previous.get(record.user, shared_tokens if record.user != first_user else 0)
        total += record.prompt_tokens - known
        previous[record.user] = record.prompt_tokens
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8081/v1")
    parser.add_argument("--api-key", default="unused")
    for field in attrs.fields(Workload):
        option = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):
            parser.add_argument(option, action="store_true")
        else:
            parser.add_argument(option, type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    workload = Workload(**{f.name: getattr(args, f.name) for f in attrs.fields(Workload)})
    records = run(args.base_url, workload, api_key=args.api_key,
                  progress=lambda r: print(json.dumps(attrs.asdict(r)), flush=True))
    computed = sum(r.prompt_n or 0 for r in records)
    print(f"# {len(records)} requests, prompt_n total {computed}, oracle {oracle_prefill(records)}", file=sys.stderr)


if __name__ == "__main__":
    main()
