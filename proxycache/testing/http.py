"""
Small synchronous HTTP helpers for tests and benchmarks (urllib, no reactor),
and a parser for Prometheus' text format.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from email.message import Message
from typing import Any, Callable

from proxycache.embedded import free_port

__all__ = ["call", "free_port", "http", "prometheus"]


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    api_key: str | None = None,
) -> tuple[int, Message, Any]:
    """
    C{(status, headers, decoded JSON or raw bytes)}; HTTP errors are returned,
    not raised. C{body}: bytes as they are, anything else as JSON.
    """
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, head, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


def call(
    method: str, url: str, body: Any = None, timeout: float = 60.0, api_key: str | None = None
) -> tuple[int, Any]:
    """L{http} without the headers, a non-JSON body decoded to text."""
    status, _, reply = http(method, url, body, timeout=timeout, api_key=api_key)
    return status, reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def prometheus(text: str) -> dict[str, float]:
    """Prometheus text format as C{{"name{labels}": value}}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                pass
    return values


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll C{predicate} until it returns something true (returned), or fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
