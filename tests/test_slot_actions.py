"""
Slot actions as typed results: llama.cpp's replies read (in process, from
replies seen on a real server), then the same against a real llama.cpp server.
"""

from __future__ import annotations

import os
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import TimeoutError
from twisted.internet.error import ConnectionRefusedError

from proxycache.backend import FailureKind, IdleSlot, LlamaServer, Restored, Saved, SlotActionFailed, UpstreamError
from proxycache.backend._actions import decoding, idle_slot, refused, restored, saved, unanswered
from proxycache.testing import free_port, open_raw_chat, wait_for

NO_SAVE_PATH = {"error": {"code": 501, "message": "This server does not support slots action. Start it with "
                          "`--slot-save-path`", "type": "not_supported_error"}}
UNABLE = {"error": {"code": 400, "message": "Unable to restore slot: No available space in KV cache or invalid slot "
                    "save file", "type": "invalid_request_error"}}


def test_replies_become_counts():
    reply = {"id_slot": 0, "filename": "x.bin", "n_saved": 42, "n_written": 4096, "timings": {"save_ms": 0.5}}
    assert saved(reply) == Saved(tokens=42, bytes=4096, ms=0.5)
    reply = {"id_slot": 1, "filename": "x.bin", "n_restored": 42, "n_read": 4096, "timings": {"restore_ms": 0.25}}
    assert restored(reply) == Restored(tokens=42, bytes=4096, ms=0.25)
    # what a server leaves out is said to be unknown, not made up
    assert saved({}) == Saved(tokens=None, bytes=0, ms=0.0) and saved(None) == saved({})
    assert restored({"n_restored": True}) == Restored(tokens=0, bytes=None, ms=0.0)


def test_an_idle_slot_says_whether_it_ran_anything_and_what_it_holds():
    assert idle_slot({"id": 0, "id_task": 7, "is_processing": False, "n_prompt_tokens": 300}) == IdleSlot(True, 300)
    assert idle_slot({"id": 0, "is_processing": False}) == IdleSlot(used=False, tokens=None)  # restarted


def test_a_busy_slot_generates_once_it_decoded_a_token():
    # as b11434 and b11549 show it (next_token a list), and older builds (a dict)
    prompt = {"id": 0, "is_processing": True, "next_token": [{"has_next_token": False, "n_decoded": 0}]}
    answer = {"id": 0, "is_processing": True, "next_token": [{"has_next_token": True, "n_decoded": 64}]}
    assert not decoding(prompt) and decoding(answer)
    assert decoding({"id": 0, "is_processing": True, "next_token": {"n_decoded": 3}})
    assert not decoding({**answer, "is_processing": False})  # idle: it shows the last task's count, or 0
    assert not decoding({"id": 0, "is_processing": True}) and not decoding({"next_token": []})


@pytest.mark.parametrize("status, reply, kind", [
    (501, NO_SAVE_PATH, FailureKind.UNSUPPORTED),
    (400, UNABLE, FailureKind.REJECTED),
    (404, {"error": {"message": "File Not Found"}}, FailureKind.MISSING_FILE),
    (500, {"error": {"message": "failed to open slotcache_x.bin"}}, FailureKind.MISSING_FILE),
    (500, "oops", FailureKind.FAILED),
])
def test_a_refusal_is_told_apart_by_its_status_and_reason(status, reply, kind):
    failure = refused("restore", 1, status, reply)
    assert failure.kind is kind and failure.status == status and isinstance(failure, UpstreamError)
    assert str(failure).startswith(f"slot 1 restore failed: {status} ")


def test_no_answer_is_told_apart_by_its_cause():
    def caused_by(error: Exception) -> SlotActionFailed:
        try:
            try:
                raise error
            except Exception as e:
                raise UpstreamError(f"POST /slots/0: {e}") from e
        except UpstreamError as wrapped:
            return unanswered("save", 0, wrapped)

    assert caused_by(ConnectionRefusedError()).kind is FailureKind.UNREACHABLE
    assert caused_by(TimeoutError()).kind is FailureKind.TIMEOUT
    assert caused_by(ValueError("cut short")).kind is FailureKind.FAILED
    assert caused_by(TimeoutError()).status is None


