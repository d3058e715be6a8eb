"""
Fair sharing between tenants (issue 22), side by side in one run on a real
llama-server: one tenant floods (many parallel long requests, each its own
conversation, sent again as each ends: a standing backlog) while a few others
hold interactive conversations (a turn, a short pause, the next turn), on few
slots.

  alone   the flood by itself for --alone-seconds: its throughput, the reference
  fifo    flood + interactive users, --queue-discipline fifo (the old single FIFO)
  fair    flood + interactive users, --queue-discipline fair

Each interactive user holds a real conversation: a private context of
--context-words (above the prefix thresholds, so routing decides where it
lives), each turn the previous prompt, its answer and a new question.

Reported: the interactive turns' queue wait (p50, p95, max; from
X-Proxycache-Queue-Wait-Ms), their hit share, their mean request time, the
tokens llama.cpp prefilled for them (timings.prompt_n) against the oracle
(each user's first prompt, then only what is new since their previous turn) as
prefill_x_oracle with the decisions of their later turns, and the flood's
throughput against running alone: over its whole run, and inside the window
the users were there (from their first turn to their last answer; alone: its
run less the head start), as is and against what alone would do on the slot
time the users left (their own requests' time is their share, not a loss to
fairness).

    python -m bench.fairness                      # 2 slots, flood of 16, 4 users x 10 turns, 0.5 s pauses
    python -m bench.fairness --turns 6 --pause 5  # people who think a few seconds between turns
    python -m bench.fairness --slots 2 --flood 16 --users 4 --turns 5 --flood-words 1000

Prints one JSON summary (and writes it to --out if given).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.processes import Proxy
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess, http
from proxycache.tinymodel import BENCH, TINY, ensure_model

DEFAULT_MODELS = Path(os.environ.get("PROXYCACHE_TEST_MODELS") or Path.home() / ".cache/proxycache/test-models")
WORDS = "slot cache prefix token stream route proxy client server block hash queue tenant fair turn".split()
LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(url: str, user: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[dict[str, str], str]:
    """One non-streamed chat request (its proxy headers and answer); llama.cpp's token counts come as headers."""
    body = {"messages": messages, "max_tokens": max_tokens, "user": user, "ignore_eos": True}
    status, headers, answer = http("POST", url + "/v1/chat/completions", body, timeout=1800)
    if status != 200:
        raise RuntimeError(f"{user}: {status} {answer!r}")
    return dict(headers), answer["choices"][0]["message"]["content"] or ""


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def flood(url: str, workers: int, stop: threading.Event, prompt_words: int, max_tokens: int,
          seed: str) -> dict[str, Any]:
    """
    C{workers} parallel loops of long requests, each a new conversation, until
    C{stop}: what they did, and each request's end (C{ends}, perf_counter) and
    service time, for L{window_rate}.
    """
    rng_lock = threading.Lock()
    rng = random.Random(seed)
    ends: list[tuple[float, float]] = []

    def worker(n: int) -> int:
        i = 0
        while not stop.is_set():
            i += 1
            with rng_lock:
                prompt = f"flood {seed} {n} {i}. " + words(rng, prompt_words)
            sent = time.perf_counter()
            headers, _ = chat(url, "flood", [{"role": "user", "content": prompt}], max_tokens)
            ended = time.perf_counter()
            # its service time: from the slot granted to the answer (the queue wait taken off)
            ends.append((ended, ended - sent - float(headers.get("X-Proxycache-Queue-Wait-Ms", 0)) / 1000))
        return i

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        done = sum(pool.map(worker, range(workers)))
    seconds = time.perf_counter() - started
    return {"requests": done, "seconds": round(seconds, 2), "per_minute": round(60 * done / seconds, 2),
            "service_mean": round(statistics.mean(took for _, took in ends), 3), "ends": ends}


