"""
Upstream and client faults: the daemon answers clearly, frees the slot and
keeps serving.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from proxycache.testing import ProxyProcess, http, open_raw_chat, send_raw_chat
from tests.stub_llama import StubLlama

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def stub():
    server = StubLlama()
    yield server
    server.close()


@pytest.fixture
def stub_proxy(stub, tmp_path):
    proxy = ProxyProcess(tmp_path, stub.url, first_byte_timeout=1, stream_idle_timeout=1).start()
    yield proxy
    proxy.stop()


def ask(proxy, content, stream=False):
    return http(
        "POST",
        proxy.url + "/v1/chat/completions",
        {"messages": [{"role": "user", "content": content}], "stream": stream},
        timeout=20,
    )


def assert_all_free(proxy, within=5.0):
    # A slot whose request was given up on stays leased until llama-server shows it idle: one
    # GET /slots after the error answer, which the client may see before that look comes back.
    deadline = time.monotonic() + within
    while True:
        status = proxy.status()
        free = status["queue_depth"] == 0 and not any(slot["busy"] for slot in status["slots"])
        if free or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status["queue_depth"] == 0
    assert not any(slot["busy"] for slot in status["slots"])


def test_slow_first_byte_is_a_504(stub_proxy):
    status, _, body = ask(stub_proxy, "slow-headers")
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert_all_free(stub_proxy)
    assert ask(stub_proxy, "fine")[0] == 200


def test_stalled_body_is_a_504(stub_proxy):
    status, _, body = ask(stub_proxy, "stall-body")
    # headers were not sent to the client yet for a non-stream request
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    assert_all_free(stub_proxy)


def test_stalled_stream_ends_with_an_error_event(stub_proxy):
    status, headers, raw = ask(stub_proxy, "stall-stream", stream=True)
    assert status == 200
    text = raw.decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"]
    error = json.loads(events[-2])["error"]
    assert "no data from llama-server" in error["message"]
    assert events[-1] == "[DONE]" and text.count("[DONE]") == 1
    assert_all_free(stub_proxy)


@pytest.mark.parametrize(
    "content, status, kind", [("error-503", 503, "unavailable_error"), ("error-418", 418, "odd_error")]
)
def test_upstream_errors_keep_status_and_body(stub_proxy, content, status, kind):
    got, _, body = ask(stub_proxy, content)
    assert got == status and body["error"]["type"] == kind
    assert_all_free(stub_proxy)


def test_llama_server_killed_mid_stream(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url, queue_timeout=1).start()
    try:
        connection = open_raw_chat(
            proxy.port, {"messages": HELLO, "max_tokens": 6000, "stream": True, "ignore_eos": True}
        )
        received = connection.recv(65536)
        assert b"200 OK" in received
        llama.kill()
        connection.settimeout(10)
        while b"0\r\n\r\n" not in received[-16:]:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
        text = received.decode(errors="replace")
        assert "llama-server broke off the stream" in text
        assert text.count("data: [DONE]") == 1
        assert_all_free(proxy)
        status, _, error = http("POST", proxy.url + "/v1/chat/completions", {"messages": HELLO})
        assert status == 503 and error["error"]["code"] == "upstream_unavailable"
    finally:
        proxy.stop()


def stream_never_read(proxy):
    """A long stream asked for on a small socket that is then never read."""
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", proxy.port))
    # n_probs makes each event ~2 kB: far more than the socket buffers hold
    send_raw_chat(stalled, {"messages": HELLO, "max_tokens": 8000, "n_probs": 10, "stream": True, "ignore_eos": True})
    return stalled


def test_slow_reader_holds_back_only_its_own_slot(llama, tmp_path):
    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        stalled = stream_never_read(proxy)
        time.sleep(1)
        for i in range(5):
            status, _, _ = http(
                "POST",
                proxy.url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": f"other {i}"}], "max_tokens": 8},
            )
            assert status == 200
        busy = [slot for slot in proxy.status()["slots"] if slot["busy"]]
        assert len(busy) == 1  # only the stalled reader's slot
        # back-pressure: llama.cpp was paused, not left generating into our memory
        assert llama.metrics()["llamacpp:tokens_predicted_total"] < 8000
        assert any(slot["is_processing"] for slot in llama.slots())
        stalled.close()
    finally:
        proxy.stop()


def test_a_client_that_takes_nothing_is_let_go_and_its_slot_freed(llama, tmp_path):
    # A laptop closed mid-answer keeps its connection open and reads nothing: without the client-stall
    # rule its slot stayed busy until the upstream idle timeout (300 s by default).
    from proxycache.testing import wait_for

    proxy = ProxyProcess(tmp_path, llama.url, client_stall_timeout=2).start()
    try:
        stalled = stream_never_read(proxy)
        wait_for(lambda: any(slot["busy"] for slot in proxy.status()["slots"]), what="the stream under way")
        wait_for(lambda: not any(slot["busy"] for slot in proxy.status()["slots"]), what="the slot freed", timeout=60)
        wait_for(lambda: not any(slot["is_processing"] for slot in llama.slots()), what="llama.cpp stopped")
        assert llama.metrics()["llamacpp:tokens_predicted_total"] < 8000  # paused, then stopped
        assert "took nothing for 2 s" in proxy.log_text()
        stalled.close()
    finally:
        proxy.stop()


def test_client_gone_during_an_eviction_save(stub, tmp_path):
    """The save runs to its end and the slot is handed on only after it: nothing lost, no overlap."""
    proxy = ProxyProcess(
        tmp_path, stub.url, min_prefix_chars=10, min_prefix_words=2, min_prefix_blocks=1, write_behind=60
    ).start()
    try:
        for user in ("ana", "ben"):
            assert ask(proxy, f"{user} " + "word " * 40)[0] == 200
        # a third conversation evicts ana's slot: its save takes 1.5 s; leave during it
        with open_raw_chat(proxy.port, {"messages": [{"role": "user", "content": "cai " + "word " * 40}]}):
            # leave once the save is under way (not before the proxy even read the request)
            deadline = time.monotonic() + 5
            while not any("action=save" in path for path, _ in stub.requests) and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(0.1)
        assert any(slot["busy"] for slot in proxy.status()["slots"])  # still saving
        deadline = time.monotonic() + 5
        while any(slot["busy"] for slot in proxy.status()["slots"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(slot["busy"] for slot in proxy.status()["slots"])
        assert [p for p in stub.actions_done if "action=save" in p]
        assert len(list((tmp_path / "meta").glob("*.meta"))) == 1  # ana's cache is indexed
        assert ask(proxy, "dee " + "word " * 40)[0] == 200
    finally:
        proxy.stop()


def test_timings_kept_when_the_client_hangs_up_at_done(stub_proxy):
    """SDKs close the connection once they read [DONE]: the slot map still learns llama.cpp's timings."""
    sock = open_raw_chat(
        stub_proxy.port, {"messages": [{"role": "user", "content": "done-then-linger"}], "stream": True}
    )
    received = b""
    while b"data: [DONE]" not in received:
        received += sock.recv(65536)
    sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not stub_proxy.status()["recent"]:
        time.sleep(0.05)
    record = stub_proxy.status()["recent"][0]
    assert (record["status"], record["cache_n"], record["prompt_n"]) == (200, 4000, 12)


