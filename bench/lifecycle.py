"""
Lifecycle soak (issue 20): conversations through proxycache over two
llama-servers sharing one save directory while the fleet lives its life:
a backend restarted with the same weights, upgraded to other weights of the
same shape at the same path and rolled back, SIGKILLed and started again,
drained and re-added, the proxy restarted (SIGTERM) and killed (SIGKILL).  Events come between
rounds of turns, one after another, on a fixed plan.

Every answer (greedy, fixed max_tokens) is compared with the one a reference
llama-server running the weights the serving backend ran computes from
scratch (C{cache_prompt: false}): llama.cpp on CPU answers a greedy request
identically with and without a cached prefix, so a difference is a wrong
cache.  Reported: failed requests, wrong answers (target 0), and the share of
later turns that kept their cache (llama.cpp reused at least half the prompt).

    python -m bench.lifecycle --conversations 6 --rounds 12 --minutes 15

Bounded by the rounds and by the minutes, whichever ends first.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from proxycache.embedded import LlamaServerSpec
from proxycache.testing import LlamaProcess, ProxyProcess, free_port, http, wait_for
from proxycache.tinymodel import TINY, ensure_model

ADMIN_KEY = "lifecycle-admin"
ANSWER_TOKENS = 12
LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)
WORDS = (
    "def class return import self value list dict async await yield lambda for while if else try except raise "
    "with open read write parse render cache slot token prefix block hash route proxy server client request"
).split()
# (event, backend): the fleet's life, in order; the soak goes round it.
PLAN: tuple[tuple[str, int | None], ...] = (
    ("upgrade", 0),  # other weights of the same shape at the same path: two models share the directory
    ("restart", 1),
    ("kill", 1),  # SIGKILL: its conversations go on on the other backend, from their saved files
    ("revive", 1),
    ("drain", 0),
    ("readd", 0),
    ("rollback", 0),  # the old weights back: nothing the other weights saved may come back into them
    ("proxy-restart", None),
    ("upgrade", 1),
    ("restart", 0),
    ("rollback", 1),
    ("proxy-kill", None),  # SIGKILL: no flush; write-behind had saved what it could
)


@attrs.define
class Turn:
    conversation: int
    round: int
    event: str  # the event just before this round
    status: int
    decision: str | None = None
    backend: int | None = None
    weights: str | None = None
    right: bool | None = None  # the answer is the reference's
    kept: bool | None = None  # a later turn: llama.cpp reused at least half its prompt
    error: str | None = None


@attrs.define
class Report:
    turns: list[Turn] = attrs.Factory(list)
    events: list[str] = attrs.Factory(list)

    @property
    def failed(self) -> list[Turn]:
        return [t for t in self.turns if t.status != 200]

    @property
    def wrong(self) -> list[Turn]:
        return [t for t in self.turns if t.right is False]

    def kept_share(self) -> float:
        later = [t for t in self.turns if t.kept is not None]
        return sum(1 for t in later if t.kept) / len(later) if later else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "requests": len(self.turns),
            "failed": len(self.failed),
            "wrong_answers": len(self.wrong),
            "later_turns_kept_cache": round(self.kept_share(), 3),
            "decisions": {d: sum(1 for t in self.turns if t.decision == d) for d in ("hit", "restore", "miss")},
            "events": self.events,
            "failures": [f"round {t.round} after {t.event}: {t.status} {t.error}" for t in self.failed][:10],
            "wrong": [attrs.asdict(t) for t in self.wrong][:10],
        }


class Fleet:
    """Two llama-servers on model paths that are links (to swap weights), one save directory, references."""

    def __init__(self, workdir: Path, models: Path, binary: str | None, ctx_per_slot: int) -> None:
        other = attrs.evolve(TINY, seed=TINY.seed + 100)  # the shape of TINY, other weights
        self.weights = {"a": ensure_model(models, TINY), "b": ensure_model(models, other)}
        self.saves = workdir / "saves"
        self.saves.mkdir(parents=True)
        self.links: list[Path] = []
        self.running: list[str] = []  # which weights each backend runs now
        self.backends: list[LlamaProcess] = []
        for i in range(2):
            link = workdir / "models" / f"backend{i}.gguf"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(self.weights["a"])
            self.links.append(link)
            self.running.append("a")
            spec = LlamaServerSpec(model=str(link), slots=2, ctx_per_slot=ctx_per_slot, save_dir=str(self.saves),
                                   port=free_port(), threads=1, binary=binary, cache_ram_mib=0)
            self.backends.append(LlamaProcess(spec, workdir / f"backend{i}.log"))
        self.references = {
            name: LlamaProcess(
                LlamaServerSpec(model=str(path), slots=1, ctx_per_slot=ctx_per_slot * 2, save_dir=None,
                                port=free_port(), threads=1, binary=binary),
                workdir / f"reference-{name}.log",
            )
            for name, path in self.weights.items()
        }

    def start(self) -> None:
        for process in [*self.backends, *self.references.values()]:
            process.start()

    def stop(self) -> None:
        for process in [*self.backends, *self.references.values()]:
            process.stop()

    def point(self, i: int, weights: str) -> None:
        """Backend C{i} restarted on other weights at the same path."""
        self.backends[i].stop()
        self.links[i].unlink()
        self.links[i].symlink_to(self.weights[weights])
        self.running[i] = weights
        self.backends[i].start()

    def reference(self, weights: str, messages: list[dict]) -> str:
        body = {"messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0, "cache_prompt": False}
        status, _, reply = http("POST", self.references[weights].url + "/v1/chat/completions", body, timeout=600)
        if status != 200:
            raise RuntimeError(f"reference {weights}: {status} {reply!r:.200}")
        return reply["choices"][0]["message"]["content"] or ""


def conversation(rng: random.Random, words: int) -> list[dict]:
    return [{"role": "system", "content": "Project notes. " + " ".join(rng.choice(WORDS) for _ in range(words))}]


def _admin(proxy: ProxyProcess, path: str, url: str) -> None:
    status, _, body = http("POST", proxy.url + path, {"url": url}, {"Authorization": f"Bearer {ADMIN_KEY}"})
    if status != 200:
        raise RuntimeError(f"{path} {url}: {status} {body!r:.200}")


def run(
    workdir: Path,
    models: Path,
    *,
    conversations: int = 4,
    rounds: int = len(PLAN) + 1,
    minutes: float = 15.0,
    context_words: int = 400,
    binary: str | None = None,
    seed: int = 0,
    say: Callable[[str], Any] = lambda line: None,
) -> Report:
    """The soak; C{rounds} rounds of one turn per conversation, an event of L{PLAN} before each but the first."""
    deadline = time.monotonic() + minutes * 60
    fleet = Fleet(workdir, models, binary, ctx_per_slot=8192)
    rng = random.Random(seed)
    chats = [conversation(rng, context_words) for _ in range(conversations)]
    report = Report()
    fleet.start()
    options: dict[str, Any] = dict(
        slot_save_path=str(fleet.saves), admin_keys=ADMIN_KEY, health_interval=None, **LIMITS
    )
    urls = ",".join(b.url for b in fleet.backends)

    def start_proxy() -> ProxyProcess:  # the daemon's own health interval; the same meta directory each time
        return ProxyProcess(workdir / "proxy", urls, **options).start()

    proxy = start_proxy()
    try:
        wait_for(lambda: len(proxy.status()["slots"]) == 4, timeout=60, what="both backends up")
        event = "start"
        for number in range(rounds):
            if time.monotonic() > deadline:
                say(f"time is up after {number} rounds")
                break
            if number:
                event, target = PLAN[(number - 1) % len(PLAN)]
                proxy = _happen(event, target, fleet, proxy, start_proxy)
                report.events.append(f"{event} {target if target is not None else ''}".strip())
                say(f"round {number}: {report.events[-1]}")
            for index, messages in enumerate(chats):
                messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(12)) + "?"})
                turn = _turn(proxy, fleet, messages, index, number, event)
                report.turns.append(turn)
                if turn.right is False:
                    say(f"WRONG answer: {attrs.asdict(turn)}")
    finally:
        proxy.stop()
        fleet.stop()
    return report


def _happen(
    event: str, target: int | None, fleet: Fleet, proxy: ProxyProcess, start_proxy: Callable[[], ProxyProcess]
) -> ProxyProcess:
    if event == "upgrade":
        fleet.point(target, "b")  # type: ignore[arg-type]
    elif event == "rollback":
        fleet.point(target, "a")  # type: ignore[arg-type]
    elif event == "restart":
        fleet.backends[target].restart()  # type: ignore[index]
    elif event == "kill":
        fleet.backends[target].kill()  # type: ignore[index]
    elif event == "revive":
        fleet.backends[target].start()  # type: ignore[index]
    elif event == "drain":
        _admin(proxy, "/proxycache/backends/drain", fleet.backends[target].url)  # type: ignore[index]
    elif event == "readd":
        _admin(proxy, "/proxycache/backends", fleet.backends[target].url)  # type: ignore[index]
    elif event in ("proxy-restart", "proxy-kill"):
        proxy.stop(signal.SIGTERM if event == "proxy-restart" else signal.SIGKILL)  # SIGTERM flushes hot slots
        proxy = start_proxy()
    return proxy


def _turn(proxy: ProxyProcess, fleet: Fleet, messages: list[dict], index: int, number: int, event: str) -> Turn:
    body = {"messages": messages, "max_tokens": ANSWER_TOKENS, "temperature": 0}
    try:
        status, headers, reply = http("POST", proxy.url + "/v1/chat/completions", body, timeout=600)
    except OSError as e:  # connection refused, reset
        messages.pop()
        return Turn(index, number, event, 0, error=str(e))
    if status != 200:
        messages.pop()  # the client asks again next round
        return Turn(index, number, event, status, error=json.dumps(reply)[:200] if not isinstance(reply, bytes) else "")
    answer = reply["choices"][0]["message"]["content"] or ""
    backend = int(headers["x-proxycache-backend"])
    weights = fleet.running[backend]
    right = answer == fleet.reference(weights, messages)
    timings = reply.get("timings") or {}
    cache_n, prompt_n = int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0))
    later = len(messages) > 2
    messages.append({"role": "assistant", "content": answer})
    return Turn(
        index, number, event, status, headers["x-proxycache-decision"], backend, weights, right,
        kept=(cache_n >= (cache_n + prompt_n) / 2) if later else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2 * len(PLAN) + 1)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--context-words", type=int, default=600)
    parser.add_argument("--binary", default=None, help="a llama-server binary (default: the xllamacpp wheel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="proxycache-lifecycle-"))
    models = Path.home() / ".cache" / "proxycache" / "test-models"
    started = time.monotonic()
    try:
        report = run(
            workdir, models, conversations=args.conversations, rounds=args.rounds, minutes=args.minutes,
            context_words=args.context_words, binary=args.binary, seed=args.seed, say=print,
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({**report.summary(), "seconds": round(time.monotonic() - started)}, indent=1))


if __name__ == "__main__":
    main()
