"""Consistent reads: the API shows a state only once the transition that led to it is in SQL.

A real monitor fed through its own `take` / `expire` with a hand-driven clock, a real store (SQLite,
and PostgreSQL via `db_url`), the real app over ASGI. Each test stops at the moment a transition is
decided but not yet written (the writer loop is not running: only `flush()` writes), looks, then
flushes and looks again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st

from relaybeat.api.app import create_app
from relaybeat.api.events import EventHub
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.store import Store
from relaybeat.monitor.view import iso
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle
from tests.fakes import FakeClock
from tests.monitors import new_monitor


@dataclass
class Fleet:
    monitor: Monitor
    clock: FakeClock
    app: FastAPI
    http: httpx.AsyncClient
    seq: int = 0

    def send(self, **ages_ms: int) -> None:
        """One bundle from relay r1: host id -> how long ago r1 last heard it (0: just now)."""
        self.seq += 1
        entries = tuple(HostEntry(h, 1, age, 1000, LeafStatus.OK) for h, age in sorted(ages_ms.items()))
        self.monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "boot1", self.seq, 1000, entries)))
        self.monitor.expire()

    def decided(self, kind: Kind, subject: str) -> State:
        """The monitor's own decision, which the API may not show yet."""
        detector = self.monitor.detector
        return (detector.hosts if kind is Kind.HOST else detector.relays)[subject].state

    async def get(self, path: str) -> Any:
        response = await self.http.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    async def rows(self, path: str, subject: str) -> list[tuple[str, str]]:
        return [(r["from"], r["to"]) for r in (await self.get(path))["items"] if r["subject"] == subject]


@pytest.fixture
async def fleet(db_url: str) -> AsyncIterator[Fleet]:
    store = await Store.open(db_url)
    await store.upgrade()
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    app = create_app(monitor)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            fleet = Fleet(monitor, clock, app, http)
            fleet.send(h1=0, h2=0)
            await monitor.flush()  # r1, h1 and h2 up, durable
            yield fleet
    finally:
        await store.close()


async def event_rows(hub: EventHub, count: int) -> list[tuple[str, str, str]]:
    """The first `count` rows the event stream serves from the start (replayed from SQL)."""
    found: list[tuple[str, str, str]] = []
    async for row in hub.rows(after_id=0):
        found.append((row.subject, row.from_state.value, row.to_state.value))
        if len(found) == count:
            break
    return found


async def test_a_host_decided_down_is_shown_down_only_once_its_row_is_in_sql(fleet: Fleet) -> None:
    up = await fleet.get("/api/v1/hosts/h2")
    fleet.clock.t += 10.0
    fleet.send(h1=0, h2=10_000)  # r1: h2 quiet for 10 s, past its 3 s timeout: decided down, not yet written
    assert fleet.decided(Kind.HOST, "h2") is State.DOWN

    shown = await fleet.get("/api/v1/hosts/h2")
    assert (shown["state"], shown["since"]) == ("up", up["since"])  # as it was before the pending row
    assert await fleet.rows("/api/v1/hosts/h2/transitions", "h2") == [("unknown", "up")]
    assert await fleet.rows("/api/v1/transitions", "h2") == [("unknown", "up")]
    assert (await fleet.get("/api/v1/hosts?state=down"))["total"] == 0
    assert (await fleet.get("/api/v1/summary"))["hosts"]["states"]["down"] == 0
    assert 'relaybeat_subjects{kind="host",state="down"} 0.0' in (await fleet.http.get("/metrics")).text

    await fleet.monitor.flush()

    shown = await fleet.get("/api/v1/hosts/h2")
    history = (await fleet.get("/api/v1/hosts/h2/transitions"))["items"]
    assert shown["state"] == "down"
    assert (history[0]["from"], history[0]["to"]) == ("up", "down")
    assert shown["since"] == history[0]["at"]
    assert ("up", "down") in await fleet.rows("/api/v1/transitions", "h2")
    assert [h["id"] for h in (await fleet.get("/api/v1/hosts?state=down"))["items"]] == ["h2"]
    assert 'relaybeat_subjects{kind="host",state="down"} 1.0' in (await fleet.http.get("/metrics")).text
    assert ("h2", "up", "down") in await event_rows(fleet.app.state.events, 4)


