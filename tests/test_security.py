"""
Who may talk to the proxy, and what a client can never do.
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from proxycache.config import Config
from tests.conversations import User
from proxycache.testing import ProxyProcess, http
from tests.fakes import InProcessDaemon

HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def test_listens_on_loopback_unless_told_otherwise():
    assert Config.load({}, {}).listen == "tcp:8081:interface=127.0.0.1"


@pytest.fixture(scope="module")
def keyed_proxy(module_llama, tmp_path_factory):
    proxy = ProxyProcess(tmp_path_factory.mktemp("keyed"), module_llama.url, api_keys="team-a-key,team-b-key").start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def keyed_in_process():
    """C{keyed_proxy}'s keys on the daemon's request path in process: a key is judged before any slot."""
    return InProcessDaemon(api_keys=("team-a-key", "team-b-key"))


@pytest.mark.parametrize("path, method, body", [
    ("/v1/chat/completions", "POST", HELLO),
    ("/v1/models", "GET", None),
    ("/tokenize", "POST", {"content": "x"}),
    ("/status", "GET", None),
    ("/metrics", "GET", None),
])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic team-a-key", "Bearer team-a-keyX"])
def test_api_key_required(keyed_in_process, path, method, body, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    status, response_headers, error = keyed_in_process.http(method, path, body, headers)
    assert status == 401
    assert error["error"]["code"] == "invalid_api_key"
    assert response_headers["WWW-Authenticate"] == "Bearer"


def test_right_keys_are_let_in(keyed_proxy):
    for key in ("team-a-key", "team-b-key"):
        completion = keyed_proxy.client(api_key=key).chat.completions.create(
            model="any", messages=HELLO["messages"], max_tokens=2
        )
        assert completion.choices
    assert http("GET", keyed_proxy.url + "/status", headers={"Authorization": "Bearer team-b-key"})[0] == 200
    with pytest.raises(openai.AuthenticationError):
        keyed_proxy.client(api_key="nope").chat.completions.create(model="any", messages=HELLO["messages"])
    # the page itself holds no data; its /status calls need the key
    assert http("GET", keyed_proxy.url + "/")[0] == 200
    assert http("GET", keyed_proxy.url + "/proxycache/health")[0] == 200


def test_probes_and_preflights_need_no_key(keyed_proxy):
    # Load balancers and uptime probes send no key; llama-server answers its /health without one too.
    for path in ("/health", "/v1/health", "/proxycache/health"):
        assert http("GET", keyed_proxy.url + path)[0] == 200, path
    # A browser's preflight carries no credentials: never a 401 (no origin is allowed here: a 403).
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, error = http("OPTIONS", keyed_proxy.url + "/v1/chat/completions", None, preflight)
    assert status == 403, error
    assert "Access-Control-Allow-Origin" not in headers


def test_health_can_require_a_key(module_llama, tmp_path):
    proxy = ProxyProcess(tmp_path, module_llama.url, {"HEALTH_REQUIRES_KEY": "1"}, api_keys="k").start(wait_ready=False)
    try:
        assert http("GET", proxy.url + "/health")[0] == 401
        assert http("GET", proxy.url + "/proxycache/health")[0] == 401
        assert http("GET", proxy.url + "/v1/health", api_key="k")[0] == 200
    finally:
        proxy.stop()


def test_upstream_api_key_is_forwarded(llama_factory, tmp_path):
    llama = llama_factory(api_key="llama-secret")
    # no backend ever becomes ready: the request waits out the queue timeout, then 503
    without = ProxyProcess(tmp_path / "without", llama.url, queue_timeout=2).start(wait_ready=False)
    try:
        status, _, error = http("POST", without.url + "/v1/chat/completions", HELLO)
        assert status == 503  # it cannot even read the slot count
    finally:
        without.stop()
    proxy = ProxyProcess(tmp_path / "with", llama.url, upstream_api_key="llama-secret").start()
    try:
        assert proxy.client().chat.completions.create(model="any", messages=HELLO["messages"], max_tokens=2).choices
    finally:
        proxy.stop()


def test_cache_files_are_never_named_from_client_text(llama, tmp_path):
    proxy = ProxyProcess(
        tmp_path, llama.url, slot_save_path=str(llama.save_dir), write_behind=0.1,
        min_prefix_chars=100, min_prefix_words=20, min_prefix_blocks=2,
    ).start()
    try:
        for name in ("../../etc/passwd", "slotcache_x.bin", "a/b\\c", "\u2603 snow"):
            user = User(name, context_words=100)
            user.turn(proxy.client(default_headers={"X-Proxycache-Pin": "1"}))
        import time

        time.sleep(1)
        names = [p.name for p in llama.save_dir.iterdir()]
        metas = [p.name for p in (tmp_path / "meta").iterdir()]
        assert names and all(re.fullmatch(r"slotcache_[0-9a-f]{16}\.bin", n) for n in names)
        assert metas and all(re.fullmatch(r"[0-9a-f]{16}\.meta", n) for n in metas)
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def open_proxy(module_llama, tmp_path_factory):
    """No keys, as most run it: only web pages are kept out."""
    proxy = ProxyProcess(tmp_path_factory.mktemp("open"), module_llama.url, cors_origins="https://app.example").start()
    yield proxy
    proxy.stop()


def test_a_web_page_cannot_drive_a_keyless_daemon(open_proxy):
    before = http("GET", open_proxy.url + "/status")[2]["totals"]["requests"]
    # What a hostile page's fetch(..., {mode: "no-cors", body: "..."}) sends: no preflight needed.
    simple = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    status, _, error = http("POST", open_proxy.url + "/v1/chat/completions", json.dumps(HELLO).encode(), simple)
    assert (status, error["error"]["code"]) == (403, "origin_not_allowed")
    for path in ("/status", "/metrics", "/v1/models", "/health"):
        assert http("GET", open_proxy.url + path, None, {"Origin": "https://evil.example"})[0] == 403
    # DNS rebinding: the page's own name resolves to 127.0.0.1 now, and it is same-origin with itself.
    rebound = {"Host": "evil.example:8081", "Origin": "http://evil.example:8081"}
    status, _, error = http("POST", open_proxy.url + "/v1/chat/completions", HELLO, rebound)
    assert (status, error["error"]["code"]) == (403, "host_not_allowed")
    assert http("GET", open_proxy.url + "/status", None, {"Host": "evil.example"})[0] == 403
    assert http("GET", open_proxy.url + "/status")[2]["totals"]["requests"] == before  # nothing ran


def test_clients_without_a_browser_keep_working(open_proxy):
    import anthropic

    assert open_proxy.client().chat.completions.create(model="any", messages=HELLO["messages"], max_tokens=2).choices
    claude = anthropic.Anthropic(base_url=open_proxy.url, api_key="unused", max_retries=0)
    assert claude.messages.create(model="any", max_tokens=2, messages=HELLO["messages"]).content is not None
    localhost = open_proxy.url.replace("127.0.0.1", "localhost")
    assert http("GET", localhost + "/status")[0] == 200
    # an allowed page, and the proxy's own page (same origin)
    status, headers, _ = http("POST", open_proxy.url + "/v1/chat/completions", HELLO, {"Origin": "https://app.example"})
    assert (status, headers["Access-Control-Allow-Origin"]) == (200, "https://app.example")
    assert http("POST", open_proxy.url + "/v1/chat/completions", HELLO, {"Origin": open_proxy.url})[0] == 200


HOSTILE_PAGE = """<!doctype html><title>cat pictures</title><script>
// What any page can do without a preflight: a "simple" POST, its answer unreadable, its effect not.
const body = JSON.stringify({messages: [{role: "user", content: "spend your slots " + "x ".repeat(400)}], max_tokens: 2});
Promise.allSettled([
  fetch("PROXY/v1/chat/completions", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body}),
  fetch("PROXY/v1/completions", {method: "POST", mode: "no-cors", body: '{"prompt": "x", "max_tokens": 2}'}),
  fetch("PROXY/status").then(r => r.text()).then(t => { document.body.dataset.status = t; }),
]).then(() => { document.body.dataset.done = "1"; });
</script>"""


@pytest.mark.browser
def test_a_page_in_a_real_browser_cannot_drive_the_daemon(open_proxy, tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.test_dashboard import find_chromium, render

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium")
    page = HOSTILE_PAGE.replace("PROXY", open_proxy.url).encode()

    class Hostile(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = http("GET", open_proxy.url + "/status")[2]["totals"]["requests"]
        dom = render(chromium, f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "profile", "--dump-dom")
        assert 'data-done="1"' in dom, dom  # the page ran its requests
        assert "data-status" not in dom  # and read nothing
        assert http("GET", open_proxy.url + "/status")[2]["totals"]["requests"] == before  # nothing was generated
    finally:
        server.shutdown()


@pytest.mark.browser
def test_a_rebound_name_in_a_real_browser_reads_nothing(open_proxy, tmp_path):
    """
    DNS rebinding as the browser sees it: a name of the attacker's now resolves
    to 127.0.0.1, so its page is same-origin with the proxy and sends no foreign
    Origin.  Here the proxy's own page stands in for the attacker's script: it
    reads /status same-origin, under that name.
    """
    from tests.test_dashboard import find_chromium, render

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium")
    port = open_proxy.port
    mapped = "--host-resolver-rules=MAP rebound.example 127.0.0.1"
    dom = render(chromium, f"http://localhost:{port}/", tmp_path / "local", "--dump-dom", mapped)
    assert re.search(r'<tr class="slot"', dom)  # under a loopback name the page reads /status
    dom = render(chromium, f"http://rebound.example:{port}/", tmp_path / "rebound", "--dump-dom", mapped)
    assert "host_not_allowed" in dom
    assert not re.search(r'<tr class="slot"', dom)
