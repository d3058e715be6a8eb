"""
Siblings off one context, side by side with llama-server alone (issue 24).

Two identical llama-servers (same model, slots, flags: --cache-ram 0 and a slot
save directory), one behind proxycache.  One large context, then sibling
requests that share it and differ in the last user message (a regenerate, many
questions against one repository context), sent to both servers in turn (the
order alternating), back to back and with pauses; the median sibling latency
of each, and what the proxy put on each sibling's path (X-Proxycache-Path-Ms: its saves and
restores, and its wait for a slot busy with a background save, X-Proxycache-Save-Wait-Ms).
Then two contexts alternating on the slots ("switch"): llama-server alone, its
RAM cache off, recomputes each context; the proxy restores it.

    python -m bench.siblings                                   # bench model, 2k to 30k chars, 1 and 2 slots
    python -m bench.siblings --models kv7b --sizes 2000 --siblings 4   # 7B-class KV (128 KiB a token)
    python -m bench.siblings --models bench,kv7b --out docs/benchmarks/siblings
    python -m bench.siblings --models kv30b --sizes-kv30b 2000 --switch-sizes-kv 2000 --siblings 4   # 256 KiB a token
    python -m bench.siblings --render docs/benchmarks/siblings-kv30b                  # the Markdown again from the JSON

Models: proxycache.tinymodel.PRESETS (tiny, bench, kv7b, kv30b).  Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.processes import Proxy, wait_until_quiet
from bench.verdict import sibling_row
from proxycache.embedded import LlamaServerSpec, free_port
from proxycache.testing import LlamaProcess
from proxycache.testing.http import http
from proxycache.tinymodel import PRESETS, ensure_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = Path.home() / ".cache/proxycache/test-models"
WORDS = (
    "def class return import self value list dict async await yield lambda for while if else try except "
    "raise with open read write parse render cache slot token prefix block hash route proxy server client"
).split()
LIMITS = dict(min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def words(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def ask(url: str, context: str, question: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "any", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "system", "content": context}, {"role": "user", "content": question}],
    }
    started = time.perf_counter()
    status, headers, reply = http("POST", url + "/v1/chat/completions", body, timeout=3600)
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{url}: {status} {reply}")
    timings = reply.get("timings", {})
    return {
        "seconds": seconds,
        "cache_n": timings.get("cache_n"),
        "prompt_n": timings.get("prompt_n"),
        "prompt_ms": timings.get("prompt_ms"),
        # what the request took beyond llama.cpp's own prefill and decode: robust to the machine's load
        "outside_s": seconds - ((timings.get("prompt_ms") or 0) + (timings.get("predicted_ms") or 0)) / 1000,
        "decision": headers.get("x-proxycache-decision"),
        "path_ms": float(headers.get("x-proxycache-path-ms") or 0),
        "save_ms": float(headers.get("x-proxycache-save-ms") or 0),
        "restore_ms": float(headers.get("x-proxycache-restore-ms") or 0),
        "restored_tokens": int(headers.get("x-proxycache-restored-tokens") or 0),
        # time queued for the slot: e.g. behind a write-behind save of the slot's previous state
        "wait_ms": float(headers.get("x-proxycache-queue-wait-ms") or 0),
        # of it, queued only because slots were busy with background saves (counted in path_ms too)
        "save_wait_ms": float(headers.get("x-proxycache-save-wait-ms") or 0),
    }


def disk(url: str) -> dict[str, int]:
    """The proxy's disk counters (/status): saves, restores, bytes saved so far."""
    status = http("GET", url + "/status")[2]["disk"]
    return {k: int(status[k]) for k in ("saves", "restores", "saved_bytes")}


class Pair:
    """Two identical llama-servers, one behind proxycache."""

    def __init__(self, model: Path, slots: int, ctx: int, workdir: Path, binary: str | None, threads: int) -> None:
        self.llamas = []
        for name in ("alone", "proxied"):
            directory = workdir / name
            (directory / "saves").mkdir(parents=True, exist_ok=True)
            spec = LlamaServerSpec(model=str(model), slots=slots, ctx_per_slot=ctx, save_dir=str(directory / "saves"),
                                   port=free_port(), threads=threads, cache_ram_mib=0, binary=binary)
            self.llamas.append(LlamaProcess(spec, directory / "llama.log"))
        self.alone, self.proxied = self.llamas
        self.proxy = Proxy(self.proxied.url, workdir / "proxy", slot_save_path=str(self.proxied.save_dir), **LIMITS)

    def __enter__(self) -> "Pair":
        for llama in self.llamas:
            llama.start()
        self.proxy.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.proxy.stop()
        for llama in self.llamas:
            llama.stop()

    def both(self, n: int, context: str, question: str, max_tokens: int) -> tuple[dict, dict]:
        """The same request to llama-server alone and through the proxy, in alternating order."""
        targets = [("alone", self.alone.url), ("proxy", self.proxy.url)]
        if n % 2:
            targets.reverse()
        got = {}
        for name, url in targets:
            before = disk(self.proxy.url) if name == "proxy" else {}
            got[name] = ask(url, context, question, max_tokens)
            if before:
                # what the proxy wrote while this request ran: its save on the path (one slot busy: rarely
                # a background save of another slot)
                after = disk(self.proxy.url)
                got[name]["disk"] = {k: after[k] - before[k] for k in after}
        got["alone"]["load"] = got["proxy"]["load"] = os.getloadavg()[0]
        return got["alone"], got["proxy"]


