"""
The benchmark's small measurements: proxy overhead on a hit, streaming
throughput through the proxy, fingerprint time, restore throughput and the
disk's sequential read.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import urllib.parse
import time
from pathlib import Path
from typing import Any

from proxycache.testing import LlamaProcess
from proxycache.testing.workload import Workload, filler, make_client


def drop_page_cache() -> bool:
    """Drop clean pages from the page cache (root only); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def timed_chat_seconds(client: Any, messages: list[dict]) -> float:
    started = time.perf_counter()
    client.chat.completions.create(model="any", messages=messages, max_tokens=1, temperature=0)
    return time.perf_counter() - started


def proxy_overhead(direct_url: str, proxy_url: str, rounds: int = 100) -> dict[str, float]:
    """
    p50 seconds of a tiny non-stream request direct to llama.cpp and through the
    proxy, alternating, after a warm-up that leaves the prompt cached in every slot.
    """
    direct, proxied = make_client(direct_url + "/v1"), make_client(proxy_url + "/v1")
    messages = [{"role": "user", "content": "Say hi."}]
    for _ in range(5):
        timed_chat_seconds(direct, messages)
        timed_chat_seconds(proxied, messages)
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(rounds):
        times["direct"].append(timed_chat_seconds(direct, messages))
        times["proxy"].append(timed_chat_seconds(proxied, messages))
    p50 = {name: statistics.median(values) for name, values in times.items()}
    return {
        "rounds": rounds,
        "direct_p50_ms": p50["direct"] * 1000,
        "proxy_p50_ms": p50["proxy"] * 1000,
        "added_p50_ms": (p50["proxy"] - p50["direct"]) * 1000,
    }


def stream_content_chunks(url: str, body: dict[str, Any]) -> tuple[int, float]:
    """
    POST a streamed chat with a minimal client (http.client, so that the client
    is not the bottleneck); returns (chunks with content, seconds from the first to the last).
    """
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        chunks, first = 0, None
        for line in response:
            if line.startswith(b"data: ") and b'"content":"' in line:
                chunks += 1
                if first is None:
                    first = time.perf_counter()
        return chunks, time.perf_counter() - (first or time.perf_counter())
    finally:
        connection.close()


def streaming_rate(direct_url: str, proxy_url: str, tokens: int = 3000, runs: int = 3) -> dict[str, float]:
    """
    Streamed tokens per second after the first, direct and through the proxy,
    of a long answer of ASCII tokens (see L{Workload.ascii_answers}: each one
    is sent as it is generated).
    """
    body = {"model": "any", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": tokens,
            "temperature": 0, "stream": True, **Workload(ascii_answers=True).sampling()}
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(runs):
        for name, url in (("direct", direct_url), ("proxy", proxy_url)):
            chunks, seconds = stream_content_chunks(url, body)
            rates[name].append((chunks - 1) / seconds)
    direct, proxy = statistics.median(rates["direct"]), statistics.median(rates["proxy"])
    return {"tokens": tokens, "runs": runs, "direct_tokens_per_s": direct, "proxy_tokens_per_s": proxy,
            "proxy_vs_direct": proxy / direct}


def conversation_of(tokens: int, turns: int = 20) -> dict[str, Any]:
    """A chat request of about C{tokens} bytes: a large context and C{turns} exchanges."""
    import random

    rng = random.Random(60)
    per_turn = tokens // (4 * turns)
    messages = [{"role": "system", "content": filler(rng, tokens - 2 * turns * per_turn)}]
    for _ in range(turns):
        messages.append({"role": "user", "content": filler(rng, per_turn)})
        messages.append({"role": "assistant", "content": filler(rng, per_turn)})
    return {"model": "any", "messages": messages}


def fingerprint_time(tokens: int = 60_000, runs: int = 20) -> dict[str, float]:
    """Median seconds of proxycache.fingerprint.fingerprint on a C{tokens}-byte conversation."""
    from proxycache.routing import conversation_text, fingerprint

    request = conversation_of(tokens)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fp = fingerprint(request)
        times.append(time.perf_counter() - started)
    return {"bytes": len(conversation_text(request).encode()), "blocks": len(fp.blocks), "runs": runs,
            "median_ms": statistics.median(times) * 1000}


def disk_read(directory: Path, size: int = 512 * 1024 * 1024) -> dict[str, Any]:
    """Sequential read of a fresh C{size}-byte file, from disk when the page cache can be dropped."""
    path = directory / "disk-read-test.bin"
    chunk = os.urandom(16 * 1024 * 1024)
    try:
        with open(path, "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        cold = drop_page_cache()
        started = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while f.read(len(chunk)):
                pass
        seconds = time.perf_counter() - started
    finally:
        path.unlink(missing_ok=True)
    return {"bytes": size, "seconds": seconds, "bytes_per_s": size / seconds, "page_cache_dropped": cold}


def restore_throughput(llama: LlamaProcess, save_dir: Path, slot: int = 0, pause: float = 0.5) -> dict[str, Any]:
    """
    Restore every saved slot file into C{slot}, from disk (page cache dropped
    first, when allowed) and again warm; bytes/s from llama.cpp's replies.

    Restores are C{pause} s apart: back to back, llama.cpp's restores ran
    several times slower here (its idle threads still spinning?), and a proxy
    restores between requests, not back to back.
    """
    files = sorted(p.name for p in save_dir.glob("*.bin"))
    result: dict[str, Any] = {"files": len(files), "pause_s": pause}
    for phase in ("cold", "warm"):
        n_read, rates, walls, dropped = 0, [], [], False
        for name in files * (1 if phase == "cold" else 3):
            dropped = drop_page_cache() if phase == "cold" else False
            time.sleep(pause)
            started = time.perf_counter()
            reply = llama.post_json(f"/slots/{slot}?action=restore", {"filename": name})
            wall = time.perf_counter() - started
            size, ms = int(reply.get("n_read", 0)), float(reply.get("timings", {}).get("restore_ms", 0))
            n_read += size
            if ms:
                rates.append(size / (ms / 1000))
            walls.append(size / wall)
        result[phase] = {
            "bytes": n_read,
            "bytes_per_s": statistics.median(rates) if rates else None,
            "best_bytes_per_s": max(rates) if rates else None,
            "bytes_per_s_wall": statistics.median(walls) if walls else None,
            "page_cache_dropped": dropped,
        }
    llama.post_json(f"/slots/{slot}?action=erase", {})
    return result
