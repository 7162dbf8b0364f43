"""Availability: the pure computation against a brute-force reference, the SQL it reads, the API.

The reference samples the state at every millisecond of small windows; every boundary the
strategies draw falls on a whole millisecond, so the two must agree exactly, not approximately.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.monitor.availability import Availability, availability, merge_intervals
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.store import Batch, Store, TransitionRow
from relaybeat.monitor.view import iso
from tests.fakes import FakeClock
from tests.monitors import AUTH, Fleet, api, call, new_monitor

T0 = datetime(2025, 6, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def ms(n: int) -> datetime:
    return T0 + n * MS


# --- the pure computation against a brute-force reference --------------------------------------


def reference(
    initial: State,
    changes: list[tuple[datetime, State]],
    maintenance: list[tuple[datetime, datetime | None]],
    since: datetime,
    until: datetime,
) -> dict[str, Any]:
    """Sample each millisecond of [since, until): its state (the last change at or before it) and
    whether a window covers it. Outages are runs of down containing a sample outside maintenance."""
    ordered = sorted(changes, key=lambda change: change[0])  # stable: equal times keep their order
    samples: list[tuple[State, bool]] = []
    t = since
    while t < until:
        state = initial
        for at, new in ordered:
            if at <= t:
                state = new
        covered = any(start <= t and (end is None or t < end) for start, end in maintenance)
        samples.append((state, covered))
        t += MS
    time_in = {s: sum(1 for state, m in samples if state == s and not m) * MS for s in State}
    runs: list[int] = []  # the downtime of each run of down samples
    previous_down = False
    for state, covered in samples:
        if state == State.DOWN:
            if not previous_down:
                runs.append(0)
            runs[-1] += 0 if covered else 1
        previous_down = state == State.DOWN
    outages = [run for run in runs if run > 0]
    return {
        "time_in": time_in,
        "maintenance": sum(1 for _, m in samples if m) * MS,
        "outages": len(outages),
        "longest_outage": max(outages, default=0) * MS,
    }


states = st.sampled_from(list(State))
moments = st.integers(-50, 350).map(ms)


@st.composite
def windows(draw: st.DrawFn) -> tuple[datetime, datetime | None]:
    start = draw(st.integers(-50, 350))
    end = draw(st.none() | st.integers(start, 400))
    return ms(start), None if end is None else ms(end)


@settings(max_examples=300, deadline=None)
@given(
    initial=states,
    changes=st.lists(st.tuples(moments, states), max_size=12),
    maintenance=st.lists(windows(), max_size=4),
    since=st.integers(0, 150),
    length=st.integers(0, 250),
)
def test_availability_matches_sampling_every_millisecond(
    initial: State,
    changes: list[tuple[datetime, State]],
    maintenance: list[tuple[datetime, datetime | None]],
    since: int,
    length: int,
) -> None:
    start, end = ms(since), ms(since + length)
    got = availability(initial, changes, maintenance, start, end)
    want = reference(initial, changes, maintenance, start, end)
    assert got.time_in == want["time_in"]
    assert got.maintenance == want["maintenance"]
    assert (got.outages, got.longest_outage) == (want["outages"], want["longest_outage"])
    # Every instant is counted exactly once; the ratios follow from the parts.
    assert sum(got.time_in.values(), timedelta(0)) + got.maintenance == end - start
    known = got.up + got.down
    assert got.uptime_ratio == (None if known == timedelta(0) else got.up / known)
    assert got.mean_time_to_recovery == (None if got.outages == 0 else got.down / got.outages)
    assert got.longest_outage <= got.down


def seconds(report: Availability) -> dict[str, float]:
    return {s.value: report.time_in[s].total_seconds() for s in State if report.time_in[s]} | {
        "maintenance": report.maintenance.total_seconds()
    }


def test_a_down_period_inside_maintenance_is_maintenance_not_downtime() -> None:
    # up, down from 100 to 400 ms, with maintenance over 200–300: one outage of 200 ms.
    report = availability(State.UP, [(ms(100), State.DOWN), (ms(400), State.UP)], [(ms(200), ms(300))], ms(0), ms(500))
    assert seconds(report) == {"up": 0.2, "down": 0.2, "maintenance": 0.1}
    assert (report.outages, report.longest_outage, report.mean_time_to_recovery) == (1, 200 * MS, 200 * MS)
    assert report.uptime_ratio == 0.5
    # Entirely inside maintenance: no outage at all.
    covered = availability(State.UP, [(ms(100), State.DOWN), (ms(400), State.UP)], [(ms(50), None)], ms(0), ms(500))
    assert (covered.outages, covered.down, covered.maintenance, covered.uptime_ratio) == (0, 0 * MS, 450 * MS, 1.0)


def test_edges_are_exact_and_unreachable_is_apart() -> None:
    changes = [
        (ms(-100), State.DOWN),  # before the window: sets the state at since
        (ms(250), State.UNREACHABLE),  # its relay died: not the host's downtime
        (ms(300), State.DOWN),
        (ms(900), State.UP),  # after the window: ignored
    ]
    report = availability(State.UNKNOWN, changes, [], ms(0), ms(400))
    assert seconds(report) == {"down": 0.35, "unreachable": 0.05, "maintenance": 0.0}
    assert (report.outages, report.longest_outage) == (2, 250 * MS)  # open at both edges, clipped
    assert report.uptime_ratio == 0.0
    assert availability(State.UP, [(ms(0), State.DOWN)], [], ms(0), ms(10)).down == 10 * MS  # change at since
    assert availability(State.UP, [(ms(10), State.DOWN)], [], ms(0), ms(10)).down == 0 * MS  # change at until
    empty = availability(State.DOWN, [], [], ms(5), ms(5))
    assert (empty.outages, empty.uptime_ratio, empty.mean_time_to_recovery) == (0, None, None)
    with pytest.raises(ValueError, match="before since"):
        availability(State.UP, [], [], ms(5), ms(4))


def test_maintenance_intervals_are_clipped_and_merged() -> None:
    spans = [(ms(-10), ms(5)), (ms(3), ms(8)), (ms(20), None), (ms(8), ms(9)), (ms(50), ms(60)), (ms(7), ms(7))]
    assert merge_intervals(spans, ms(0), ms(30)) == [(ms(0), ms(9)), (ms(20), ms(30))]


# --- what the store hands the computation -------------------------------------------------------


def row(subject: str, at: int, to: State, event: Event = Event.TRANSITION, kind: Kind = Kind.HOST) -> TransitionRow:
    return TransitionRow(
        kind=kind, subject=subject, from_state=State.UNKNOWN, to_state=to, at=ms(at), reason="r", event=event
    )


async def test_state_changes_give_the_state_at_since_and_the_changes_after_it(store: Store) -> None:
    await store.write(
        Batch(
            transitions=[
                row("a", 0, State.UP),
                row("a", 100, State.DOWN),
                row("a", 100, State.UNREACHABLE),  # same instant, written later: it wins
                row("a", 150, State.DOWN, event=Event.RESTART),  # not a state change
                row("a", 200, State.UP),  # exactly at since: part of the state at since
                row("a", 300, State.DOWN),
                row("a", 500, State.UP),  # exactly at until: excluded
                row("b", 250, State.UP),
                row("r1", 0, State.DOWN, kind=Kind.RELAY),
            ]
        )
    )
    initial, changes = await store.state_changes(Kind.HOST, ms(100), ms(500))
    assert initial == {"a": State.UNREACHABLE}
    assert changes == [("a", ms(200), State.UP), ("b", ms(250), State.UP), ("a", ms(300), State.DOWN)]
    initial, changes = await store.state_changes(Kind.HOST, ms(200), ms(500), "a")
    assert (initial, changes) == ({"a": State.UP}, [("a", ms(300), State.DOWN)])
    assert (await store.state_changes(Kind.RELAY, ms(1), ms(2))) == ({"r1": State.DOWN}, [])
    latest = await store.latest_changes(Kind.HOST)
    assert {s: (r.at, r.to_state) for s, r in latest.items()} == {"a": (ms(500), State.UP), "b": (ms(250), State.UP)}


# --- the API against a real monitor -------------------------------------------------------------


@pytest.fixture
async def fleet(store: Store) -> Fleet:
    """web-1 up, down at +3 s (silent), up again at +10 s; web-2 and edge-1 up throughout; then 2 s more."""
    clock = FakeClock()
    fleet = Fleet(new_monitor(store, clock), clock)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0})
    for _ in range(9):
        fleet.send({"web-2": 0, "db-1": 0}, {"edge-1": 0}, after=1)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0}, after=1)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0}, after=2)
    await fleet.monitor.flush()
    return fleet


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    async with api(fleet.monitor) as http:
        yield http


def q(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def web_1_times(fleet: Fleet) -> tuple[datetime, datetime, datetime]:
    rows = await fleet.history("web-1")
    assert [(r.to_state, r.maintenance) for r in rows] == [(State.UP, False), (State.DOWN, False), (State.UP, False)]
    return rows[0].at, rows[1].at, rows[2].at


async def test_host_availability_is_exact_over_the_transitions(fleet: Fleet, client: httpx.AsyncClient) -> None:
    up, down, back = await web_1_times(fleet)
    assert (down - up, back - down) == (timedelta(seconds=3), timedelta(seconds=7))
    since, until = up + timedelta(seconds=1), back + timedelta(seconds=2)
    report = await call(client, "GET", f"/api/v1/hosts/web-1/availability?since={q(since)}&until={q(until)}", 200)
    assert (report["kind"], report["id"]) == ("host", "web-1")
    assert (report["since"], report["until"]) == (iso(since), iso(until))
    assert report["seconds"] == {
        "up": 4.0, "down": 7.0, "unreachable": 0, "stopped": 0, "unknown": 0, "maintenance": 0, "false_alarm": 0
    }  # fmt: skip
    assert report["false_alarm_s"] == 0
    assert (report["downtime_s"], report["outages"], report["longest_outage_s"]) == (7.0, 1, 7.0)
    assert report["mean_time_to_recovery_s"] == 7.0
    assert report["uptime_ratio"] == pytest.approx(4 / 11)

    # Before it was first seen the host was unknown; a window reaching into the future ends now.
    early = await call(client, "GET", f"/api/v1/hosts/web-1/availability?since={q(up - timedelta(seconds=5))}", 200)
    assert early["seconds"]["unknown"] == 5.0
    assert early["until"] == iso(fleet.wall())
    later = await call(client, "GET", f"/api/v1/hosts/web-2/availability?until={q(until + timedelta(days=1))}", 200)
    assert later["until"] == early["until"]
    assert later["uptime_ratio"] == 1.0
    assert later["outages"] == 0


async def test_maintenance_time_is_reported_apart_from_downtime(fleet: Fleet, client: httpx.AsyncClient) -> None:
    up, down, back = await web_1_times(fleet)
    window = {"host": "web-1", "starts_at": q(down + timedelta(seconds=2)), "ends_at": q(down + timedelta(seconds=4))}
    await call(client, "POST", "/api/v1/maintenance", 201, json=window, headers=AUTH)
    path = f"/api/v1/hosts/web-1/availability?since={q(up)}&until={q(back)}"
    report = await call(client, "GET", path, 200)
    assert report["seconds"]["up"] == 3.0
    assert (report["downtime_s"], report["seconds"]["maintenance"], report["outages"]) == (5.0, 2.0, 1)
    # Maintenance over the whole outage (a relay window covers its hosts): no downtime at all.
    await call(client, "POST", "/api/v1/maintenance", 201, json={"relay": "r1", "starts_at": q(down)}, headers=AUTH)
    report = await call(client, "GET", path, 200)
    assert (report["downtime_s"], report["outages"], report["uptime_ratio"]) == (0, 0, 1.0)
    assert report["seconds"]["maintenance"] == 7.0
    assert report["mean_time_to_recovery_s"] is None


async def test_relay_availability_and_unknown_ids(fleet: Fleet, client: httpx.AsyncClient) -> None:
    r2 = await call(client, "GET", "/api/v1/relays/r2/availability", 200)
    assert (r2["kind"], r2["uptime_ratio"], r2["outages"]) == ("relay", 1.0, 0)
    assert (r2["seconds"]["unknown"], r2["seconds"]["up"]) == (24 * 3600 - 12, 12)  # default: the last 24 h
    await call(client, "GET", "/api/v1/relays/r9/availability", 404)
    await call(client, "GET", "/api/v1/hosts/nope/availability", 404)
    naive = await call(client, "GET", "/api/v1/hosts/web-1/availability?since=2025-01-01T00:00:00", 422)
    assert "time zone" in naive["detail"]
    await call(client, "GET", "/api/v1/hosts/web-1/availability?since=0", 422)  # not read as a Unix time
    await call(client, "GET", "/api/v1/summary?until=1e9", 422)
    # A window that is empty (backwards, or starting after now) reports nothing, as /transitions does.
    for empty in ["since=2025-01-02T00:00:00Z&until=2025-01-01T00:00:00Z", "since=2999-01-01T00:00:00Z"]:
        report = await call(client, "GET", f"/api/v1/hosts/web-1/availability?{empty}", 200)
        assert report["since"] == report["until"]
        assert report["uptime_ratio"] is None
        assert report["outages"] == 0
    # Beyond the years 1–9999 once in UTC: unbounded on that side.
    edges = await call(client, "GET", "/api/v1/hosts/web-1/availability?since=0001-01-01T00:00:00%2B01:00", 200)
    assert edges["since"] == "0001-01-01T00:00:00.000Z"
    assert edges["downtime_s"] == 7.0


async def test_summary_counts_states_and_ranks_the_worst_hosts(fleet: Fleet, client: httpx.AsyncClient) -> None:
    for _ in range(5):  # db-1 goes silent, and r2 with edge-1 behind it
        fleet.send({"web-1": 0, "web-2": 0}, after=1)
    await fleet.monitor.flush()
    await call(client, "POST", "/api/v1/maintenance", 201, json={"host": "web-2"}, headers=AUTH)
    summary = await call(client, "GET", "/api/v1/summary", 200)
    hosts = summary["hosts"]
    assert hosts["total"] == 4
    assert hosts["in_maintenance"] == 1
    assert hosts["flapping"] == 0
    assert {s: n for s, n in hosts["states"].items() if n} == {"up": 2, "down": 1, "unreachable": 1}
    assert {s: n for s, n in summary["relays"]["states"].items() if n} == {"up": 1, "down": 1}
    worst = [(h["id"], h["state"], h["outages"]) for h in summary["worst_hosts"]]
    assert worst == [("web-1", "up", 1), ("db-1", "down", 1)]
    assert [h["downtime_s"] for h in summary["worst_hosts"]] == [7.0, 2.0]
    assert (await call(client, "GET", "/api/v1/summary?worst=1", 200))["worst_hosts"][0]["id"] == "web-1"
    assert (await call(client, "GET", "/api/v1/summary?worst=0", 200))["worst_hosts"] == []
