"""
The Claude Code trio beside an editor (issue 22), on a real llama-server
behind the real daemon, 3 slots: each round sends the main conversation's next
turn, a title call and a quota call at once (the anthropic SDK, streamed, as
Claude Code does), while an editor sends an /infill (llama.vscode's shape, its
open files as input_extra) every --every seconds all along.

Reported per round: the main turn's decision (each round's main turn is the
next turn of the conversation: a hit keeps its slot), its queue wait and TTFT;
each side call's queue wait (X-Proxycache-Queue-Wait-Ms) and TTFT; the
editor's completion latency p50/p95 and decisions during the round.  The
summary says in how many rounds every side call waited less than the main
turn's TTFT.

    python -m bench.side_calls                    # 3 slots, 5 rounds, an /infill every 0.4 s
    python -m bench.side_calls --rounds 10 --every 0.3 --model bench

Prints one JSON summary (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anthropic

from bench.fairness import LIMITS, add_server_options, percentile, server_model, words
from bench.processes import Proxy
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess
from proxycache.testing.editor import Editor

USER_ID = "user_" + "ab" * 32 + "_account__session_bench"


def streamed(client: anthropic.Anthropic, messages: list[dict[str, Any]], max_tokens: int,
             system: str | None = None) -> dict[str, Any]:
    """One streamed Messages request: its queue wait, TTFT, total time, slot, decision and answer."""
    extra: dict[str, Any] = {} if system is None else {"system": system}
    sent = time.perf_counter()
    raw = client.messages.with_raw_response.create(
        model="any", max_tokens=max_tokens, messages=messages, metadata={"user_id": USER_ID}, stream=True, **extra
    )
    first, text = None, []
    for event in raw.parse():
        if event.type == "content_block_delta" and getattr(event.delta, "type", "") == "text_delta":
            first = first or time.perf_counter()
            text.append(event.delta.text)
    done = time.perf_counter()
    return {
        "wait": round(float(raw.headers.get("x-proxycache-queue-wait-ms", 0)) / 1000, 3),
        "ttft": round((first or done) - sent, 3),
        "seconds": round(done - sent, 3),
        "slot": raw.headers.get("x-proxycache-slot"),
        "decision": raw.headers.get("x-proxycache-decision"),
        "answer": "".join(text),
    }


def rounds(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random("claude")
    system = "You are Claude Code. " + words(rng, args.context_words)
    client = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
    main: list[dict[str, Any]] = [{"role": "user", "content": "Refactor the scheduler. " + words(rng, 12)}]
    main.append({"role": "assistant", "content": streamed(client, main, args.main_tokens, system)["answer"]})
    editor = Editor(url, every=args.every).start()
    out = []
    try:
        time.sleep(2 * args.every)  # the editor holds its slot before the first round
        for n in range(args.rounds):
            main.append({"role": "user", "content": "Tool result: " + words(rng, args.turn_words) + ". Go on."})
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                turn = pool.submit(streamed, client, list(main), args.main_tokens, system)
                title = pool.submit(streamed, client, [{"role": "user", "content": "Write a 5-10 word title for: "
                                                        + words(rng, 20)}], args.title_tokens)
                quota = pool.submit(streamed, client, [{"role": "user", "content": "quota"}], 1)
                results = {"main": turn.result(), "title": title.result(), "quota": quota.result()}
            ended = time.perf_counter()
            main.append({"role": "assistant", "content": results["main"]["answer"]})
            # the editor's completions that ran during the round (the last may end after it: wait for it)
            time.sleep(min(args.every, 1.0))
            ran = [c for c in editor.done if c.started <= ended and c.started + c.seconds >= started]
            fim = [c.seconds for c in ran]
            fim_decisions = [str(c.decision) for c in ran]
            side_waits = [results[k]["wait"] for k in ("title", "quota")]
            out.append({
                "round": n + 1,
                **{name: {k: v for k, v in r.items() if k != "answer"} for name, r in results.items()},
                "side_calls_wait_below_main_ttft": max(side_waits) < results["main"]["ttft"],
                "fim": {"n": len(fim), "p50": round(percentile(fim, 0.5), 3), "p95": round(percentile(fim, 0.95), 3),
                        "decisions": {d: fim_decisions.count(d) for d in sorted(set(fim_decisions))}},
            })
            print(json.dumps(out[-1]), flush=True)
            time.sleep(args.pause)
    finally:
        editor.stop()
    main_slot = {r["main"]["slot"] for r in out}
    failed = [c.status for c in editor.done if c.status != 200]
    decisions = [str(c.decision) for c in editor.done]
    out.append({"editor": {"completions": len(editor.done), "failed": len(failed),
                           "decisions": {d: decisions.count(d) for d in sorted(set(decisions))},
                           "on_a_main_slot": sum(c.slot in main_slot for c in editor.done)}})
    return out


def summary(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in per_round if "round" in r]
    decisions = [r["main"]["decision"] for r in done]
    side = [r[k] for r in done for k in ("title", "quota")]
    fim = [r["fim"]["p50"] for r in done if r["fim"]["n"]]
    return {
        "rounds": len(done),
        "main_decisions": {d: decisions.count(d) for d in sorted(set(decisions), key=str)},
        "main_ttft_p50": round(statistics.median(r["main"]["ttft"] for r in done), 3),
        "side_wait_p50": round(statistics.median(s["wait"] for s in side), 3),
        "side_wait_max": round(max(s["wait"] for s in side), 3),
        "side_ttft_p50": round(statistics.median(s["ttft"] for s in side), 3),
        "side_calls_on_the_main_slot": sum(r[k]["slot"] == r["main"]["slot"] for r in done for k in ("title", "quota")),
        "rounds_side_calls_wait_below_main_ttft": sum(r["side_calls_wait_below_main_ttft"] for r in done),
        "fim_p50_of_round_p50s": round(statistics.median(fim), 3) if fim else None,
        "fim_p95_max": max((r["fim"]["p95"] for r in done), default=None),
        **per_round[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--every", type=float, default=0.4, help="seconds between the editor's completions")
    parser.add_argument("--context-words", type=int, default=800, help="the main conversation's system prompt")
    parser.add_argument("--turn-words", type=int, default=100, help="what each main turn adds (a tool result)")
    parser.add_argument("--main-tokens", type=int, default=32)
    parser.add_argument("--title-tokens", type=int, default=12)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds")
    add_server_options(parser)
    args = parser.parse_args()
    model = server_model(args)
    with tempfile.TemporaryDirectory(prefix="side-calls-") as tmp:
        root = Path(tmp)
        spec = LlamaServerSpec(model=str(model), slots=args.slots, ctx_per_slot=16384, save_dir=str(root / "slots"),
                               port=free_port(), cache_ram_mib=0, binary=args.binary)
        llama = LlamaProcess(spec, root / "llama.log").start()
        try:
            (root / "proxy").mkdir()
            proxy = Proxy(llama.url, root / "proxy", slot_save_path=str(llama.save_dir), **LIMITS).start()
            try:
                per_round = rounds(proxy.url, args)
            finally:
                proxy.stop()
        finally:
            llama.stop()
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary(per_round),
               "rounds": per_round[:-1]}
    print(json.dumps(results["summary"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