async def test_a_host_back_up_is_listed_down_until_its_recovery_is_in_sql(fleet: Fleet) -> None:
    fleet.clock.t += 10.0
    fleet.send(h1=0, h2=10_000)  # h2 quiet past its timeout: down
    await fleet.monitor.flush()
    fleet.clock.t += 1.0
    fleet.send(h1=0, h2=0)  # h2 beats again: decided up, not yet written
    assert fleet.decided(Kind.HOST, "h2") is State.UP

    down = await fleet.get("/api/v1/hosts?state=down")
    assert ([h["id"] for h in down["items"]], down["total"]) == (["h2"], 1)  # shown as SQL has it
    assert (await fleet.get("/api/v1/hosts?state=up"))["total"] == 1

    await fleet.monitor.flush()

    assert (await fleet.get("/api/v1/hosts?state=down"))["total"] == 0
    assert [h["id"] for h in (await fleet.get("/api/v1/hosts?state=up"))["items"]] == ["h1", "h2"]


async def test_a_relay_silence_decided_by_expiry_is_shown_once_written(fleet: Fleet) -> None:
    fleet.clock.t += 5.0  # r1 silent past flush × misses (3 s): down, its hosts unreachable
    fleet.monitor.expire()
    assert fleet.decided(Kind.RELAY, "r1") is State.DOWN
    assert fleet.decided(Kind.HOST, "h1") is State.UNREACHABLE

    relay = await fleet.get("/api/v1/relays/r1")
    hosts = (await fleet.get("/api/v1/hosts"))["items"]
    assert relay["state"] == "up"
    assert {h["state"] for h in hosts} == {"up"}
    assert await fleet.rows("/api/v1/relays/r1/transitions", "r1") == [("unknown", "up")]
    assert (await fleet.get("/api/v1/relays?state=down"))["total"] == 0

    await fleet.monitor.flush()

    relay = await fleet.get("/api/v1/relays/r1")
    assert relay["state"] == "down"
    assert (await fleet.rows("/api/v1/relays/r1/transitions", "r1"))[0] == ("up", "down")
    assert {h["state"] for h in (await fleet.get("/api/v1/hosts"))["items"]} == {"unreachable"}
    assert ("up", "unreachable") in await fleet.rows("/api/v1/hosts/h1/transitions", "h1")


async def test_a_host_first_heard_is_unknown_until_its_first_row_is_written(fleet: Fleet) -> None:
    fleet.send(h1=0, h2=0, h3=0)
    assert fleet.decided(Kind.HOST, "h3") is State.UP

    h3 = await fleet.get("/api/v1/hosts/h3")
    assert h3["state"] == "unknown"
    assert (await fleet.get("/api/v1/hosts/h3/transitions"))["items"] == []

    await fleet.monitor.flush()

    assert (await fleet.get("/api/v1/hosts/h3"))["state"] == "up"
    assert await fleet.rows("/api/v1/hosts/h3/transitions", "h3") == [("unknown", "up")]


async def test_pending_lists_what_is_decided_and_not_yet_written_in_order(fleet: Fleet) -> None:
    assert fleet.monitor.pending() == []
    fleet.clock.t += 5.0
    fleet.monitor.expire()
    pending = fleet.monitor.pending()
    first = pending[0]
    assert (first.kind, first.subject, first.to_state) == (Kind.RELAY, "r1", State.DOWN)
    assert {t.subject for t in pending[1:]} == {"h1", "h2"}
    await fleet.monitor.flush()
    assert fleet.monitor.pending() == []


@given(
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(minutes=-90))])),
)
def test_a_shown_moment_is_iso_8601_in_milliseconds_with_z_for_utc(moment: datetime) -> None:
    reference = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert iso(moment) == reference
    assert iso(moment) == reference  # again, from the cache of whole seconds
    if moment.tzinfo is UTC:
        assert reference.endswith("Z")
        assert len(reference) == len("2026-12-04T19:13:54.123Z")