# -- against a real llama.cpp server --------------------------------------------------


def _backend(url: str) -> LlamaServer:
    return LlamaServer.create(reactor, url, None, pool_size=2)


@pytest_twisted.ensureDeferred
async def test_a_real_server_saves_and_restores_with_counts_and_refuses_by_kind(llama):
    backend = _backend(llama.url)
    llama.chat("tell me about the sea " * 20, id_slot=0)
    seen = await backend.wait_until_idle(0)
    assert seen is not None and seen.used and seen.tokens
    done = await backend.save_slot(0, "typed.bin", 30.0)
    assert done.tokens and done.tokens >= seen.tokens and done.bytes > 0
    back = await backend.restore_slot(1, "typed.bin", 30.0)
    assert back.tokens == done.tokens and back.bytes == done.bytes
    with pytest.raises(SlotActionFailed) as refusal:
        await backend.restore_slot(1, "slotcache_0000000000000000.bin", 30.0)  # no such file
    assert refusal.value.kind is FailureKind.REJECTED and refusal.value.status == 400


@pytest_twisted.ensureDeferred
async def test_a_real_server_refuses_missing_empty_and_garbage_files_alike(llama):
    # Why the disk tier looks at the file itself (proxycache.cache._unusable): the reply does not tell.
    # (A truncated file is not tried here: both engines abort on some, GGML_ASSERT(nread <= state_size).)
    backend = _backend(llama.url)
    llama.chat("tell me about the sea " * 20, id_slot=0)
    done = await backend.save_slot(0, "whole.bin", 30.0)
    (llama.save_dir / "empty.bin").write_bytes(b"")
    (llama.save_dir / "zeros.bin").write_bytes(bytes(done.bytes))
    (llama.save_dir / "garbage.bin").write_bytes(os.urandom(done.bytes))
    for name in ("missing.bin", "empty.bin", "zeros.bin", "garbage.bin"):
        with pytest.raises(SlotActionFailed) as refusal:
            await backend.restore_slot(1, name, 30.0)
        assert (refusal.value.kind, refusal.value.status) == (FailureKind.REJECTED, 400), name
        assert refusal.value.reason == UNABLE["error"]["message"], name
    assert (await backend.restore_slot(1, "whole.bin", 30.0)).tokens == done.tokens  # still serving


@pytest_twisted.ensureDeferred
async def test_a_real_server_slot_seen_generating_then_idle_holds_what_it_computed(llama):
    # A whole answer whose client left: llama.cpp generates on (or notices and stops), and its slot
    # then shows the prompt and answer it holds.  Idle at the first look, nothing says what ran there.
    backend = _backend(llama.url)
    body = {"messages": [{"role": "user", "content": "count the waves " * 50}], "max_tokens": 200,
            "ignore_eos": True, "id_slot": 0}
    with open_raw_chat(llama.spec.port, body):
        wait_for(lambda: llama.slots()[0]["is_processing"], what="llama.cpp computing")
    seen = await backend.wait_until_idle(0)
    assert seen is not None and seen.used and seen.decoded
    assert seen.tokens is not None and seen.tokens >= 150  # the prompt, and the answer llama.cpp got to
    again = await backend.wait_until_idle(0)
    assert again == IdleSlot(used=True, tokens=seen.tokens, decoded=False)


@pytest_twisted.ensureDeferred
async def test_a_real_server_without_a_save_path_and_a_dead_one_fail_by_kind(llama_factory):
    backend = _backend(llama_factory(save_dir=None).url)
    with pytest.raises(SlotActionFailed) as refusal:
        await backend.save_slot(0, "typed.bin", 30.0)
    assert refusal.value.kind is FailureKind.UNSUPPORTED and refusal.value.status == 501
    with pytest.raises(SlotActionFailed) as gone:
        await _backend(f"http://127.0.0.1:{free_port()}").save_slot(0, "typed.bin", 30.0)
    assert gone.value.kind is FailureKind.UNREACHABLE and gone.value.status is None
