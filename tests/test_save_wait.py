"""
Background saves and the requests around them, in process (issue 24): a save
blocks llama.cpp's whole loop while it writes (seconds for a 30B-class model's
slot file), so a request whose prefix a slot being saved holds waits for that
slot instead of computing from scratch next to it, and write-behind starts only
once the slot and its backend have been quiet for long enough.
"""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from proxycache.backend import IdleSlot, Saved
from proxycache.cache import Catalog, DiskTier
from proxycache.config import Config
from proxycache.routing import Decision, Request, SlotId, SlotState
from proxycache.slots import Dispatcher, Monitor, NoCache, Outcome, RequestRecord, Scheduler, Slot, SlotContent
from proxycache.stats import Stats
from proxycache.testing.http import prometheus
from proxycache.web._exchange import ClientExchange
from tests.fakes import FakeBackend, FakeResponse, RecordingExchange, fp, put

MODEL = "m0del"
Usage = namedtuple("Usage", "total used free")
B0, B1 = SlotId("b", 0), SlotId("b", 1)


def in_place(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


def make_tier(tmp_path: Path) -> tuple[DiskTier, FakeBackend]:
    """A tier on a Clock over backend "b" (two slots, running MODEL) that answers every save."""
    config = Config.load({"meta_dir": str(tmp_path / "meta"), "slot_save_path": str(tmp_path / "saves")}, environ={})
    (tmp_path / "saves").mkdir()
    clock = Clock()
    catalog = Catalog(min_ratio=0.85)
    # A sibling's own part (its last question) is cheaper to compute again than to keep: whether that holds
    # is the cost model's business; here, the request reuses the shared context in place once it may.
    scheduler = Scheduler(clock, min_ratio=0.85, affinity_wait=30.0, max_queue=4, disk_lookup=catalog.lookup,
                          keep_pays=lambda view, common: False)
    scheduler.set_backend_slots("b", 2)
    backend = FakeBackend(url="b", idle=IdleSlot(used=True, tokens=2200), saved=Saved(tokens=2200, bytes=4096, ms=1.0))
    tier = DiskTier(config, clock, scheduler, {"b": backend}, catalog, to_thread=in_place)  # type: ignore[dict-item]
    catalog.backend_up("b", MODEL)
    tier.store.disk_usage = lambda path: Usage(total=100 * 2**30, used=0, free=50 * 2**30)
    return tier, backend


def hot(tier: DiskTier, slot_id: SlotId, blocks: Any, last_used: float = 0.0) -> Slot:
    return put(tier.scheduler, Slot(slot_id, SlotContent(SlotState.HOT, blocks, tokens=2200), last_used=last_used))


def saves(backend: FakeBackend) -> list[tuple[str, int]]:
    return [call for call in backend.calls if call[0] == "save"]


def test_a_sibling_waits_for_the_slot_a_write_behind_is_saving(tmp_path):
    # 2 slots, siblings back to back: the context's slot is being saved in the background when the
    # sibling comes.  Computing its 2,000 shared tokens on the free slot took 20 s (the save stalls that
    # slot too); the slot is free again once the save ends, and holds all of the shared context.
    tier, backend = make_tier(tmp_path)
    hot(tier, B0, fp(20, 22, tag=71))
    write: Deferred[None] = Deferred()
    backend.save_reply = write  # a slow write
    tier.background.schedule(B0)
    tier.clock.advance(tier.background.delay(tier.scheduler.slot(B0).content))
    assert saves(backend) == [("save", 0)]
    (saving,) = [view for view in tier.scheduler.views() if view.id == B0]
    assert saving.busy and saving.saving

    sibling = tier.scheduler.acquire(Request(fp(20, 23, tag=72), small=False))
    assert not sibling.called  # not a miss on the free slot: it waits for the save
    write.callback(None)  # the save ends
    assert sibling.called
    lease = sibling.result
    assert lease.slot.id == B0
    assert lease.plan.decision is Decision.HIT and lease.plan.common_blocks == 20
    assert not [view for view in tier.scheduler.views() if view.saving]


def test_a_slot_busy_with_a_request_is_not_seen_as_saving(tmp_path):
    tier, backend = make_tier(tmp_path)
    hot(tier, B0, fp(20, 22, tag=73))
    first = tier.scheduler.acquire(Request(fp(20, 22, tag=73), small=False))
    assert first.result.slot.id == B0
    assert not any(view.saving for view in tier.scheduler.views())
    # a sibling does not wait for another conversation's request: it computes on the free slot
    sibling = tier.scheduler.acquire(Request(fp(20, 23, tag=74), small=False))
    assert sibling.result.slot.id == B1 and sibling.result.plan.decision is Decision.MISS


def test_write_behind_waits_a_multiple_of_the_predicted_save_time(tmp_path):
    # 1 slot in use: the context's slot file is 564 MB and writes at 50 MB/s under load (11 s, during which
    # llama.cpp computes nothing): 2 idle seconds are not enough to expect no request during it.
    tier, backend = make_tier(tmp_path)
    hot(tier, B0, fp(20, 22, tag=75))
    # before any save, the size of a token's KV is unknown: judged as a long save (the first save of a
    # 30B-class slot stalled the next sibling 3.8 s when it was taken for a short one)
    assert tier.background.delay(SlotContent(SlotState.HOT, tokens=2200)) == 4 * tier.config.write_behind
    tier.speeds.bytes_per_token = 256_000
    tier.speeds.write_bytes_per_second = 50e6
    predicted = tier.speeds.save_seconds(2200 * 256_000)
    delay = tier.background.delay(SlotContent(SlotState.HOT, tokens=2200))
    assert delay == 4 * predicted > 40
    tier.background.schedule(B0)
    tier.clock.advance(tier.config.write_behind)
    assert saves(backend) == []
    tier.clock.advance(delay - tier.config.write_behind - 1)
    assert saves(backend) == []
    tier.clock.advance(1)
    assert saves(backend) == [("save", 0)]  # still saved, for a restart of either process: later
    assert tier.scheduler.slot(B0).content.saved_key is not None


def long_saves(tier: DiskTier) -> float:
    """Measured speeds that make a 2,200-token save last ~11 s (a 30B-class slot under load); its delay."""
    tier.speeds.bytes_per_token = 256_000
    tier.speeds.write_bytes_per_second = 50e6
    return tier.background.delay(SlotContent(SlotState.HOT, tokens=2200))


def test_a_long_write_behind_never_starts_while_another_slot_of_the_backend_serves_a_request(tmp_path):
    tier, backend = make_tier(tmp_path)
    delay = long_saves(tier)
    hot(tier, B0, fp(20, 22, tag=76))
    other = tier.scheduler.acquire(Request(fp(30, base=5), small=False))  # another conversation, on slot 1
    lease = other.result
    assert lease.slot.id == B1
    tier.background.schedule(B0)
    tier.clock.advance(10 * delay)
    assert saves(backend) == []  # it would stall that request's tokens for as long as it writes
    tier.scheduler.release(lease, Outcome(succeeded=True, prompt_n=300, predicted_n=10))
    # ... and the backend has just been busy: a request may come right after
    tier.clock.advance(delay - 0.5)
    assert saves(backend) == []
    tier.clock.advance(1)
    assert saves(backend) == [("save", 0)]


def test_a_short_write_behind_is_made_while_another_slot_serves_a_request(tmp_path):
    # A small model's slot file writes in milliseconds: on a backend that is never idle (a team on
    # four slots) waiting for quiet would leave conversations unsaved, lost at a llama-server restart.
    tier, backend = make_tier(tmp_path)
    tier.speeds.bytes_per_token = 4096  # measured: 9 MB, 30 ms at 300 MB/s
    hot(tier, B0, fp(20, 22, tag=77))
    other = tier.scheduler.acquire(Request(fp(30, base=6), small=False))
    assert other.result.slot.id == B1
    tier.background.schedule(B0)
    tier.clock.advance(tier.config.write_behind)
    assert saves(backend) == [("save", 0)]


def test_before_any_save_a_write_behind_waits_for_a_quiet_backend(tmp_path):
    # A fresh proxy in front of a 30B-class model: its first save's size is unknown.  Taken for a
    # short save, it ran 2 s after the context's request and the next sibling waited 3.8 s behind it.
    tier, backend = make_tier(tmp_path)
    hot(tier, B0, fp(20, 22, tag=78))
    tier.background.schedule(B0)
    tier.clock.advance(tier.config.write_behind)
    assert saves(backend) == []
    other = tier.scheduler.acquire(Request(fp(30, base=7), small=False))  # another conversation meanwhile
    tier.clock.advance(4 * tier.config.write_behind)
    assert saves(backend) == []
    tier.scheduler.release(other.result, Outcome(succeeded=True, prompt_n=300, predicted_n=10))
    tier.clock.advance(4 * tier.config.write_behind)
    assert saves(backend) == [("save", 0)]  # still saved once quiet, for a restart


# -- what an operator and a client see of background saves ---------------------------------------


def stats_of(tier: DiskTier) -> Stats:
    clock = tier.clock
    return Stats(clock, tier.scheduler, tier.catalog, Monitor(clock, tier.scheduler, [], 10.0, None))


def test_status_and_metrics_show_a_slot_busy_only_saving(tmp_path):
    tier, backend = make_tier(tmp_path)
    stats = stats_of(tier)
    hot(tier, B0, fp(20, 22, tag=79))
    other = tier.scheduler.acquire(Request(fp(30, base=8), small=False))  # a request on slot 1: busy, not saving
    assert other.result.slot.id == B1
    write: Deferred[None] = Deferred()
    backend.save_reply = write
    tier.speeds.bytes_per_token = 4096  # a short save: made while slot 1 serves its request
    tier.background.schedule(B0)
    tier.clock.advance(tier.config.write_behind)
    assert saves(backend) == [("save", 0)]
    shown = {(s["slot"], s["busy"], s["saving"]) for s in stats.status()["slots"]}
    assert shown == {(0, True, True), (1, True, False)}
    metrics = prometheus(stats.metrics_text().decode())
    assert (metrics["proxycache_slots_busy"], metrics["proxycache_slots_saving"]) == (2, 1)
    write.callback(None)  # the save ends
    assert [s["saving"] for s in stats.status()["slots"]] == [False, False]
    assert prometheus(stats.metrics_text().decode())["proxycache_slots_saving"] == 0


def test_the_wait_for_a_background_save_is_on_the_requests_path(tmp_path):
    # The sibling waits 3 s for the write-behind of its context's slot: queued, and on its path, as the
    # headers, the log line and /status say; the request it then waits for on slot 1 is not a save.
    tier, backend = make_tier(tmp_path)
    hot(tier, B0, fp(20, 22, tag=80))
    write: Deferred[None] = Deferred()
    backend.save_reply = write
    tier.background.schedule(B0)
    tier.clock.advance(tier.background.delay(tier.scheduler.slot(B0).content))
    sibling = tier.scheduler.acquire(Request(fp(20, 23, tag=81), small=False))
    tier.clock.advance(3.0)
    write.callback(None)
    lease = sibling.result
    assert lease.slot.id == B0 and (lease.waited, lease.save_waited) == (3.0, 3.0)
    request = DummyRequest([b""])
    ClientExchange(request, tier.clock, 30, False, {}).begin(lease, Decision.HIT, 0, (0.25, 0.0))
    headers = {name: request.responseHeaders.getRawHeaders(name)[0]
               for name in ("x-proxycache-queue-wait-ms", "x-proxycache-save-wait-ms", "x-proxycache-path-ms")}
    assert headers == {"x-proxycache-queue-wait-ms": "3000", "x-proxycache-save-wait-ms": "3000",
                       "x-proxycache-path-ms": "3250"}
    # its follow-up waits 2 s for the sibling's own request on that slot: queued, not behind a save
    follow_up = tier.scheduler.acquire(Request(fp(20, 24, tag=81), small=False))
    tier.clock.advance(2.0)
    tier.scheduler.release(lease, Outcome(succeeded=True, prompt_n=10, predicted_n=2))
    assert (follow_up.result.waited, follow_up.result.save_waited) == (2.0, 0.0)


def test_a_request_queued_while_every_slot_it_could_take_is_saving_waits_behind_the_save(tmp_path):
    # One slot, saving; an unrelated conversation comes: nothing else to take, so it waits for the save
    tier, backend = make_tier(tmp_path)
    tier.scheduler.set_backend_slots("b", 1)
    hot(tier, B0, fp(20, 22, tag=82))
    write: Deferred[None] = Deferred()
    backend.save_reply = write
    tier.background.schedule(B0)
    tier.clock.advance(tier.background.delay(tier.scheduler.slot(B0).content))
    other = tier.scheduler.acquire(Request(fp(30, base=9), small=False))
    tier.clock.advance(1.5)
    write.callback(None)
    assert (other.result.waited, other.result.save_waited) == (1.5, 1.5)


def test_the_dispatcher_records_the_wait_for_a_background_save(tmp_path):
    clock, backend = Clock(), FakeBackend()
    scheduler = Scheduler(clock, min_ratio=0.5, affinity_wait=30.0, max_queue=4)
    scheduler.set_backend_slots(backend.name, 1)
    put(scheduler, Slot(SlotId(backend.name, 0), SlotContent(SlotState.HOT, fp(20, 22, tag=83), tokens=2200)))
    records: list[RequestRecord] = []
    dispatcher = Dispatcher(clock, scheduler, {backend.name: backend}, NoCache(),
                            first_byte_timeout=30, observers=[records.append])
    hold = scheduler.try_hold(SlotId(backend.name, 0))  # a background save
    assert hold is not None
    d = Deferred.fromCoroutine(dispatcher.dispatch(Request(fp(20, 23, tag=84), small=False), "/v1/chat/completions",
                                                   {}, RecordingExchange()))
    clock.advance(1.25)
    hold.release()
    backend.pending[0].callback(FakeResponse())
    assert d.called
    (record,) = records
    assert (record.waited, record.save_wait_seconds, record.path_seconds) == (1.25, 1.25, 1.25)
    stats = Stats(clock, scheduler, Catalog(min_ratio=0.0), Monitor(clock, scheduler, [], 10.0, None))
    stats.request_done(record)
    status = stats.status()
    (recent,) = status["recent"]
    assert (recent["wait"], recent["save_wait_ms"], recent["path_ms"]) == (1.25, 1250, 1250)
    assert status["totals"]["path_save_wait_seconds"] == 1.25
    assert prometheus(stats.metrics_text().decode())["proxycache_path_seconds_sum"] == 1.25
