"""The store against real databases: a SQLite file always, PostgreSQL when RELAYBEAT_TEST_DB_URL is set.

`db_url` (tests/conftest.py) gives each PostgreSQL test its own schema, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import cast

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.store import (
    Batch,
    DatabaseUnavailable,
    HostRow,
    RelayRow,
    Store,
    TransitionRow,
    async_url,
    downgrade_sync,
    pending_model_changes,
    upgrade_sync,
)

TABLES = {
    "transitions",
    "hosts",
    "relays",
    "maintenance",
    "acknowledgements",
    "outbox",
    "alerts",
    "detections",
    "false_alarms",
    "monitor_lease",
    "monitor_nodes",
}

T0 = datetime(2024, 1, 1, tzinfo=UTC)
PLUS_2 = timezone(timedelta(hours=2))


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


def host(id: str = "h1", state: State = State.UP, since: datetime = T0, **changes: object) -> HostRow:
    values: dict[str, object] = {
        "id": id,
        "state": state,
        "since": since,
        "last_seen": since,
        "relay": "r1",
        "interval_s": 5.0,
        "seq": 1,
        "flapping": False,
    }
    return HostRow(**(values | changes))  # type: ignore[arg-type]


def relay(id: str = "r1", state: State = State.UP, since: datetime = T0, **changes: object) -> RelayRow:
    values: dict[str, object] = {
        "id": id,
        "state": state,
        "since": since,
        "last_seen": since,
        "parent": None,
        "boot": "boot-1",
        "seq": 1,
        "flush_s": 1.0,
        "flapping": False,
    }
    return RelayRow(**(values | changes))  # type: ignore[arg-type]


def transition(
    subject: str,
    at: datetime,
    kind: Kind = Kind.HOST,
    event: Event = Event.TRANSITION,
    to_state: State = State.UP,
) -> TransitionRow:
    return TransitionRow(
        kind=kind,
        subject=subject,
        from_state=State.UNKNOWN,
        to_state=to_state,
        at=at,
        reason="test",
        relay="r1",
        event=event,
    )


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite:////abs/x.db", "sqlite+aiosqlite:////abs/x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgresql://u:p%40ss@h:5432/db", "postgresql+psycopg_async://u:p%40ss@h:5432/db"),
        ("postgresql+psycopg://u@h/db?sslmode=require", "postgresql+psycopg_async://u@h/db?sslmode=require"),
        ("postgresql+psycopg_async://u@h/db", "postgresql+psycopg_async://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_async_url_picks_the_async_driver(url: str, expected: str) -> None:
    assert async_url(url) == expected


@pytest.mark.parametrize("url", ["mysql://u@h/db", "not a url", ""])
def test_async_url_rejects_unsupported_urls_with_a_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql://"):
        async_url(url)


async def test_open_fails_at_once_when_the_server_is_down(free_port: int) -> None:
    with pytest.raises(DatabaseUnavailable, match="Connection refused; is the database server running"):
        await Store.open(f"postgresql://postgres:s3cret@127.0.0.1:{free_port}/relaybeat")


async def test_open_names_a_missing_sqlite_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no directory"):
        await Store.open(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")


# --- migrations ---------------------------------------------------------------------------------


async def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.upgrade()
        assert await table_names(db_url) >= TABLES
        await store.upgrade()  # at head already: a no-op
        await asyncio.to_thread(downgrade_sync, db_url)
        assert not TABLES & await table_names(db_url)
        await asyncio.to_thread(upgrade_sync, db_url)
        assert await table_names(db_url) >= TABLES
        await store.write(Batch(transitions=[transition("h1", T0)], hosts=[host()], relays=[relay()]))
        assert len(await store.history()) == 1
    finally:
        await store.close()


async def test_models_match_migrations(store: Store, db_url: str) -> None:
    assert await store.model_changes() == []
    assert await asyncio.to_thread(pending_model_changes, db_url) == []


async def test_model_changes_reports_a_database_that_is_not_migrated(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        changes = await store.model_changes()
    finally:
        await store.close()
    assert {change[1].name for change in changes if change[0] == "add_table"} == TABLES


async def test_concurrent_upgrades_do_not_fail(db_url: str) -> None:
    # Alembic keeps process-global state, so without the lock taken before it (an advisory lock on
    # PostgreSQL, BEGIN IMMEDIATE on SQLite) concurrent upgrades hang or fail: bound the wait.
    stores = [await Store.open(db_url) for _ in range(3)]
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(store.upgrade() for store in stores))
        assert await stores[0].model_changes() == []
    finally:
        for store in stores:
            await store.close()


# --- write and load -----------------------------------------------------------------------------


async def test_write_and_load_round_trip_returns_aware_utc(store: Store) -> None:
    since = datetime(2024, 3, 1, 14, 30, 15, 123456, tzinfo=PLUS_2)
    hosts = [
        host("h1", since=since),
        host("h2", State.DOWN, since, last_seen=None, relay=None, seq=None),
        host("h3", since=since, source="tasmota"),  # a watched source's device (issue 13)
    ]
    relays = [relay("r1", since=since), relay("r2", since=since, parent="r1", boot=None, seq=2**40)]
    await store.write(Batch(transitions=[transition("h1", since)], hosts=hosts, relays=relays))

    loaded_hosts, loaded_relays = await store.load()

    assert loaded_hosts == hosts
    assert loaded_relays == relays
    [record] = await store.history()
    assert record.at == since
    rows: list[HostRow | RelayRow] = [*loaded_hosts, *loaded_relays]
    for moment in [record.at, *(row.since for row in rows)]:
        assert moment.tzinfo is not None
        assert moment.utcoffset() == timedelta(0)
    assert loaded_hosts[0].since.hour == 12  # 14:30 at +02:00, seen as UTC


async def test_write_upserts_existing_rows(store: Store) -> None:
    await store.write(Batch(hosts=[host("h1"), host("h2")], relays=[relay("r1")]))
    later = T0 + timedelta(minutes=5)
    changed_host = host("h1", State.DOWN, later, relay="r2", interval_s=10.0, seq=7, flapping=True)
    changed_relay = relay("r1", State.DOWN, later, parent="r0", boot="boot-2", seq=9, flush_s=2.5)
    await store.write(Batch(hosts=[changed_host], relays=[changed_relay]))

    hosts, relays = await store.load()

    assert hosts == [changed_host, host("h2")]
    assert relays == [changed_relay]


async def test_write_keeps_the_last_row_when_an_id_repeats(store: Store) -> None:
    await store.write(Batch(hosts=[host("h1", State.UP), host("h1", State.DOWN)], relays=[relay(seq=1), relay(seq=2)]))

    hosts, relays = await store.load()

    assert [row.state for row in hosts] == [State.DOWN]
    assert [row.seq for row in relays] == [2]


async def test_write_is_one_transaction(store: Store) -> None:
    broken = host("h2", state=cast(State, None))  # violates NOT NULL after the transition is inserted
    with pytest.raises(IntegrityError):
        await store.write(Batch(transitions=[transition("h1", T0)], hosts=[host("h1"), broken]))

    assert await store.history() == []
    assert await store.load() == ([], [])


async def test_forget_host_deletes_its_row_and_keeps_history(store: Store) -> None:
    await store.write(Batch(transitions=[transition("h1", T0)], hosts=[host("h1"), host("h2")]))

    assert await store.forget_host("h1") is True
    assert await store.forget_host("h1") is False
    hosts, _ = await store.load()
    assert [row.id for row in hosts] == ["h2"]
    assert [record.subject for record in await store.history()] == ["h1"]


async def test_last_transition_id_is_zero_when_empty_then_the_newest_id(store: Store) -> None:
    assert await store.last_transition_id() == 0
    await store.write(Batch(transitions=[transition("h1", T0), transition("h2", T0)]))
    newest = await store.history(limit=1)
    assert await store.last_transition_id() == newest[0].id


async def test_ping_reads_the_history_and_holds_no_transaction_between_pings(store: Store) -> None:
    await store.ping()
    await store.write(Batch(transitions=[transition("h1", T0)]))  # beside the connection the ping keeps
    await store.ping()
    assert [record.subject for record in await store.history()] == ["h1"]
    async with asyncio.timeout(10):  # PostgreSQL: DROP TABLE would wait for a transaction the ping held open
        await store.downgrade()
    with pytest.raises((sqlite3.OperationalError, psycopg.Error)):  # it reads the table: not there now
        await store.ping()
    await store.upgrade()
    await store.ping()  # the failed connection was dropped: a fresh one


def test_naive_datetimes_are_refused() -> None:
    naive = datetime(2024, 1, 1)
    with pytest.raises(ValueError, match="naive"):
        host(since=naive)
    with pytest.raises(ValueError, match="naive"):
        relay(last_seen=naive)
    with pytest.raises(ValueError, match="naive"):
        transition("h1", naive)


# --- transition keys (the journal's replays) --------------------------------------------------


async def test_a_transition_written_again_with_its_key_is_stored_once(store: Store) -> None:
    keyed = [replace(transition("h1", T0), key="k-1"), replace(transition("h2", T0), key="k-2")]
    await store.write(Batch(transitions=keyed, hosts=[host("h1")]))
    await store.write(
        Batch(transitions=[keyed[1], replace(transition("h3", T0), key="k-3")], hosts=[host("h1", State.DOWN)])
    )
    await store.write(Batch(transitions=[transition("h4", T0), transition("h4", T0)]))  # rows without a key never clash

    assert sorted(record.subject for record in await store.history()) == ["h1", "h2", "h3", "h4", "h4"]
    assert await store.stored_keys(["k-2", "k-3", "k-9", "k-2"]) == {"k-2", "k-3"}
    assert [row.state for row in (await store.load())[0]] == [State.DOWN]  # the state rows still apply


async def test_stored_keys_answers_for_more_keys_than_one_query_binds(store: Store) -> None:
    rows = [replace(transition(f"h{i}", T0), key=f"k-{i}") for i in range(1200)]
    await store.write(Batch(transitions=rows))
    assert len(await store.stored_keys([f"k-{i}" for i in range(0, 2400, 2)])) == 600


async def test_the_key_migration_goes_down_and_up_on_a_history_with_rows(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.upgrade()
        await store.write(Batch(transitions=[replace(transition("h1", T0), key="k-1")]))
        await store.downgrade("0003")
        assert "key" not in await column_names(db_url, "transitions")
        if store.dialect == "sqlite":  # dropping a column copies the table there: ids stay never reused
            assert "AUTOINCREMENT" in await table_sql(db_url, "transitions")
        await store.upgrade()
        assert await store.model_changes() == []
        assert [record.subject for record in await store.history()] == ["h1"]
        assert await store.stored_keys(["k-1"]) == set()  # keys went with the column
        await store.write(Batch(transitions=[replace(transition("h1", T0), key="k-1")] * 2))
        assert len(await store.history()) == 2
    finally:
        await store.close()


async def table_sql(url: str, table: str) -> str:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            query = text("SELECT sql FROM sqlite_master WHERE name = :table")
            return str(await connection.scalar(query, {"table": table}))
    finally:
        await engine.dispose()


async def column_names(url: str, table: str) -> set[str]:
    engine = create_async_engine(async_url(url))
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(lambda sync: inspect(sync).get_columns(table))
            return {column["name"] for column in columns}
    finally:
        await engine.dispose()


# --- history ------------------------------------------------------------------------------------


@pytest.fixture
async def written(store: Store) -> list[int]:
    """Five rows a minute apart; returns their ids in write order."""
    await store.write(
        Batch(
            transitions=[
                transition("h1", T0),
                transition("h2", T0 + timedelta(minutes=1)),
                transition("r1", T0 + timedelta(minutes=2), kind=Kind.RELAY, to_state=State.DOWN),
                transition("h1", T0 + timedelta(minutes=3), event=Event.RESTART),
                transition("h1", T0 + timedelta(minutes=4), to_state=State.DOWN),
            ]
        )
    )
    return [record.id for record in await store.history(newest_first=False)]


async def ids(store: Store, **filters: object) -> list[int]:
    return [record.id for record in await store.history(**filters)]  # type: ignore[arg-type]


async def test_history_is_newest_first_by_default(store: Store, written: list[int]) -> None:
    assert len(written) == 5
    assert written == sorted(written)
    assert await ids(store) == written[::-1]
    assert await ids(store, newest_first=False) == written


async def test_history_filters_by_kind_and_subject(store: Store, written: list[int]) -> None:
    assert await ids(store, kind=Kind.RELAY) == [written[2]]
    assert await ids(store, subject="h1") == [written[4], written[3], written[0]]
    assert await ids(store, kind=Kind.HOST, subject="h2") == [written[1]]
    assert await ids(store, kind=Kind.RELAY, subject="h1") == []


async def test_history_since_is_inclusive_and_until_exclusive(store: Store, written: list[int]) -> None:
    since, until = T0 + timedelta(minutes=1), T0 + timedelta(minutes=3)
    assert await ids(store, since=since, until=until) == [written[2], written[1]]
    # The same instants written in another zone select the same rows.
    assert await ids(store, since=since.astimezone(PLUS_2), until=until.astimezone(PLUS_2)) == [
        written[2],
        written[1],
    ]
    assert await ids(store, since=T0 + timedelta(minutes=4)) == [written[4]]
    assert await ids(store, until=T0) == []


async def test_history_resumes_after_an_id(store: Store, written: list[int]) -> None:
    first = await ids(store, after_id=written[1], newest_first=False, limit=2)
    rest = await ids(store, after_id=first[-1], newest_first=False, limit=2)
    assert first == written[2:4]
    assert rest == [written[4]]
    assert await ids(store, after_id=written[4], newest_first=False) == []


async def test_history_limit_takes_from_the_requested_end(store: Store, written: list[int]) -> None:
    assert await ids(store, limit=2) == [written[4], written[3]]
    assert await ids(store, limit=2, newest_first=False) == written[:2]
    with pytest.raises(ValueError, match="limit"):
        await store.history(limit=0)


async def test_history_records_carry_every_field(store: Store, written: list[int]) -> None:
    [restart] = await store.history(subject="h1", since=T0 + timedelta(minutes=3), until=T0 + timedelta(minutes=4))
    assert restart.id == written[3]
    assert restart.kind is Kind.HOST
    assert (restart.from_state, restart.to_state) == (State.UNKNOWN, State.UP)
    assert restart.at == T0 + timedelta(minutes=3)
    assert (restart.reason, restart.relay, restart.event) == ("test", "r1", Event.RESTART)


async def test_history_refuses_naive_bounds(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        await store.history(since=datetime(2024, 1, 1))


# --- property: any rows survive a round trip (SQLite) ------------------------------------------

zones = st.sampled_from([UTC, PLUS_2, timezone(timedelta(hours=-9, minutes=-30))])
moments = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=zones)
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
seqs = st.none() | st.integers(-(2**63), 2**63 - 1)
seconds = st.floats(allow_nan=False, allow_infinity=False)
host_rows = st.builds(
    HostRow,
    id=names,
    state=st.sampled_from(State),
    since=moments,
    last_seen=st.none() | moments,
    relay=st.none() | names,
    interval_s=seconds,
    seq=seqs,
    flapping=st.booleans(),
)
relay_rows = st.builds(
    RelayRow,
    id=names,
    state=st.sampled_from(State),
    since=moments,
    last_seen=st.none() | moments,
    parent=st.none() | names,
    boot=st.none() | names,
    seq=seqs,
    flush_s=seconds,
    flapping=st.booleans(),
)


def test_any_rows_round_trip_through_sqlite(tmp_path: Path) -> None:
    with asyncio.Runner() as runner:
        store = runner.run(Store.open(f"sqlite:///{tmp_path / 'relaybeat.db'}"))
        runner.run(store.upgrade())

        @settings(max_examples=25, deadline=None)
        @given(hosts=st.lists(host_rows, max_size=4), relays=st.lists(relay_rows, max_size=4))
        def round_trip(hosts: list[HostRow], relays: list[RelayRow]) -> None:
            runner.run(store.write(Batch(hosts=hosts, relays=relays)))
            loaded_hosts, loaded_relays = runner.run(store.load())
            # Rows from earlier examples stay; each id written now holds its last row.
            assert {row.id: row for row in loaded_hosts if row.id in {h.id for h in hosts}} == {
                row.id: row for row in hosts
            }
            assert {row.id: row for row in loaded_relays if row.id in {r.id for r in relays}} == {
                row.id: row for row in relays
            }
            rows: list[HostRow | RelayRow] = [*loaded_hosts, *loaded_relays]
            for row in rows:
                for moment in (row.since, row.last_seen):
                    assert moment is None or moment.utcoffset() == timedelta(0)

        try:
            round_trip()
        finally:
            runner.run(store.close())


# --- the restart checkpoint -----------------------------------------------------------------------


async def _stored_last_seen(store: Store) -> dict[str, object]:
    """Each host's `last_seen` as the database holds it (SQLite: the text itself)."""
    async with store._engine.connect() as connection:
        return {row[0]: row[1] for row in await connection.execute(text("SELECT id, last_seen FROM hosts"))}