def summary(pairs: list[tuple[dict, dict]], kv_bytes_per_token: int) -> dict[str, Any]:
    alone = statistics.median(a["seconds"] for a, _ in pairs)
    proxy = statistics.median(p["seconds"] for _, p in pairs)
    on_path = [p for _, p in pairs]
    return {
        "n": len(pairs),
        "alone_median_s": round(alone, 4),
        "proxy_median_s": round(proxy, 4),
        "ratio": round(proxy / alone, 3),
        "alone_outside_ms_median": round(statistics.median(a["outside_s"] for a, _ in pairs) * 1000, 1),
        "proxy_outside_ms_median": round(statistics.median(p["outside_s"] for _, p in pairs) * 1000, 1),
        "proxy_path_ms_median": statistics.median(p["path_ms"] for _, p in pairs),
        "proxy_path_ms_max": max(p["path_ms"] for _, p in pairs),
        "proxy_decisions": sorted({p["decision"] for _, p in pairs}),
        # saves and restores on the siblings' paths: how many, bytes, ms (sums over the row's siblings); a save
        # counts if it ran while the request did (before it, on the path, or a write-behind save it waited for)
        "path_saves": sum(p.get("disk", {}).get("saves", 0) for p in on_path),
        "path_save_ms": round(sum(p.get("save_ms", 0) for p in on_path)),
        "path_save_bytes": sum(p.get("disk", {}).get("saved_bytes", 0) for p in on_path),
        "path_waits": sum(1 for p in on_path if p.get("wait_ms", 0) >= 1),
        "path_wait_ms": round(sum(p.get("wait_ms", 0) for p in on_path)),
        "path_save_waits": sum(1 for p in on_path if p.get("save_wait_ms", 0) >= 1),
        "path_save_wait_ms": round(sum(p.get("save_wait_ms", 0) for p in on_path)),
        "path_restores": sum(1 for p in on_path if p.get("restore_ms")),
        "path_restore_ms": round(sum(p.get("restore_ms", 0) for p in on_path)),
        "path_restore_bytes": sum(p.get("restored_tokens", 0) for p in on_path) * kv_bytes_per_token,
        "load_max": max((a.get("load", 0) for a, _ in pairs), default=0),
        "alone_seconds": [round(a["seconds"], 4) for a, _ in pairs],
        "alone_cache_n_median": statistics.median(a["cache_n"] or 0 for a, _ in pairs),
        "proxy_cache_n_median": statistics.median(p["cache_n"] or 0 for _, p in pairs),
        # tokens computed: what the machine's load does not change
        "alone_prompt_n_median": statistics.median(a["prompt_n"] or 0 for a, _ in pairs),
        "proxy_prompt_n_median": statistics.median(p["prompt_n"] or 0 for _, p in pairs),
        "alone_prompt_ms_median": round(statistics.median(a["prompt_ms"] or 0 for a, _ in pairs), 1),
        "proxy_prompt_ms_median": round(statistics.median(p["prompt_ms"] or 0 for _, p in pairs), 1),
    }


def siblings(pair: Pair, size: int, count: int, pause: float, max_tokens: int, seed: str,
             kv: int) -> dict[str, Any]:
    rng = random.Random(seed)
    context = "Repository context. " + words(rng, size)
    pair.both(0, context, "Summarize the repository. " + words(rng, 60), max_tokens)  # both compute it once
    results = []
    for n in range(count):
        if pause:
            time.sleep(pause)
        results.append(pair.both(n, context, f"Question {n}: " + words(rng, 60), max_tokens))
    return {"size_chars": size, "pause_s": pause, **summary(results, kv), "raw": results}


def switch(pair: Pair, size: int, count: int, max_tokens: int, seed: str, kv: int) -> dict[str, Any]:
    """Two contexts alternating on the slots: later requests of each are siblings of its earlier ones."""
    rng = random.Random(seed)
    contexts = ["Repository A. " + words(rng, size), "Repository B. " + words(rng, size)]
    for n, context in enumerate(contexts):
        pair.both(n, context, "Summarize the repository. " + words(rng, 60), max_tokens)
    results = []
    for n in range(count):
        results.append(pair.both(n, contexts[n % 2], f"Question {n}: " + words(rng, 60), max_tokens))
    return {"size_chars": size, "pause_s": 0, "contexts": 2, **summary(results, kv), "raw": results}