def test_monitor_survives_a_slots_reply_cut_in_its_headers(stub, tmp_path):
    proxy = ProxyProcess(tmp_path, stub.url, health_interval=0.3).start()
    try:
        assert ask(proxy, "fine")[0] == 200  # slot 0 now holds a conversation
        stub.cut_slots_replies(2)  # two polls in a row break off: the monitor must poll on after each
        deadline = time.monotonic() + 15
        while stub.slots_cut_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stub.slots_cut_pending
        stub.restart()
        deadline = time.monotonic() + 15
        while proxy.status()["backends"][0]["restarts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proxy.status()["backends"][0]["restarts"] == 1  # still polling: the restart was seen
        assert ask(proxy, "fine")[0] == 200
    finally:
        proxy.stop()


def generating(llama):
    """The slots llama.cpp itself reports busy."""
    return {slot["id"] for slot in llama.slots() if slot["is_processing"]}


def leave_a_long_whole_answer(proxy, llama, max_tokens):
    """A client asks for a long whole answer and hangs up while llama.cpp generates it; returns its slot."""
    from proxycache.testing import wait_for

    body = {"messages": HELLO, "max_tokens": max_tokens, "ignore_eos": True}
    with open_raw_chat(proxy.port, body):
        [busy] = wait_for(lambda: generating(llama), what="llama.cpp generating")
    wait_for(lambda: "left before llama-server answered" in proxy.log_text(), what="the request cancelled")
    return busy


def test_a_client_gone_before_its_answer_is_no_failure_of_llama_server(llama, tmp_path):
    # A whole answer: llama.cpp sends its headers only once it has generated, so the client leaves
    # while the proxy waits for them.  Its request is cancelled: no 503, no traceback, no lost slot.
    # b11434 and b11549 go on generating a whole answer whose connection closed (they see a closed
    # connection only when writing a stream): the slot is shown busy until they stop.
    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        orphaned = leave_a_long_whole_answer(proxy, llama, 4000)
        shown = {slot["slot"]: slot["busy"] for slot in proxy.status()["slots"]}
        assert orphaned in generating(llama), "the test needs llama.cpp still generating"
        assert shown == {orphaned: True, 1 - orphaned: False}  # the truth, as llama.cpp still generates
        log = proxy.log_text()
        assert "Unhandled Error" not in log and "not available" not in log, log
        status, headers, _ = http("POST", proxy.url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
        assert (status, headers["x-proxycache-slot"]) == (200, str(1 - orphaned))
    finally:
        # A graceful stop is not held up by llama.cpp's orphaned generation (nor killed after 30 s);
        # twistd ends with the signal it was stopped by.
        assert proxy.stop() in (0, -15)
        assert "Main loop terminated" in proxy.log_text()


def test_no_request_is_sent_to_a_slot_still_generating_an_answer_nobody_waits_for(llama, tmp_path):
    # llama.cpp would defer a request sent there until the orphan's max_tokens are generated, its
    # wait shown nowhere, the other slot idle meanwhile: the proxy keeps the slot until llama.cpp stops.
    from proxycache.testing import wait_for

    proxy = ProxyProcess(tmp_path, llama.url).start()
    try:
        orphaned = leave_a_long_whole_answer(proxy, llama, 3000)
        for n in range(3):  # each would take the least recently used slot: the orphan's, once freed
            status, headers, _ = http(
                "POST", proxy.url + "/v1/chat/completions",
                {"messages": [{"role": "user", "content": f"question {n}"}], "max_tokens": 2},
            )
            assert (status, headers["x-proxycache-slot"]) == (200, str(1 - orphaned))
        assert orphaned in generating(llama), "the test needs llama.cpp still generating"
        wait_for(lambda: not proxy.status()["slots"][orphaned]["busy"], timeout=600, what="the orphan's end")
        assert orphaned not in generating(llama)  # freed once llama.cpp stopped, not before
        assert http("POST", proxy.url + "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})[0] == 200
    finally:
        proxy.stop()