async def test_the_checkpoint_stores_last_seen_and_seq_exactly_as_a_host_row_write_does(store: Store) -> None:
    moments = [
        datetime(2026, 12, 4, 18, 53, 42, 123, tzinfo=UTC),
        datetime(2026, 12, 4, 18, 53, 42, tzinfo=UTC),  # no microseconds: still the fixed width
        datetime(2026, 12, 4, 20, 53, 42, 999999, tzinfo=PLUS_2),  # another zone: stored as UTC
    ]
    ids = [f"h{i}" for i in range(len(moments))]
    await store.write(Batch(hosts=[host(i, seq=1) for i in ids] + [host("written", seq=1)]))
    # the same moments written by the ORM, through UTCDateTime, for comparison
    await store.write(Batch(hosts=[host(f"orm{i}", last_seen=m, seq=9) for i, m in enumerate(moments)]))

    await store.save_last_seen([(i, m, 7 + n) for n, (i, m) in enumerate(zip(ids, moments, strict=True))])
    await store.save_last_seen([("never-written", moments[0], 1)])  # no row: the checkpoint adds none

    hosts, _ = await store.load()
    by_id = {h.id: h for h in hosts}
    assert "never-written" not in by_id
    assert [(by_id[i].last_seen, by_id[i].seq) for i in ids] == [(m, 7 + n) for n, m in enumerate(moments)]
    assert all(by_id[i].last_seen.tzinfo is UTC for i in ids)  # type: ignore[union-attr]
    assert (by_id["written"].last_seen, by_id["written"].seq) == (T0, 1)  # not in the checkpoint: untouched
    stored = await _stored_last_seen(store)
    assert [stored[i] for i in ids] == [stored[f"orm{n}"] for n in range(len(moments))]


async def test_a_checkpoint_with_a_naive_time_saves_nothing(store: Store) -> None:
    await store.write(Batch(hosts=[host("h1"), host("h2")]))
    later = T0 + timedelta(minutes=1)
    with pytest.raises(ValueError, match="naive"):
        await store.save_last_seen([("h1", later, 2), ("h2", datetime(2024, 1, 1, 0, 1), 2)])
    hosts, _ = await store.load()
    assert {(h.id, h.last_seen, h.seq) for h in hosts} == {("h1", T0, 1), ("h2", T0, 1)}
