"""
Test support for proxycache, importable by tests and benchmarks (like
C{treq.testing}): real llama.cpp servers and the real daemon as child
processes, a small synchronous HTTP helper, a TCP tap that keeps llama.cpp's
replies (L{ReplyTap}), a Prometheus text parser and a C{llama-server} binary
built from source.
"""

from proxycache.testing.http import call, free_port, http, prometheus, wait_for
from proxycache.testing.processes import (
    TWISTD,
    ChildProcess,
    LlamaHTTPError,
    LlamaProcess,
    ProxyProcess,
    open_raw_chat,
    send_raw_chat,
)
from proxycache.testing.tap import ReplyTap

__all__ = [
    "TWISTD",
    "ChildProcess",
    "LlamaHTTPError",
    "LlamaProcess",
    "ProxyProcess",
    "ReplyTap",
    "call",
    "free_port",
    "http",
    "open_raw_chat",
    "prometheus",
    "send_raw_chat",
    "wait_for",
]