def save(out: dict[str, Any], prefix: str | None) -> None:
    """Write what was measured so far (a run cut short keeps its results)."""
    if prefix:
        Path(prefix + ".json").write_text(json.dumps(out, indent=1))
        Path(prefix + ".md").write_text(markdown(out))


def run(args: argparse.Namespace) -> dict[str, Any]:
    workroot = Path(args.workdir or tempfile.mkdtemp(prefix="bench-siblings-"))
    out: dict[str, Any] = {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    for model_name in args.models.split(","):
        shape = PRESETS[model_name]
        model = ensure_model(DEFAULT_MODELS, shape)
        sizes, switch_sizes = model_sizes(args, model_name, shape.kv_bytes_per_token)
        kv = shape.kv_bytes_per_token
        ctx = max(sizes) + 1024
        for slots in [int(s) for s in args.slots.split(",")]:
            workdir = workroot / f"{model_name}-{slots}"
            wait_until_quiet(args.quiet_wait)
            with Pair(model, slots, ctx, workdir, args.binary, args.threads) as pair:
                for size in sizes:
                    for pause in (0.0, args.pause):
                        log(f"{model_name}: {slots} slot(s), {size} chars, pause {pause} s")
                        result = siblings(pair, size, args.siblings, pause, args.max_tokens, f"{size}-{pause}", kv)
                        out["runs"].append({"model": model_name, "kv_bytes_per_token": shape.kv_bytes_per_token,
                                            "slots": slots, "workload": "siblings", **result})
                        log(_line(out["runs"][-1]))
                        save(out, args.out)
                    if slots == 1 and size in switch_sizes:
                        log(f"{model_name}: {slots} slot(s), {size} chars, two contexts alternating")
                        result = switch(pair, size, args.siblings, args.max_tokens, f"switch-{size}", kv)
                        out["runs"].append({"model": model_name, "kv_bytes_per_token": shape.kv_bytes_per_token,
                                            "slots": slots, "workload": "switch", **result})
                        log(_line(out["runs"][-1]))
                        save(out, args.out)
                status = http("GET", pair.proxy.url + "/status")[2]
                out["runs"][-1]["proxy_disk"] = {k: status["disk"][k] for k in ("saves", "restores", "saved_bytes")}
    return out


def model_sizes(args: argparse.Namespace, name: str, kv_bytes_per_token: int) -> tuple[list[int], list[int]]:
    """The context sizes (siblings, switch) for a model: its KV class's options."""
    def ints(text: str) -> list[int]:
        return [int(s) for s in text.split(",") if s]

    if kv_bytes_per_token <= 100_000:
        return ints(args.sizes), ints(args.switch_sizes)
    sizes = ints(args.sizes_kv30b or args.sizes_kv) if name == "kv30b" else ints(args.sizes_kv)
    return sizes, ints(args.switch_sizes_kv)


def _line(run: dict[str, Any]) -> str:
    return (
        f"{run['model']} {run['slots']} slot(s) {run['workload']} {run['size_chars']} chars pause {run['pause_s']}: "
        f"alone {run['alone_median_s']:.3f} s, proxy {run['proxy_median_s']:.3f} s ({run['ratio']:.2f}x), "
        f"outside llama.cpp {run['alone_outside_ms_median']:.0f} / {run['proxy_outside_ms_median']:.0f} ms, "
        f"path {run['proxy_path_ms_median']:.0f} ms median, {run['proxy_decisions']}"
    )


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# Siblings off one context: proxycache against llama-server alone",
        "",
        f"`{out['command']}` ({out['started']}). Two identical llama-servers (`-np S --cache-ram 0"
        " --slot-save-path`), one behind proxycache; median latency of the sibling requests (each a new last"
        " question against the same context, 8 answer tokens), both servers asked in turn.",
        "",
        "`outside llama.cpp`: the request's time beyond llama.cpp's own prefill and decode (its `timings`),"
        " which the machine's load on llama.cpp's threads does not blur.",
        "",
        "`verdict`: issue 24's target, within 5% of llama-server alone where it reuses in place (never worse),"
        " the restore win kept where it recomputes (switch).  `est.` is the load-robust ratio: alone's median plus"
        " what the proxy added (its time outside llama.cpp beyond alone's, and any tokens it had llama.cpp compute"
        " beyond alone's at alone's seconds per token), over alone's median; `wall` the medians' ratio, `noisy`"
        " where the machine's load (1-min average over 3 with our one busy 2-thread server) or alone's own spread"
        " over 1.5x makes it say little (bench/verdict.py).",
        "",
        "| model (KV/token) | slots | workload | context chars | pause | alone | proxy | proxy/alone |"
        " outside llama.cpp alone / proxy | proxy path (median / max) | saves during the requests (n, MB;"
        " ms on the path) | waits for the slot (n, ms; of them behind a background save) |"
        " restores on the path (n, MB, ms) |"
        " prefilled tokens alone / proxy (median) | proxy decisions | verdict |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for run in out["runs"]:
        lines.append(
            f"| {run['model']} ({run['kv_bytes_per_token'] / 1024:g} KiB) | {run['slots']} | {run['workload']} |"
            f" {run['size_chars']} | {run['pause_s']:g} s | {run['alone_median_s']:.3f} s |"
            f" {run['proxy_median_s']:.3f} s | {run['ratio']:.2f}x |"
            f" {run['alone_outside_ms_median']:.0f} / {run['proxy_outside_ms_median']:.0f} ms |"
            f" {run['proxy_path_ms_median']:.0f} / {run['proxy_path_ms_max']:.0f} ms |"
            f" {_saves(run)} | {_waits(run)} | {_moves(run, 'restore')} |"
            f" {run['alone_prompt_n_median']:.0f} / {run['proxy_prompt_n_median']:.0f}{_most(run)} |"
            f" {', '.join(d or '?' for d in run['proxy_decisions'])} | {sibling_row(run).text()} |"
        )
    return "\n".join(lines) + "\n"


def _moves(run: dict[str, Any], kind: str) -> str:
    """Saves or restores on the siblings' paths, summed over the row: count, MB, ms (or '-')."""
    if f"path_{kind}s" not in run:
        return "?"  # a run from before these were recorded
    if not run[f"path_{kind}s"]:
        return "-"
    return f"{run[f'path_{kind}s']}, {run[f'path_{kind}_bytes'] / 1e6:.0f} MB, {run[f'path_{kind}_ms']} ms"


def _most(run: dict[str, Any]) -> str:
    """The largest prefill of a row's siblings, alone / proxy, where the median hides it."""
    pairs = run.get("raw") or []
    most = [max((side["prompt_n"] or 0) for side in sides) for sides in zip(*pairs)] if pairs else []
    if not most or max(most) <= 2 * max(run["alone_prompt_n_median"], run["proxy_prompt_n_median"]):
        return ""
    return f" (max {most[0]:.0f} / {most[1]:.0f})"


def _saves(run: dict[str, Any]) -> str:
    if "path_saves" not in run:
        return "?"
    if not run["path_saves"]:
        return "-"
    return f"{run['path_saves']}, {run['path_save_bytes'] / 1e6:.0f} MB; {run['path_save_ms']} ms"


def _waits(run: dict[str, Any]) -> str:
    if "path_waits" not in run:
        return "?"  # not recorded by this run (the proxy's log has it: wait=)
    if not run["path_waits"]:
        return "-"
    waits = f"{run['path_waits']}, {run['path_wait_ms']} ms"
    if run.get("path_save_waits"):  # recorded since X-Proxycache-Save-Wait-Ms
        waits += f" ({run['path_save_waits']} behind a save, {run['path_save_wait_ms']} ms)"
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bench", help="comma separated: " + ", ".join(PRESETS))
    parser.add_argument("--sizes", default="2000,8000,16000,30000", help="context sizes in characters")
    parser.add_argument("--sizes-kv", default="2000", help="sizes for 7B/30B-class KV models (their attention is slow)")
    parser.add_argument("--sizes-kv30b", default="", help="sizes for kv30b (default: --sizes-kv)")
    parser.add_argument("--switch-sizes", default="8000,16000", help="sizes of the two-context workload (1 slot)")
    parser.add_argument("--switch-sizes-kv", default="2000",
                        help="sizes of the two-context workload for 7B/30B-class KV models (those of their sizes)")
    parser.add_argument("--slots", default="1,2")
    parser.add_argument("--siblings", type=int, default=6)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between siblings in the paused runs")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--binary", default=None, help="llama-server binary (default: the one llamabin built, if any)")
    parser.add_argument("--quiet-wait", type=float, default=30.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--render", default=None, metavar="OUT", help="only render OUT.md again from OUT.json")
    args = parser.parse_args()
    if args.render:
        save(json.loads(Path(args.render + ".json").read_text()), args.render)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    if args.binary is None:
        from proxycache.testing.llamabin import binary_path

        found = binary_path()
        args.binary = str(found) if found.exists() else None
    out = run(args)
    print(markdown(out))
    save(out, args.out)


if __name__ == "__main__":
    main()
