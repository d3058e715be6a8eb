"""
Prefill per client API through proxycache, against its oracle.

For each API (chat, Anthropic Messages, OpenAI Responses, /infill) the same
team plays through the proxy: U users (default 6), each with a private context,
T turns each (default 3), round-robin, on fewer slots than users (so
conversations are evicted, saved and restored).  Prefill is what llama.cpp
computed (the rise of C{llamacpp:prompt_tokens_total} in C{/metrics}); the
oracle is a perfect cache: a user's first prompt in full, then per turn only
what is new since their previous turn (C{prompt_t - prompt_(t-1)}, the prompt
sizes read from each API's usage; for /infill plus the two FIM markers that
follow the prefix, which move when it grows).  A last run mixes an editor's
/infill requests with the chat team, on one more slot (the FIM slot), and
compares the chat prefill (total minus what the /infill requests computed,
their C{timings.prompt_n}) with the chat oracle.  On the tiny model a cache
must be large enough that restoring it beats recomputing it, or the proxy's
cost model (rightly) recomputes: hence 4000-token contexts by default.

    python -m bench.apis                                   # tiny model, ~1 minute
    python -m bench.apis --users 6 --turns 3 --context-tokens 3000 --slots 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.processes import Proxy
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess, ProxyProcess, call
from proxycache.testing.workload import filler

FIM_MARKERS_AFTER_PREFIX = 2  # <|fim_suffix|> and <|fim_middle|> follow the prefix: recomputed when it grows


class User:
    """One user's growing conversation, kept as chat messages and sent in each API's shape."""

    def __init__(self, index: int, context_tokens: int, question_tokens: int, seed: int = 0) -> None:
        self.rng = random.Random(f"{seed}-{index}")
        self.system = f"Project notes of user {index}.\n" + filler(self.rng, context_tokens)
        self.question_tokens = question_tokens
        self.turns: list[tuple[str, str]] = []  # (question, answer)
        self.code = f"# file of user {index}\n" + filler(self.rng, context_tokens // 2)

    def question(self) -> str:
        return "Question: " + filler(self.rng, self.question_tokens)


def _chat_messages(user: User, question: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": user.system}]
    for asked, answered in user.turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": question}]


def chat_turn(url: str, user: User, question: str, answer_tokens: int) -> tuple[int, str]:
    body = {"messages": _chat_messages(user, question), "max_tokens": answer_tokens}
    reply = _post(url + "/v1/chat/completions", body)
    return reply["usage"]["prompt_tokens"], reply["choices"][0]["message"]["content"] or ""


def messages_turn(url: str, user: User, question: str, answer_tokens: int) -> tuple[int, str]:
    """A streamed Anthropic Messages turn (Claude Code streams), read with the anthropic SDK."""
    import anthropic

    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    messages: list[Any] = []
    for asked, answered in user.turns:
        messages += [{"role": "user", "content": asked},
                     {"role": "assistant", "content": [{"type": "text", "text": answered}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
    with client.messages.stream(model="any", max_tokens=answer_tokens, system=user.system,
                                messages=messages) as stream:
        final = stream.get_final_message()
    usage = final.usage
    text = "".join(block.text for block in final.content if block.type == "text")
    return usage.input_tokens + (usage.cache_read_input_tokens or 0), text


def responses_turn(url: str, user: User, question: str, answer_tokens: int) -> tuple[int, str]:
    items: list[dict[str, Any]] = []
    for asked, answered in user.turns:
        items += [{"role": "user", "content": asked},
                  {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answered}]}]
    items.append({"role": "user", "content": question})
    body = {"instructions": user.system, "input": items, "max_output_tokens": answer_tokens}
    reply = _post(url + "/v1/responses", body)
    text = "".join(part.get("text", "") for item in reply["output"] if item.get("type") == "message"
                   for part in item.get("content", []))
    return reply["usage"]["input_tokens"], text


def infill_turn(url: str, user: User, question: str, answer_tokens: int) -> tuple[int, str]:
    """An editor: the user's file as input_extra, the code typed so far as the prefix (it grows each turn)."""
    typed = "".join(asked + answered for asked, answered in user.turns) + question
    body = {"input_extra": [{"filename": "notes.py", "text": user.code}], "input_prefix": typed,
            "input_suffix": "", "prompt": "", "n_predict": answer_tokens}
    reply = _post(url + "/infill", body)
    timings = reply["timings"]
    return timings["prompt_n"] + timings["cache_n"], reply.get("content") or ""


TURNS: dict[str, Callable[[str, User, str, int], tuple[int, str]]] = {
    "chat": chat_turn, "messages": messages_turn, "responses": responses_turn, "infill": infill_turn,
}


def _post(url: str, body: Any) -> Any:
    status, reply = call("POST", url, body, 600)
    if status != 200:
        raise RuntimeError(f"POST {url}: HTTP {status}: {reply}")
    return reply


