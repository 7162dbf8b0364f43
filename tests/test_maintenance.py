"""Maintenance windows and acknowledgements: the pure book, the monitor's marking, the API, restarts.

The API tests run a real monitor (fed through its own `take`, on a fake monotonic clock) with a
real store: a SQLite file always, PostgreSQL too when RELAYBEAT_TEST_DB_URL is set.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from relaybeat.api import availability, operations
from relaybeat.api.auth import ApiSettings
from relaybeat.monitor.maintenance import MaintenanceBook, TargetKind, Window
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.store import Store, TransitionRow, async_url
from tests.fakes import FakeClock
from tests.monitors import AUTH, READ_TOKEN, WRITE_TOKEN, Fleet, api, call, new_monitor

JSON = {"Content-Type": "application/json"}
T0 = datetime(2025, 6, 1, tzinfo=UTC)


# --- the pure book ------------------------------------------------------------------------------


def window(kind: TargetKind, target: str, start: int = 0, end: int | None = None, **changes: Any) -> Window:
    values: dict[str, Any] = {
        "id": 1,
        "target_kind": kind,
        "target": target,
        "starts_at": T0 + timedelta(minutes=start),
        "ends_at": None if end is None else T0 + timedelta(minutes=end),
        "reason": "",
        "created_at": T0,
    }
    return Window(**(values | changes))


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def test_a_host_window_covers_that_host_only_and_is_half_open() -> None:
    book = MaintenanceBook([window(TargetKind.HOST, "web-1", 10, 20)])
    assert book.covers(Kind.HOST, "web-1", ["r1"], at(10))
    assert book.covers(Kind.HOST, "web-1", [], at(19.99))
    assert not book.covers(Kind.HOST, "web-1", ["r1"], at(9.99))
    assert not book.covers(Kind.HOST, "web-1", ["r1"], at(20))  # ends_at is exclusive
    assert not book.covers(Kind.HOST, "web-10", ["r1"], at(15))
    assert not book.covers(Kind.RELAY, "web-1", [], at(15))  # a relay that happens to share the name


def test_a_glob_window_covers_matching_hosts_and_never_relays() -> None:
    book = MaintenanceBook([window(TargetKind.GLOB, "web-*")])
    assert book.covers(Kind.HOST, "web-1", [], at(5))
    assert book.covers(Kind.HOST, "web-", [], at(5))
    assert not book.covers(Kind.HOST, "WEB-1", [], at(5))  # case-sensitive, like host ids
    assert not book.covers(Kind.HOST, "db-1", [], at(5))
    assert not book.covers(Kind.RELAY, "web-relay", [], at(5))
    assert not book.covers(Kind.HOST, "web-1", [], at(-1))  # not started yet


def test_a_relay_window_covers_the_relay_its_subtree_and_their_hosts() -> None:
    book = MaintenanceBook([window(TargetKind.RELAY, "r1")])
    assert book.covers(Kind.RELAY, "r1", [], at(1))
    assert book.covers(Kind.RELAY, "r2", ["r1"], at(1))  # child relay
    assert book.covers(Kind.RELAY, "r3", ["r2", "r1"], at(1))  # grandchild
    assert book.covers(Kind.HOST, "edge-7", ["r3", "r2", "r1"], at(1))
    assert not book.covers(Kind.RELAY, "r0", [], at(1))  # the relay above it
    assert not book.covers(Kind.HOST, "web-1", ["r0"], at(1))
    assert not book.covers(Kind.HOST, "r1", [], at(1))  # a host named like the relay, beating directly


def test_removal_ends_a_window_early_but_keeps_it() -> None:
    book = MaintenanceBook([window(TargetKind.HOST, "h", 0, None)])
    assert book.covers(Kind.HOST, "h", [], at(10_000))  # until removed
    removed = book.remove(1, at(30))
    assert removed is not None
    assert removed.end == at(30)
    assert book.remove(1, at(40)) is None  # removed already
    assert book.remove(2, at(40)) is None  # no such window
    assert book.covers(Kind.HOST, "h", [], at(29))
    assert not book.covers(Kind.HOST, "h", [], at(30))
    assert book.intervals(Kind.HOST, "h", []) == [(at(0), at(30))]
    assert [w.id for w in book.windows()] == [1]
    assert book.active(at(31)) == []


def test_intervals_are_the_subjects_windows_in_start_order() -> None:
    book = MaintenanceBook(
        [
            window(TargetKind.RELAY, "r1", 50, 60, id=1),
            window(TargetKind.GLOB, "h*", 10, None, id=2),
            window(TargetKind.HOST, "other", 0, 5, id=3),
            window(TargetKind.HOST, "h1", 5, 5, id=4),  # empty: covers nothing
        ]
    )
    assert book.intervals(Kind.HOST, "h1", ["r1"]) == [(at(10), None), (at(50), at(60))]
    assert book.intervals(Kind.HOST, "h1", ["r9"]) == [(at(10), None)]


@settings(max_examples=200, deadline=None)
@given(
    targets=st.lists(
        st.tuples(st.sampled_from(list(TargetKind)), st.sampled_from(["h1", "h*", "r1", "r2", "x"])), max_size=5
    ),
    spans=st.lists(st.tuples(st.integers(0, 20), st.none() | st.integers(0, 20), st.none() | st.integers(0, 20))),
    kind=st.sampled_from(list(Kind)),
    subject=st.sampled_from(["h1", "h2", "r1", "r2"]),
    path=st.sampled_from([[], ["r1"], ["r2", "r1"], ["r2"]]),
    minute=st.integers(-1, 21),
)
def test_covers_agrees_with_the_subjects_intervals(
    targets: list[tuple[TargetKind, str]],
    spans: list[tuple[int, int | None, int | None]],
    kind: Kind,
    subject: str,
    path: list[str],
    minute: int,
) -> None:
    windows = [
        window(target_kind, target, start, end, id=i, removed_at=None if removed is None else at(removed))
        for i, ((target_kind, target), (start, end, removed)) in enumerate(zip(targets, spans, strict=False))
    ]
    book = MaintenanceBook(windows)
    moment = at(minute)
    spans_of_subject = book.intervals(kind, subject, path)
    inside = any(start <= moment and (end is None or moment < end) for start, end in spans_of_subject)
    assert book.covers(kind, subject, path, moment) == inside


# --- a real monitor behind the API --------------------------------------------------------------


@pytest.fixture
async def fleet(store: Store) -> Fleet:
    clock = FakeClock()
    fleet = Fleet(new_monitor(store, clock), clock)
    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0})
    fleet.clock.t += 0.5
    await fleet.monitor.flush()
    return fleet


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    async with api(fleet.monitor) as http:
        yield http


async def add(client: httpx.AsyncClient, body: dict[str, Any], status: int = 201) -> Any:
    return await call(client, "POST", "/api/v1/maintenance", status, json=body, headers=AUTH)


def marks(rows: list[TransitionRow]) -> list[tuple[State, State, bool]]:
    return [(r.from_state, r.to_state, r.maintenance) for r in rows]


async def test_transitions_in_maintenance_are_recorded_and_marked(fleet: Fleet, client: httpx.AsyncClient) -> None:
    glob = await add(client, {"glob": "web-*", "reason": "kernel update"})
    relay = await add(client, {"relay": "r2"})
    assert (glob["target_kind"], glob["target"], glob["ends_at"], glob["active"]) == ("glob", "web-*", None, True)
    assert glob["covers"] == {"hosts": 2, "relays": 0}
    assert relay["covers"] == {"hosts": 1, "relays": 1}

    # 10 s later web-1 and db-1 have been silent past their timeout; r2 then stops being folded in.
    fleet.send({"web-1": 10_000, "web-2": 0, "db-1": 10_000}, {"edge-1": 0}, after=10)
    for _ in range(5):
        fleet.send({"web-2": 0}, after=1)

    assert marks(await fleet.history("web-1")) == [(State.UNKNOWN, State.UP, False), (State.UP, State.DOWN, True)]
    assert marks(await fleet.history("db-1")) == [(State.UNKNOWN, State.UP, False), (State.UP, State.DOWN, False)]
    assert marks(await fleet.history("r2"))[-1] == (State.UP, State.DOWN, True)
    assert marks(await fleet.history("edge-1"))[-1] == (State.UP, State.UNREACHABLE, True)
    assert fleet.monitor.in_maintenance(Kind.HOST, "edge-1", fleet.wall())
    assert not fleet.monitor.in_maintenance(Kind.RELAY, "r1", fleet.wall())

    # Removed: web-2's outage is an ordinary one again.
    await call(client, "DELETE", f"/api/v1/maintenance/{glob['id']}", 200, headers=AUTH)
    fleet.send({}, after=5)
    assert marks(await fleet.history("web-2"))[-1] == (State.UP, State.DOWN, False)


async def test_a_relay_window_marks_its_whole_subtree_when_the_relay_dies(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    await add(client, {"relay": "r1", "duration_s": 60})
    fleet.advance(5)  # r1 silent past flush × misses: down, and everything below it unreachable
    rows = [row for subject in ("r1", "r2", "web-1", "edge-1") for row in (await fleet.history(subject))[1:]]
    assert [(r.subject, r.to_state, r.maintenance) for r in rows] == [
        ("r1", State.DOWN, True),
        ("r2", State.UNREACHABLE, True),
        ("web-1", State.UNREACHABLE, True),
        ("edge-1", State.UNREACHABLE, True),
    ]


async def test_a_window_marks_only_inside_its_time(fleet: Fleet, client: httpx.AsyncClient) -> None:
    now = fleet.wall()
    await add(client, {"host": "web-1", "starts_at": (now + timedelta(seconds=20)).isoformat()})
    await add(client, {"host": "db-1", "starts_at": (now - timedelta(hours=1)).isoformat(), "ends_at": now.isoformat()})
    fleet.send({"web-2": 0}, {"edge-1": 0}, after=10)  # web-1 and db-1 went down at +3 s: neither window covered that
    assert marks(await fleet.history("web-1"))[-1] == (State.UP, State.DOWN, False)
    assert marks(await fleet.history("db-1"))[-1] == (State.UP, State.DOWN, False)
    listed = await call(client, "GET", "/api/v1/maintenance", 200)
    assert [(w["target"], w["active"]) for w in listed["items"]] == [("web-1", False)]  # upcoming, not past
    everything = await call(client, "GET", "/api/v1/maintenance?include_past=true", 200)
    assert [w["target"] for w in everything["items"]] == ["db-1", "web-1"]  # newest first


async def test_windows_survive_a_monitor_restart(fleet: Fleet, client: httpx.AsyncClient, store: Store) -> None:
    kept = await add(client, {"glob": "web-*", "duration_s": 3600, "reason": "r"})
    gone = await add(client, {"host": "db-1"})
    await call(client, "DELETE", f"/api/v1/maintenance/{gone['id']}", 200, headers=AUTH)

    clock = FakeClock()
    clock.t = fleet.clock.t + 1
    restarted = new_monitor(store, clock)
    await restarted.restore()
    assert restarted.maintenance.windows() == fleet.monitor.maintenance.windows()
    assert [w.id for w in restarted.maintenance.active(clock.wall(clock.t))] == [kept["id"]]
    assert restarted.in_maintenance(Kind.HOST, "web-9", clock.wall(clock.t))
    assert not restarted.in_maintenance(Kind.HOST, "db-1", clock.wall(clock.t))


async def test_maintenance_api_validates_its_input(fleet: Fleet, client: httpx.AsyncClient) -> None:
    bad_bodies: list[dict[str, Any]] = [
        {},
        {"host": "a", "relay": "r1"},
        {"host": "bad id"},
        {"glob": "web/*"},
        {"host": "a", "ends_at": "2030-01-01T00:00:00"},  # no time zone
        {"host": "a", "duration_s": 0},
        {"host": "a", "until": "tomorrow"},  # unknown field
    ]
    for bad in bad_bodies:
        await add(client, bad, 422)
    not_windows: list[dict[str, Any]] = [
        {"host": "a", "starts_at": "2030-01-01T00:00:00Z", "ends_at": "2029-01-01T00:00:00Z"},
        {"host": "a", "ends_at": "2020-01-01T00:00:00Z"},  # starts now, so it would end before it starts
        {"host": "a", "ends_at": "2030-01-01T00:00:00Z", "duration_s": 60},
        {"host": "a", "starts_at": "9999-12-31T23:59:00Z", "duration_s": 3600},
    ]
    for bad in not_windows:
        assert (await add(client, bad, 409))["error"] == "bad_window"
    assert fleet.monitor.maintenance.windows() == []
    not_utf8 = await client.post("/api/v1/maintenance", content=b"\xff{", headers=AUTH | JSON)
    assert not_utf8.status_code == 400
    window = await add(client, {"host": "not-yet-seen", "duration_s": 90})
    assert window["covers"] == {"hosts": 0, "relays": 0}  # a host may be put in maintenance before it appears
    starts = datetime.fromisoformat(window["starts_at"])
    assert datetime.fromisoformat(window["ends_at"]) - starts == timedelta(seconds=90)
    assert (await call(client, "GET", f"/api/v1/maintenance/{window['id']}", 200))["id"] == window["id"]
    await call(client, "GET", "/api/v1/maintenance/999", 404)
    await call(client, "DELETE", "/api/v1/maintenance/999", 404, headers=AUTH)
    removed = await call(client, "DELETE", f"/api/v1/maintenance/{window['id']}", 200, headers=AUTH)
    assert removed["removed_at"] is not None
    assert removed["active"] is False
    again = await call(client, "DELETE", f"/api/v1/maintenance/{window['id']}", 409, headers=AUTH)
    assert again["error"] == "already_removed"


async def test_every_write_needs_a_write_token(fleet: Fleet, client: httpx.AsyncClient) -> None:
    fleet.send({"web-2": 0}, {"edge-1": 0}, after=10)  # web-1 is down: there is an outage to acknowledge
    writes = [
        ("POST", "/api/v1/maintenance", {"host": "web-1"}),
        ("DELETE", "/api/v1/maintenance/1", None),
        ("POST", "/api/v1/hosts/web-1/ack", {"comment": "on it"}),
        ("POST", "/api/v1/relays/r1/ack", {"comment": "on it"}),
    ]
    read_only = {"Authorization": f"Bearer {READ_TOKEN}"}
    wrong = {"Authorization": "Bearer not-a-token-at-all"}
    async with api(fleet.monitor, ApiSettings()) as no_writers:
        for method, path, body in writes:
            assert (await call(client, method, path, 401, json=body))["error"] == "unauthorized"
            await call(client, method, path, 401, json=body, headers=wrong)
            assert (await call(client, method, path, 403, json=body, headers=read_only))["error"] == "forbidden"
            refused = await call(no_writers, method, path, 403, json=body, headers=AUTH)
            assert refused["error"] == "writes_disabled"
    assert fleet.monitor.maintenance.windows() == []
    assert await fleet.monitor.store.acknowledgements() == []


async def test_reads_follow_the_read_rules(fleet: Fleet) -> None:
    closed = ApiSettings(read_open=False, read_tokens=(READ_TOKEN,), write_tokens=(WRITE_TOKEN,))
    async with api(fleet.monitor, closed) as client:
        for path in ["/api/v1/maintenance", "/api/v1/acks", "/api/v1/hosts/web-1/acks"]:
            await call(client, "GET", path, 401)
            await call(client, "GET", path, 200, headers={"Authorization": f"Bearer {READ_TOKEN}"})
        await add(client, {"host": "web-1"})  # a write token reads and writes


# --- acknowledgements ---------------------------------------------------------------------------


async def test_acknowledging_an_outage_links_its_transition_and_lasts_while_it_does(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    ack = {"comment": "disk full, cleaning up", "by": "alice"}
    nope = await call(client, "POST", "/api/v1/hosts/web-1/ack", 409, json=ack, headers=AUTH)
    assert nope == {"error": "no_outage", "detail": "host 'web-1' is up: no outage to acknowledge"}
    await call(client, "POST", "/api/v1/hosts/nope/ack", 404, json=ack, headers=AUTH)
    await call(client, "POST", "/api/v1/hosts/web-1/ack", 422, json={"comment": ""}, headers=AUTH)

    fleet.send({"web-2": 0, "db-1": 0}, {"edge-1": 0}, after=10)
    down = (await fleet.history("web-1"))[-1]
    assert down.to_state == State.DOWN
    made = await call(client, "POST", "/api/v1/hosts/web-1/ack", 201, json=ack, headers=AUTH)
    assert (made["transition_id"], made["comment"], made["by"], made["current"]) == (
        down.id,
        ack["comment"],
        "alice",
        True,
    )

    listed = await call(client, "GET", "/api/v1/hosts/web-1/acks", 200)
    assert [a["id"] for a in listed["items"]] == [made["id"]]
    assert listed["items"][0]["current"] is True
    assert [a["subject"] for a in (await call(client, "GET", "/api/v1/acks?current=true", 200))["items"]] == ["web-1"]
    assert (await call(client, "GET", "/api/v1/hosts/web-2/acks", 200))["items"] == []
    await call(client, "GET", "/api/v1/hosts/nope/acks", 404)

    fleet.send({"web-1": 0, "web-2": 0, "db-1": 0}, {"edge-1": 0}, after=1)  # web-1 is back: the outage is over
    assert (await call(client, "GET", "/api/v1/hosts/web-1/acks", 200))["items"][0]["current"] is False
    assert (await call(client, "GET", "/api/v1/acks?current=true", 200))["items"] == []
    assert (await call(client, "GET", "/api/v1/acks?current=false&kind=host", 200))["total"] == 1


async def test_a_relay_outage_can_be_acknowledged(
    fleet: Fleet, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.advance(5)  # r1 silent: down; r2 unreachable. Acknowledged before that reaches SQL:
    store, looked = fleet.monitor.store, asyncio.Event()
    latest_changes = store.latest_changes

    async def spy(kind: Kind, subjects: list[str]) -> dict[str, TransitionRow]:
        found = await latest_changes(kind, subjects)
        looked.set()
        return found

    monkeypatch.setattr(store, "latest_changes", spy)
    posting = asyncio.create_task(
        client.post("/api/v1/relays/r1/ack", json={"comment": "power cut at site A"}, headers=AUTH)
    )
    await asyncio.wait_for(looked.wait(), 5)  # it found no row yet, and waits for the next write
    await fleet.monitor.flush()
    response = await posting
    assert response.status_code == 201, response.text
    r1 = response.json()
    r2 = await call(client, "POST", "/api/v1/relays/r2/ack", 201, json={"comment": "behind r1"}, headers=AUTH)
    assert r1["kind"] == "relay"
    assert r1["transition_id"] == (await fleet.history("r1"))[-1].id
    assert r2["transition_id"] == (await fleet.history("r2"))[-1].id
    assert [a["subject"] for a in (await call(client, "GET", "/api/v1/acks?kind=relay", 200))["items"]] == ["r2", "r1"]
    assert (await call(client, "GET", "/api/v1/relays/r1/acks", 200))["total"] == 1
    await call(client, "POST", "/api/v1/relays/r9/ack", 404, json={"comment": "x"}, headers=AUTH)


# --- schema -------------------------------------------------------------------------------------


async def test_migration_0002_keeps_history_and_marks_it_not_in_maintenance(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.upgrade()
        await store.downgrade("0001")
        engine = create_async_engine(async_url(db_url))
        try:
            async with engine.begin() as connection:  # a row written by a 0001-era monitor
                await connection.execute(
                    text(
                        "INSERT INTO transitions (kind, subject, from_state, to_state, at, reason) "
                        "VALUES ('host', 'old', 'up', 'down', :at, 'no beat')"
                    ),
                    {"at": T0 if store.dialect == "postgresql" else T0.replace(tzinfo=None)},
                )
        finally:
            await engine.dispose()
        await store.upgrade()
        await store.downgrade("0001")
        await store.upgrade()
        [row] = await store.history()
        assert (row.subject, row.at, row.maintenance) == ("old", T0, False)
        assert await store.maintenance_windows() == []
        assert await store.model_changes() == []
    finally:
        await store.close()


# --- docs ---------------------------------------------------------------------------------------


def test_the_readme_has_a_curl_example_for_every_operations_and_availability_route() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    commands = " ".join(readme.replace("\\\n", " ").splitlines()).split("curl ")[1:]
    for route in [*operations.router.routes, *availability.router.routes]:
        assert isinstance(route, APIRoute)
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/?' ]+", re.escape(route.path)) + r"(?=[?' ]|$)"
        for method in route.methods or ():
            flag = {"GET": "", "POST": "-d ", "DELETE": "-X DELETE "}[method]
            found = [c for c in commands if re.search(pattern, c) and flag in c and ("-d " in c) == (method == "POST")]
            assert found, f"README: no curl example for {method} {route.path}"
