"""
C{twistd proxycache}'s options and service tree, in-process: options parsed
as twistd would, C{makeService} building the tree on a memory reactor.
"""

from __future__ import annotations

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from proxycache.service import DrainService, Options, OrderedServices, build


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_options_become_a_frozen_config(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYCACHE_CONFIG", raising=False)
    options = parse("--llama-url", "http://127.0.0.1:9/", "--max-queue", "3", "--meta-dir", str(tmp_path))
    assert options.config.llama_url == ("http://127.0.0.1:9",)
    assert options.config.max_queue == 3


def test_bad_values_are_usage_errors():
    with pytest.raises(usage.UsageError, match="max-queue"):
        parse("--max-queue", "lots")


def test_the_tree_stops_in_reverse_order(tmp_path):
    config = parse("--meta-dir", str(tmp_path / "meta"), "--listen", "tcp:0:interface=127.0.0.1").config
    top = build(config, MemoryReactorClock())
    assert isinstance(top, OrderedServices)
    assert IServiceCollection.providedBy(top)
    kinds = [type(service).__name__ for service in top]
    # the disk tier flushes after the drain and the port closed; llama.cpp (when embedded) stops last
    assert kinds == ["DiskTier", "Monitor", "DrainService", "StreamServerEndpointService"]
    assert any(isinstance(service, DrainService) for service in top)


@pytest.mark.parametrize(
    "url, complaint",
    [
        ("127.0.0.1:8080", "not an http"),
        ("http://127.0.0.1:eighty", "not a port number"),
        ("http://:8080", "names no host"),
        # treq fails every request to one (hyperlink IDNA-encodes "::1"): said at start, not in tracebacks
        ("http://[::1]:8080", "IPv6"),
    ],
)
def test_a_backend_url_that_cannot_work_stops_startup(url, complaint):
    with pytest.raises(usage.UsageError, match=complaint):
        parse("--llama-url", url)