def oracle(prompts: dict[int, list[int]], tail: int = 0) -> int:
    """A perfect cache: each user's first prompt, then only what each turn adds (plus C{tail} moved tokens)."""
    total = 0
    for sizes in prompts.values():
        previous = 0
        for size in sizes:
            total += size - previous + (tail if previous else 0)
            previous = size
    return total


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        from proxycache.tinymodel import TINY, ensure_model

        self.model = ensure_model(Path.home() / ".cache" / "proxycache" / "test-models", TINY)
        self.runs = 0

    def servers(self, slots: int) -> tuple[LlamaProcess, ProxyProcess]:
        self.runs += 1
        directory = self.workdir / f"run{self.runs}"
        saves = directory / "saves"
        llama = LlamaProcess(LlamaServerSpec(
            model=str(self.model), slots=slots, ctx_per_slot=self.args.ctx_per_slot, save_dir=str(saves),
            port=free_port(), threads=self.args.threads, cache_ram_mib=0,
        ), directory / "llama.log").start()
        proxy = Proxy(llama.url, directory, slot_save_path=str(saves), min_prefix_chars=200,
                      min_prefix_words=20, min_prefix_blocks=2, health_interval=60).start()
        return llama, proxy

    def play(self, api: str) -> dict[str, Any]:
        args = self.args
        llama, proxy = self.servers(args.slots)
        try:
            users = [User(i, args.context_tokens, args.question_tokens) for i in range(args.users)]
            before = llama.prompt_tokens_total()
            prompts: dict[int, list[int]] = {i: [] for i in range(args.users)}
            started = time.perf_counter()
            for _ in range(args.turns):
                for index, user in enumerate(users):
                    question = user.question()
                    size, answer = TURNS[api](proxy.url, user, question, args.answer_tokens)
                    prompts[index].append(size)
                    user.turns.append((question, answer))
            prefill = llama.prompt_tokens_total() - before
            decisions = proxy.metrics()
        finally:
            proxy.stop()
            llama.stop()
        best = oracle(prompts, FIM_MARKERS_AFTER_PREFIX if api == "infill" else 0)
        return {"api": api, "prefill": prefill, "oracle": best, "ratio": prefill / best,
                "prompt_tokens": sum(map(sum, prompts.values())), "seconds": time.perf_counter() - started,
                "decisions": _decisions(decisions)}

    def mixed(self) -> dict[str, Any]:
        """The chat team plus one editor sending /infill after every chat turn, one more slot."""
        args = self.args
        llama, proxy = self.servers(args.slots + 1)
        try:
            users = [User(i, args.context_tokens, args.question_tokens) for i in range(args.users)]
            editor = User(99, args.context_tokens, 40)
            before = llama.prompt_tokens_total()
            prompts: dict[int, list[int]] = {i: [] for i in range(args.users)}
            fim_prefill = 0
            for _ in range(args.turns):
                for index, user in enumerate(users):
                    question = user.question()
                    size, answer = chat_turn(proxy.url, user, question, args.answer_tokens)
                    prompts[index].append(size)
                    user.turns.append((question, answer))
                    typed = editor.question()
                    reply = _post(proxy.url + "/infill", {
                        "input_extra": [{"filename": "notes.py", "text": editor.code}],
                        "input_prefix": "".join(a + b for a, b in editor.turns) + typed, "input_suffix": "",
                        "prompt": "", "n_predict": 4})
                    fim_prefill += reply["timings"]["prompt_n"]
                    editor.turns.append((typed, reply.get("content") or ""))
            total = llama.prompt_tokens_total() - before
            decisions = proxy.metrics()
        finally:
            proxy.stop()
            llama.stop()
        chat_prefill = total - fim_prefill
        best = oracle(prompts)
        return {"api": "chat+fim", "prefill": chat_prefill, "oracle": best, "ratio": chat_prefill / best,
                "fim_prefill": fim_prefill, "total_prefill": total, "decisions": _decisions(decisions)}


def _decisions(metrics: dict[str, float]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, value in metrics.items():
        if name.startswith("proxycache_requests_total{") and 'decision="' in name:
            decision = name.split('decision="')[1].split('"')[0]
            counts[decision] = counts.get(decision, 0) + int(value)
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2, help="slots of the single-API runs (the mixed run: +1)")
    # An editor's file is half the context: at 2000 tokens (1000 of file) the tiny model recomputes it
    # faster than a restore round trip, and the proxy's cost model rightly recomputes.
    parser.add_argument("--context-tokens", type=int, default=4000)
    parser.add_argument("--question-tokens", type=int, default=100)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--ctx-per-slot", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--apis", default="chat,messages,responses,infill")
    parser.add_argument("--json", type=Path, help="write the results here too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-apis-") as workdir:
        bench = Bench(args, Path(workdir))
        for api in args.apis.split(","):
            results.append(bench.play(api))
            print(f"{api}: done", file=sys.stderr, flush=True)
        results.append(bench.mixed())
    print(f"{args.users} users x {args.turns} turns, {args.context_tokens}-token contexts, {args.slots} slots "
          f"(+1 FIM slot in the mixed run), tiny model, llama.cpp --cache-ram 0")
    print(f"{'api':<10} {'prefill':>9} {'oracle':>9} {'x oracle':>9}  decisions")
    for result in results:
        print(f"{result['api']:<10} {result['prefill']:>9} {result['oracle']:>9} {result['ratio']:>8.2f}x  "
              f"{json.dumps(result['decisions'], sort_keys=True)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
