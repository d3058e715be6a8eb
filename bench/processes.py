"""
The benchmark's own helpers around L{proxycache.testing}'s child processes:
CPU accounting, waiting for a quiet machine, and the proxy as the benchmark
runs it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from proxycache.testing import ProxyProcess


def Proxy(llama_url: str, workdir: Path, **options: Any) -> ProxyProcess:
    """C{twistd -n proxycache} in front of C{llama_url}, with the daemon's own health interval."""
    return ProxyProcess(workdir, llama_url, **{"health_interval": None, **options})


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine used, CPU seconds we and our reaped children used)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine, own.user + own.system + own.children_user + own.children_system


def foreign_cpu_share(machine_before: float, own_before: float, started: float) -> float:
    """
    Share of all cores that processes other than ours used since C{cpu_seconds()} gave
    (C{machine_before}, C{own_before}) at C{time.perf_counter()} C{started}: how disturbed timings are.
    """
    machine_after, own_after = cpu_seconds()
    foreign = (machine_after - machine_before) - (own_after - own_before)
    return max(0.0, foreign) / ((time.perf_counter() - started) * (os.cpu_count() or 1))


def wait_until_quiet(max_wait: float, busy_below: float = 0.15) -> float:
    """
    Wait until other processes leave the CPUs nearly idle (two 1-s samples
    under C{busy_below} of all cores), at most C{max_wait} s; returns the wait.
    """
    started = time.monotonic()
    quiet = 0
    cores = os.cpu_count() or 1
    while time.monotonic() - started < max_wait and quiet < 2:
        before, _ = cpu_seconds()
        time.sleep(1.0)
        after, _ = cpu_seconds()
        quiet = quiet + 1 if (after - before) / cores < busy_below else 0
    return time.monotonic() - started
