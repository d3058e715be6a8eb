"""
Load generator for L{bench.capacity}: C{python _load_client.py URL CLIENTS SECONDS BODY_JSON}.
Prints C{{"ok", "errors", "seconds", "latencies"}} as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import treq
from twisted.internet import defer, reactor, task
from twisted.web.client import HTTPConnectionPool


async def client(url: str, template: dict, n: int, until: float, pool: HTTPConnectionPool, out: dict) -> None:
    sent = 0
    while time.monotonic() < until:
        # Each request its own conversation: the same one would (rightly) wait for its slot.
        messages = [{"role": "user", "content": f"client {n} request {sent} " + template["messages"][0]["content"]}]
        body = json.dumps({**template, "messages": messages}).encode()
        sent += 1
        started = time.monotonic()
        try:
            response = await treq.post(url + "/v1/chat/completions", body, pool=pool,
                                       headers={b"content-type": [b"application/json"]})
            await response.content()
            ok = response.code == 200
        except Exception:
            ok = False
        if ok:
            out["ok"] += 1
            out["latencies"].append(time.monotonic() - started)
        else:
            out["errors"] += 1


async def run(url: str, clients: int, seconds: float, template: dict) -> dict:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = clients
    out = {"ok": 0, "errors": 0, "latencies": []}
    started = time.monotonic()
    until = started + seconds
    await defer.gatherResults([defer.Deferred.fromCoroutine(client(url, template, n, until, pool, out))
                               for n in range(clients)])
    out["seconds"] = time.monotonic() - started
    await pool.closeCachedConnections()
    return out


def main() -> None:
    url, clients, seconds, template = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])

    async def go(_reactor) -> None:
        print(json.dumps(await run(url, clients, seconds, template)))

    task.react(lambda r: defer.Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
