"""The writer never holds the event loop for a whole mass event (issue: no hold over 5 ms).

A relay with more hosts than WRITE_STEP dies; its batch is written on a real database while a
probe task counts the event loop's turns. Every statement carries at most WRITE_STEP rows and the
loop turned between every two of them; the batch is still one transaction, in decision order,
each decision exactly once. And the most work done in any one turn (counted in Python calls, with
a profile hook) is the same for a batch four times larger. No clocks are read: a busy machine
cannot fail these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from relaybeat.monitor.notify import AlertBook, Target, plan, planning
from relaybeat.monitor.records import Change
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.store import WRITE_STEP, Batch, Store
from relaybeat.relay.wire import OFFLINE, Bundle, HostEntry, LeafStatus, encode_bundle
from tests.fakes import FakeClock
from tests.monitors import new_monitor

HOSTS = 3 * WRITE_STEP + 7  # four steps of hosts, the last one short


class Turns:
    """Counts the event loop's turns: a task that only ever yields."""

    def __init__(self) -> None:
        self.count = 0

    async def run(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)


@pytest.fixture
async def turns() -> AsyncIterator[Turns]:
    probe = Turns()
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0)
    yield probe
    task.cancel()


@contextlib.contextmanager
def statements(store: Store, turns: Turns) -> Iterator[list[tuple[int, int]]]:
    """(the loop's turn, rows) of each statement the store executes while the generator is open."""
    seen: list[tuple[int, int]] = []

    def before(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any) -> None:
        seen.append((turns.count, len(multiparams) or 1))

    engine = store._engine.sync_engine  # the real engine: only listened to
    event.listen(engine, "before_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_execute", before)


async def a_relay_with_many_hosts_dies(store: Store, hosts: int = HOSTS) -> tuple[Monitor, list[str]]:
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    entries = tuple(HostEntry(f"h{i:05d}", 1, 0, 1000, LeafStatus.OK) for i in range(hosts))
    monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "boot-r1", 1, 1000, entries)))
    monitor.expire()
    await monitor.flush()
    clock.t += 0.5
    monitor.take("relaybeat/relay/r1/status", OFFLINE)
    monitor.expire()  # what the expiry part does in steps: every host of the dead relay decided
    keys = [c.key or "" for c in monitor.pending()]
    assert len(keys) == hosts + 1
    return monitor, keys


async def most_calls_in_one_turn(path: Path, hosts: int) -> int:
    """The most Python calls the event loop made in one turn while a relay death of `hosts` hosts
    was written (the writer's flush: rows, plan, SQL statements, freeing the batch)."""
    store = await Store.open(f"sqlite:///{path}")
    try:
        await store.upgrade()
        monitor, _ = await a_relay_with_many_hosts_dies(store, hosts)
        calls, most, done = 0, 0, False

        def count(frame: object, what: str, arg: object) -> None:
            nonlocal calls
            if what in ("call", "c_call"):
                calls += 1

        async def turns() -> None:
            nonlocal calls, most
            while not done:
                most, calls = max(most, calls), 0
                await asyncio.sleep(0)

        probe = asyncio.create_task(turns())
        await asyncio.sleep(0)
        sys.setprofile(count)  # this thread only: the database's own thread is not counted
        try:
            await monitor.flush()
        finally:
            sys.setprofile(None)
            done = True
            await probe
        assert not monitor.pending()
        return most
    finally:
        await store.close()


async def test_a_relay_death_is_written_a_step_at_a_time_with_the_loop_free_between_steps(
    store: Store, turns: Turns
) -> None:
    monitor, keys = await a_relay_with_many_hosts_dies(store)
    before = await store.last_transition_id()
    assert monitor.unwritten == len(monitor.pending()) == len(keys)  # what /healthz says is waiting
    with statements(store, turns) as seen:
        await monitor.flush()
    assert not monitor.pending()
    assert monitor.unwritten == 0
    assert max(rows for _, rows in seen) <= WRITE_STEP, seen
    at = [turn for turn, _ in seen]
    assert all(b > a for a, b in itertools.pairwise(at)), f"the loop did not run between statements: {seen}"
    assert sum(rows for _, rows in seen) >= 2 * (HOSTS + 1)  # the transitions and the hosts' rows, at least
    # One row per decision, in the order decided, none twice.
    rows = await store.history(after_id=before, limit=10 * HOSTS, newest_first=False)
    assert [r.key for r in rows] == keys
    hosts, _ = await store.load()
    assert {h.state for h in hosts} == {State.UNREACHABLE}
    assert len(hosts) == HOSTS


async def test_a_relay_death_written_again_adds_nothing(store: Store) -> None:
    monitor, keys = await a_relay_with_many_hosts_dies(store)
    batch = monitor.pending()
    await monitor.flush()
    written = await store.last_transition_id()
    await store.write(Batch(transitions=batch))  # a replay of the same decisions, in steps too
    assert await store.last_transition_id() == written
    assert await store.stored_keys(keys) == set(keys)


async def test_the_most_work_in_one_turn_of_the_loop_does_not_grow_with_the_batch(tmp_path: Path) -> None:
    small = await most_calls_in_one_turn(tmp_path / "small.db", 2 * WRITE_STEP)
    large = await most_calls_in_one_turn(tmp_path / "large.db", 8 * WRITE_STEP)
    # Done in one turn, four times the rows would be about four times the calls.
    assert large < 1.5 * small, (small, large)


def change(subject: str, to: State) -> Change:
    return Change(
        kind=Kind.HOST,
        subject=subject,
        from_state=State.UP,
        to_state=to,
        at=datetime(2026, 12, 3, tzinfo=UTC),
        reason="relay r1 lost",
        relay="r1",
        event=Event.TRANSITION,
        key=f"k-{subject}",
        path=("r1",),
    )


def test_planning_in_steps_plans_what_planning_at_once_does() -> None:
    changes = [change(f"h{i:04d}", State.UNREACHABLE) for i in range(2 * WRITE_STEP + 1)]
    targets = [Target(name="ops")]
    steps = planning(changes, targets, AlertBook(), WRITE_STEP)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            stepped = done.value
            break
        yields += 1
    assert yields == 2  # after each full step, not after the last
    assert stepped == plan(changes, targets, AlertBook())
    assert len(stepped.opened) == len(changes)
