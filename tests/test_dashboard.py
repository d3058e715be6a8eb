"""
The status page in a real browser (headless Chromium), while requests run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

import pytest

from tests.conversations import User
from proxycache.testing import ProxyProcess


def find_chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    # CI and fresh machines: install Debian's Chromium (root only).
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=900,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("Chromium is not installed and cannot be (not root, or no apt-get)")
    return path


def render(chromium: str, url: str, profile, *extra: str) -> str:
    result = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--virtual-time-budget=4000", *extra, url,
        ],
        capture_output=True, text=True, timeout=120,
    )
    return result.stdout


@pytest.mark.browser
def test_page_shows_slots_and_a_hit(chromium, llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, min_prefix_chars=1000, min_prefix_words=150, min_prefix_blocks=8).start()
    try:
        client = proxy.client()
        alice = User("alice")
        alice.turn(client)
        # requests keep running while the page loads
        background = threading.Thread(target=lambda: [User(f"bg{i}").turn(proxy.client()) for i in range(3)])
        background.start()
        assert alice.turn(client)["decision"] == "hit"
        dom = render(chromium, proxy.url + "/", tmp_path / "profile", "--dump-dom")
        background.join()
        rows = re.findall(r'<tr class="slot" data-state="(\w+)" data-slot="(\d)">', dom)
        assert sorted(slot for _, slot in rows) == ["0", "1"]
        assert any(state == "hot" for state, _ in rows)
        assert re.search(r'<tr class="request" data-decision="hit">', dom)
        assert re.search(r'<tr class="tenant" data-tenant="ip:127.0.0.1">', dom)  # who used the slots
        assert '<div id="error"></div>' in dom
        assert re.search(r'id="hit-rate">\d+%<', dom)
        assert 'class="bar"' in dom  # the chart drew
    finally:
        proxy.stop()


@pytest.mark.browser
def test_page_asks_for_the_api_key(chromium, llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, api_keys="k1").start()
    try:
        dom = render(chromium, proxy.url + "/dashboard", tmp_path / "profile", "--dump-dom")
        assert '<div id="error">this proxy needs an API key</div>' in dom
        assert '<tr class="slot"' not in dom
    finally:
        proxy.stop()
