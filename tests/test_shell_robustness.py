"""The asyncio shells under trouble: retained replays, cancellation mid-write, a failing step after a
commit, a stop that the broker never acknowledges, odd intervals, deep trees. Real SQLite, real brokers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relaybeat.broker_config.embedded import EmbeddedBroker
from relaybeat.broker_config.settings import BrokerSettings
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.expiry import sleep_to_tick
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.states import State
from relaybeat.monitor.store import Store
from relaybeat.relay.leaf import run_leaf
from relaybeat.relay.mqtt import BrokerURL, stay_connected
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, encode_beat, encode_bundle

NOWHERE = BrokerURL.parse("mqtt://127.0.0.1:1")


def bundle(seq: int, *hosts: str) -> bytes:
    return encode_bundle(Bundle("r1", "b", seq, 1000, tuple(HostEntry(h, seq, 0, 1000, LeafStatus.OK) for h in hosts)))


class SlowStore(Store):
    """The real store, but its writes can be held up or the read after them made to fail once."""

    hold: asyncio.Event | None = None
    fail_next_id_read = False

    async def write(self, *args: Any, **kwargs: Any) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().write(*args, **kwargs)

    async def last_transition_id(self) -> int:
        if self.fail_next_id_read:
            self.fail_next_id_read = False
            msg = "connection reset while reading the newest id"
            raise OSError(msg)
        return await super().last_transition_id()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SlowStore]:
    opened = await SlowStore.open(f"sqlite:///{tmp_path / 'shell.db'}")
    assert isinstance(opened, SlowStore)
    await opened.upgrade()
    yield opened
    await opened.close()


def test_retained_beats_and_bundles_are_not_evidence_of_life_but_a_retained_status_is() -> None:
    relay = RelayService(RelaySettings("r1", NOWHERE, NOWHERE))
    relay.take("relaybeat/beat/ghost", encode_beat(Beat(seq=9)), retained=True)
    relay.take("relaybeat/beat/live", encode_beat(Beat(seq=1)))
    assert [e.id for e in relay.assembler.flush(0.0).hosts] == ["live"]
    assert relay.rejections.counts["retained"] == 1


async def test_monitor_ignores_retained_beats_and_bundles(store: SlowStore) -> None:
    monitor = Monitor(MonitorSettings(NOWHERE), store)
    monitor.take("relaybeat/beat/ghost", b"", retained=True)
    monitor.take("relaybeat/bundle/r1", bundle(1, "old"), retained=True)
    monitor.take("relaybeat/relay/r9/status", b"offline", retained=True)  # what retained statuses are for
    assert monitor.detector.hosts == {}
    assert monitor.rejections.counts["retained"] == 2
    assert monitor.received["relay_offline"] == 1


async def test_a_batch_cancelled_mid_write_is_kept_and_written_by_the_final_flush(store: SlowStore) -> None:
    monitor = Monitor(MonitorSettings(NOWHERE), store)
    monitor.take("relaybeat/bundle/r1", bundle(1, "web-1"))
    store.hold = asyncio.Event()
    writing = asyncio.create_task(monitor.flush())
    await asyncio.sleep(0.05)
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert {t.subject for t in monitor.pending()} == {"r1", "web-1"}
    store.hold = None
    await monitor.flush()
    assert sorted(r.subject for r in await store.history()) == ["r1", "web-1"]


async def test_a_failure_after_the_commit_never_writes_the_batch_twice(store: SlowStore) -> None:
    monitor = Monitor(MonitorSettings(NOWHERE), store)
    monitor.take("relaybeat/bundle/r1", bundle(1, "web-1"))
    store.fail_next_id_read = True
    await monitor.flush()
    assert sorted(r.subject for r in await store.history()) == ["r1", "web-1"]
    assert monitor.pending() == []
    assert monitor.db_ok


async def test_stay_connected_stops_when_cancelled_even_if_the_session_fails_on_the_way_out() -> None:
    import aiomqtt

    sessions = 0

    class FakeClient:
        def __init__(self, _url: object) -> None:
            pass

        async def __aenter__(self) -> FakeClient:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

    async def session(_: Any) -> None:
        nonlocal sessions
        sessions += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            msg = "the goodbye publish failed"
            raise aiomqtt.MqttError(msg) from None

    task = asyncio.create_task(stay_connected(NOWHERE, FakeClient, session, name="t"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert sessions == 1  # it did not reconnect instead of stopping


async def test_a_leaf_with_a_very_long_interval_still_beats() -> None:
    async with EmbeddedBroker(BrokerSettings(port=0)) as broker:
        stop = asyncio.Event()
        leaf = asyncio.create_task(run_leaf("slow-1", BrokerURL.parse(broker.url), 40_000.0, stop))
        await asyncio.sleep(1.0)
        stop.set()
        assert await asyncio.wait_for(leaf, 10) >= 2  # one beat, then its stopping beat


def test_the_relay_refuses_a_child_tree_too_deep_to_fold_in() -> None:
    relay = RelayService(RelaySettings("top", NOWHERE, BrokerURL.parse("mqtt://127.0.0.1:2")))
    deep = Bundle("c15", "b", 1, 1000, age_ms=0)
    for level in range(14, -1, -1):
        deep = Bundle(f"c{level}", "b", 1, 1000, (), (deep,), age_ms=0)
    relay.take("relaybeat/bundle/c0", encode_bundle(Bundle("c0", "b", 1, 1000, (), deep.children)))
    assert relay.rejections.counts["too_deep"] == 1
    assert relay.assembler.flush(0.0).children == ()


def test_a_parent_repeating_its_childs_latest_bundle_is_not_counted_as_stale() -> None:
    detector = Detector(Policy(), 0.0)
    child = Bundle("r2", "c", 7, 1000, (HostEntry("h", 1, 0, 1000, LeafStatus.OK),), age_ms=0)
    for seq in range(1, 6):
        detector.observe(Bundle("r1", "p", seq, 1000, (), (child,)), float(seq))
    assert detector.ignored == {}
    assert detector.relays["r2"].state is State.UP


async def test_a_stalled_event_loop_is_blindness_not_a_reason_to_page(store: SlowStore) -> None:
    import time

    monitor = Monitor(MonitorSettings(NOWHERE), store)
    monitor.detector.grace_from = -10.0  # start-up grace long over
    monitor.take("relaybeat/beat/web-1", encode_beat(Beat(seq=1, interval_s=0.2)))  # timeout 0.6 s
    probe = asyncio.create_task(monitor.watch_loop_lag(every_s=0.05))
    expiry = asyncio.create_task(monitor.expiry.run())

    def web_1() -> State:
        return monitor.detector.hosts["web-1"].state

    try:
        await asyncio.sleep(0.1)
        time.sleep(1.5)  # noqa: ASYNC251 - on purpose: the loop is blocked past web-1's deadline; its next beats may be unread
        await asyncio.sleep(0.1)
        assert monitor.stalls == 1
        assert web_1() is State.UP
        await asyncio.sleep(0.8)  # a full timeout after the stall with still no beat: now it is down
        assert web_1() is State.DOWN
    finally:
        for task in (probe, expiry):
            task.cancel()
        await asyncio.gather(probe, expiry, return_exceptions=True)


async def test_the_periodic_probes_wake_together_on_ticks_of_the_loop_clock() -> None:
    """The loop probe and the database probe (every 4th of its ticks) cost an idle monitor one wakeup."""
    loop = asyncio.get_running_loop()
    woke: dict[float, list[tuple[float, float]]] = {0.05: [], 0.2: []}  # by period: (tick, woken at)

    async def probe(every_s: float, times: int) -> None:
        for _ in range(times):
            tick = await sleep_to_tick(every_s)
            woke[every_s].append((tick, loop.time()))

    await asyncio.gather(probe(0.05, 9), probe(0.2, 2))
    for every_s, ticks in woke.items():
        assert all(at >= tick for tick, at in ticks), ticks  # never early
        assert all(abs(tick / every_s - round(tick / every_s)) < 1e-6 for tick, _ in ticks), ticks  # on the grid
    lag_ticks = [tick for tick, _ in woke[0.05]]
    assert all(any(abs(tick - other) < 1e-9 for other in lag_ticks) for tick, _ in woke[0.2]), woke