def window_rate(flood_result: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """
    The flood's rate inside [C{start}, C{end}]: requests that ended there per
    minute.  Its backlog stands the whole time, so this is its steady rate,
    without the ramp before the window or the drain of its last requests after.
    """
    inside = [took for ended, took in flood_result["ends"] if start <= ended <= end]
    seconds = end - start
    return {
        "window_seconds": round(seconds, 2),
        "window_requests": len(inside),
        "window_per_minute": round(60 * len(inside) / seconds, 2),
        "window_service_mean": round(statistics.mean(inside), 3) if inside else None,
    }


def interactive(url: str, user: str, turns: int, context_words: int, max_tokens: int, pause: float,
                out: list[dict[str, Any]]) -> None:
    """
    One person's conversation: a private context (above the prefix thresholds, so
    routing decides where it lives), then turns that extend it (each prompt is the
    previous prompt, its answer and a new question).
    """
    rng = random.Random(user)
    messages = [{"role": "system", "content": f"Project of {user}. " + words(rng, context_words)}]
    for turn in range(turns):
        messages.append({"role": "user", "content": words(rng, 12)})
        started = time.perf_counter()
        headers, answer = chat(url, f"user-{user}", messages, max_tokens)
        messages.append({"role": "assistant", "content": answer})
        computed = int(headers.get("X-Proxycache-Prompt-Tokens", 0))
        out.append({
            "user": user,
            "turn": turn,
            "wait": float(headers.get("X-Proxycache-Queue-Wait-Ms", 0)) / 1000,
            "decision": headers.get("X-Proxycache-Decision"),
            "seconds": time.perf_counter() - started,
            "started": started,
            "ended": time.perf_counter(),
            "computed": computed,  # timings.prompt_n: what llama.cpp prefilled
            "prompt": computed + int(headers.get("X-Proxycache-Cached-Tokens", 0)),
        })
        # people do not think in step: a user's pause varies around --pause
        time.sleep(pause * rng.uniform(0.5, 1.5))


def oracle(turns: list[dict[str, Any]]) -> int:
    """Prompt tokens a perfect cache computes: each user's first prompt, then what is new since their last turn."""
    total = 0
    previous: dict[str, int] = {}
    for t in sorted(turns, key=lambda t: (t["user"], t["turn"])):
        total += t["prompt"] - previous.get(t["user"], 0)
        previous[t["user"]] = t["prompt"]
    return total


def prefill(turns: list[dict[str, Any]]) -> dict[str, Any]:
    """The interactive users' prefill against the oracle, and what their later turns found."""
    computed, best = sum(t["computed"] for t in turns), oracle(turns)
    later = [t["decision"] for t in turns if t["turn"] > 0]
    return {
        "prompt_tokens_first_mean": round(statistics.mean(t["prompt"] for t in turns if t["turn"] == 0)),
        "prefill": computed,
        "oracle": best,
        "prefill_x_oracle": round(computed / best, 3) if best else None,
        "later_decisions": {d: later.count(d) for d in sorted(set(later), key=str)},
    }


def scenario(llama: LlamaProcess, workdir: Path, queue: str, args: argparse.Namespace, with_users: bool,
             seed: str) -> dict[str, Any]:
    proxy = Proxy(llama.url, workdir, queue_discipline=queue, slot_save_path=str(llama.save_dir), **LIMITS).start()
    try:
        turns: list[dict[str, Any]] = []
        with concurrent.futures.ThreadPoolExecutor(1 + args.users) as pool:
            stop = threading.Event()
            flood_started = time.perf_counter()
            flooding = pool.submit(flood, proxy.url, args.flood, stop, args.flood_words, args.flood_tokens, seed)
            users = []
            if not with_users:
                time.sleep(args.alone_seconds)
            else:
                time.sleep(args.head_start)  # the flood's backlog is queued first
                users = [
                    pool.submit(interactive, proxy.url, f"u{n}", args.turns, args.context_words, args.user_tokens,
                                args.pause, turns)
                    for n in range(args.users)
                ]
            try:
                for user in users:
                    user.result()
            finally:
                stop.set()  # the flood's requests under way still end, and count
            flood_result = flooding.result()
        if turns:
            # the window the users were there: from the first turn sent to the last answer
            window = min(t["started"] for t in turns), max(t["ended"] for t in turns)
        else:
            window = flood_started + args.head_start, flood_started + args.alone_seconds
        flood_result.update(window_rate(flood_result, *window))
        del flood_result["ends"]
        result: dict[str, Any] = {"queue": queue, "flood": flood_result}
        if turns:
            waits = [t["wait"] for t in turns]
            # slot time the users held (their request time less their queue wait), against the window's capacity
            held = sum(t["seconds"] - t["wait"] for t in turns)
            result["interactive"] = {
                "turns": len(turns),
                "wait_p50": round(percentile(waits, 0.5), 3),
                "wait_p95": round(percentile(waits, 0.95), 3),
                "wait_max": round(max(waits), 3),
                "seconds_mean": round(statistics.mean(t["seconds"] for t in turns), 3),
                "hits": sum(t["decision"] in ("hit", "restore") for t in turns),
                # the machine is shared and its speed varies: waits in units of one flood request's service time
                "wait_p50_in_services": round(percentile(waits, 0.5) / flood_result["service_mean"], 2),
                "wait_p95_in_services": round(percentile(waits, 0.95) / flood_result["service_mean"], 2),
                "slot_seconds": round(held, 2),
                "share_of_slots": round(held / (args.slots * (window[1] - window[0])), 3),
                **prefill(turns),
            }
        return result
    finally:
        proxy.stop()


def compare(results: dict[str, Any]) -> None:
    """
    Each scenario's flood against alone: its whole run (C{vs_alone}, ramp and
    drain included), its rate inside the users' window (C{window_vs_alone}), and
    that rate against what alone would do on the slots the users left free
    (C{window_vs_alone_on_capacity_left}: the users' own share is theirs, not
    a loss to fairness).
    """
    alone = results["alone"]["flood"]
    for name in ("fifo", "fair"):
        flood_result, users = results[name]["flood"], results[name]["interactive"]
        flood_result["vs_alone"] = round(flood_result["per_minute"] / alone["per_minute"], 3)
        window_vs_alone = flood_result["window_per_minute"] / alone["window_per_minute"]
        flood_result["window_vs_alone"] = round(window_vs_alone, 3)
        flood_result["window_vs_alone_on_capacity_left"] = round(window_vs_alone / (1 - users["share_of_slots"]), 3)


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """The options of a bench on one llama-server: which generated model, which binary, where to write."""
    parser.add_argument("--model", choices=("tiny", "bench"), default="tiny",
                        help="generated model: tiny (fast, the default on a shared box) or bench (prefill costs more)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--binary", default=os.environ.get("LLAMA_SERVER_BIN"), help="llama-server (default: built)")
    parser.add_argument("--out", type=Path)


def server_model(args: argparse.Namespace) -> Path:
    """The generated model C{args} name (made if missing); C{args.binary} set to the built one if not given."""
    if args.binary is None:
        from proxycache.testing.llamabin import ensure_llama_server

        args.binary = str(ensure_llama_server())
    return ensure_model(args.models_dir, TINY if args.model == "tiny" else BENCH)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--flood", type=int, default=16, help="parallel flood requests")
    parser.add_argument("--alone-seconds", type=float, default=30.0, help="how long the flood runs alone")
    parser.add_argument("--flood-words", type=int, default=500)
    parser.add_argument("--flood-tokens", type=int, default=48)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--context-words", type=int, default=400,
                        help="each interactive user's private context (~6 tokens a word: ~2,500 tokens)")
    parser.add_argument("--user-tokens", type=int, default=16)
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds an interactive user thinks between turns (each pause 0.5-1.5x this)")
    parser.add_argument("--head-start", type=float, default=1.0, help="seconds the flood starts before the users")
    add_server_options(parser)
    args = parser.parse_args()
    model = server_model(args)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        root = Path(tmp)
        spec = LlamaServerSpec(model=str(model), slots=args.slots, ctx_per_slot=8192, save_dir=str(root / "slots"),
                               port=free_port(), cache_ram_mib=0, binary=args.binary)
        llama = LlamaProcess(spec, root / "llama.log").start()
        try:
            for name, queue, with_users in (("alone", "fair", False), ("fifo", "fifo", True), ("fair", "fair", True)):
                workdir = root / name
                workdir.mkdir()
                results[name] = scenario(llama, workdir, queue, args, with_users, seed=name)
                print(name, json.dumps(results[name]), flush=True)
        finally:
            llama.stop()
    compare(results)
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
