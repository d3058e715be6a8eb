"""
Running it as a service: unit files, version, config precedence, logs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxycache import __version__
from proxycache.config import Config, ConfigError, read_config_file, resolve
from proxycache.testing import TWISTD, ProxyProcess, http

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(p.name for p in [*CONTRIB.glob("*.service"), *CONTRIB.glob("*.socket")]))
def test_unit_files_verify(unit, tmp_path):
    # every unit beside it, as installed: a service requires its socket, a socket needs its service
    for path in [*CONTRIB.glob("*.service"), *CONTRIB.glob("*.socket")]:
        text = path.read_text()
        # verify checks that executables exist: point them at one that does
        for command in (
            "/opt/proxycache/bin/twistd",
            "%h/.local/share/proxycache/venv/bin/twistd",
            "/usr/local/bin/llama-server",
        ):
            text = text.replace(command, sys.executable)
        (tmp_path / path.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_version_everywhere(llama, tmp_path):
    result = subprocess.run([TWISTD, "proxycache", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"proxycache {__version__}"
    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        status, headers, _ = http(
            "POST",
            proxy.url + "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        )
        assert headers["X-Proxycache-Version"] == __version__
        assert proxy.status()["version"] == __version__
        assert http("GET", proxy.url + "/proxycache/health")[2]["version"] == __version__
    finally:
        proxy.stop()


def test_precedence_option_env_file_default(tmp_path):
    ini = tmp_path / "proxycache.ini"
    ini.write_text("[proxycache]\nslots = 3\nmax-queue = 7\nSIMILARITY_MIN_RATIO = 0.5\nblock_words = 8\n")
    file = read_config_file(str(ini))
    resolved = resolve({"slots": "5"}, {"SLOTS_COUNT": "4", "MAX_QUEUE": "9"}, file)
    assert resolved["slots"] == (5, "option")
    assert resolved["max_queue"] == (9, "env")
    assert resolved["similarity_min_ratio"] == (0.5, "file")
    assert resolved["block_words"] == (8, "file")
    assert resolved["affinity_wait"] == (30.0, "default")


def test_config_file_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[proxycache]\nno_such_thing = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'no_such_thing'"):
        read_config_file(str(bad))
    bad.write_text("[proxycache]\nslots = many\n")
    with pytest.raises(ConfigError, match="slots in the config file='many': must be a whole number"):
        Config.load({}, {}, read_config_file(str(bad)))


def test_print_config_shows_sources(tmp_path):
    ini = tmp_path / "p.ini"
    ini.write_text("[proxycache]\nmax_queue = 11\n")
    result = subprocess.run(
        [TWISTD, "proxycache", "--config", str(ini), "--slots", "2", "--print-config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "MAX_CACHE_ENTRIES": "3"},
    )
    assert "slots = 2  [option]" in result.stdout
    assert "max-cache-entries = 3  [env]" in result.stdout
    assert "max-queue = 11  [file]" in result.stdout
    assert "similarity-min-ratio = 0.85  [default]" in result.stdout


def test_logs_carry_no_prompt_text_by_default(llama, tmp_path):
    secret = "the launch code is swordfish"
    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        proxy.client().chat.completions.create(
            model="any", messages=[{"role": "user", "content": secret}], max_tokens=2
        )
    finally:
        proxy.stop()
    log = proxy.log_text()
    assert "slot=" in log  # the request line is there
    assert "swordfish" not in log


def test_json_logs_for_log_shippers(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url)
    proxy.log_path = tmp_path / "proxy.json"
    argv = proxy.argv
    proxy.argv = lambda: [
        a if not a.startswith("--logfile=") else "--logger=proxycache.logs.json_to_stdout" for a in argv()
    ]
    with open(tmp_path / "proxy.json", "wb") as out:
        process = subprocess.Popen(proxy.argv(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        proxy.process = process
        try:
            import time

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if http("GET", proxy.url + "/proxycache/health", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            proxy.client().chat.completions.create(
                model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        finally:
            proxy.stop()
    records = [json.loads(line) for line in (tmp_path / "proxy.json").read_text().splitlines() if line.strip()]
    request_lines = [r for r in records if r.get("log_namespace") == "proxycache.slots._dispatch"]
    assert request_lines and request_lines[0]["decision"] in ("miss", "small")


def test_logfile_rotates_on_sigusr1(llama, tmp_path):
    import signal
    import time

    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        proxy.process.send_signal(signal.SIGUSR1)
        rotated = proxy.log_path.with_name(proxy.log_path.name + ".1")
        deadline = time.monotonic() + 10
        while not rotated.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rotated.exists()
        http("GET", proxy.url + "/proxycache/health")
        time.sleep(0.2)
        assert "GET /proxycache/health" in proxy.log_text()  # the new file is written
    finally:
        proxy.stop()


def _read_all(sock) -> bytes:
    sock.settimeout(60)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_sigterm_lets_requests_in_flight_finish(llama, tmp_path):
    import signal

    from proxycache.testing import open_raw_chat

    proxy = ProxyProcess(tmp_path, llama.url, grace=120).start()
    sock = open_raw_chat(
        proxy.port,
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True, "ignore_eos": True},
    )
    first = sock.recv(65536)
    assert b"200 OK" in first
    proxy.process.send_signal(signal.SIGTERM)
    body = (first + _read_all(sock)).decode(errors="replace")
    assert body.count("data: [DONE]") == 1  # the stream ran to its end
    assert '"finish_reason":"length"' in body
    assert proxy.process.wait(150) in (0, -15)
    assert "waiting up to 120s for 1 requests in flight" in proxy.log_text()


def test_a_second_signal_exits_at_once(llama, tmp_path):
    import signal
    import time

    from proxycache.testing import open_raw_chat

    proxy = ProxyProcess(tmp_path, llama.url, grace=600).start()
    sock = open_raw_chat(
        proxy.port,
        {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 8000,
            "n_probs": 10,
            "stream": True,
            "ignore_eos": True,
        },
    )
    assert b"200 OK" in sock.recv(4096)  # and never read more: the stream cannot finish
    proxy.process.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proxy.process.poll() is None  # draining, up to 600 s
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(10) == 1
    sock.close()


def test_plain_install_ships_the_plugin(tmp_path):
    """A non-editable install (a wheel) carries twisted/plugins/proxycache_plugin.py and twistd finds it."""
    import os
    import zipfile

    # build from a copy: setuptools leaves build/ and *.egg-info next to the sources
    source = tmp_path / "source"
    shutil.copytree(
        Path(__file__).resolve().parent.parent,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"
        ),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("proxycache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/proxycache_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "proxycache/static/dashboard.html" in names
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, proxycache; print(proxycache.__file__); from twisted.scripts.twistd import run; "
            "sys.argv = ['twistd', 'proxycache', '--version']; run()",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.stdout.splitlines()[0].startswith(str(target))  # the installed copy, not the checkout
    assert f"proxycache {__version__}" in result.stdout
