"""Nothing decided may be lost or misdated (issue 9, finding 6), with real processes.

A real `relaybeat monitor` on SQLite and PostgreSQL, a synthetic relay publishing 1,000-host bundles
on the test broker, and kill -9 right after the monitor decides an outage (then a recovery), while
its batch cannot have reached SQL: the test holds a lock on the history table, as a slow database
would. After a restart on the same database and journal, every one of the 1,001 transitions is in
SQL exactly once, dated within one flush of the event, and another restart adds nothing.

In-process tests check the journal's parts: replay with rows and webhook messages, torn lines,
the lock, the rewrite, where the journal lives by default and the start-up error when it is held.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, func, make_url, select, text

from relaybeat.config import MonitorConfig, load_config
from relaybeat.monitor.journal import Decision, Journal, JournalUnavailable, decode, encode
from relaybeat.monitor.notify import Target
from relaybeat.monitor.outbox import NotifySettings, Webhook
from relaybeat.monitor.records import Change
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.store import Batch, Store, TransitionRow
from relaybeat.monitor.tables import TransitionModel
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import OFFLINE, ONLINE, Bundle, HostEntry, Topics, encode_bundle
from tests.conftest import CentralBroker
from tests.processes import Topology, api_get, wait_until

pytestmark = pytest.mark.e2e

HOSTS = 1000
FLUSH_S = 1.0  # the synthetic relay's flush: "dated within one flush of the truth"
RELAY = "r1"


class SyntheticRelay:
    """A relay as the monitor sees it: a bundle of HOSTS fresh hosts every flush, and a status topic."""

    def __init__(self, broker: str, prefix: str) -> None:
        url = BrokerURL.parse(broker)
        self.topics = Topics(prefix)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"synthetic-{secrets.token_hex(4)}")
        self.client.connect(url.host, url.port)
        self.client.loop_start()
        self.ids = [f"h{i:04d}" for i in range(HOSTS)]
        self.boot = ""
        self.seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> float:
        """A fresh boot: status online, then a bundle now and every half flush. Returns when the first went out."""
        self.boot, self.seq = secrets.token_hex(4), 0
        self.client.publish(self.topics.relay_status(RELAY), ONLINE, qos=1, retain=True).wait_for_publish(10)
        published = time.time()
        self._publish()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return published

    def _publish(self) -> None:
        self.seq += 1
        hosts = tuple(HostEntry(host, 1, 100, 1000, "ok") for host in self.ids)  # type: ignore[arg-type]
        payload = encode_bundle(Bundle(RELAY, self.boot, self.seq, int(FLUSH_S * 1000), hosts))
        self.client.publish(self.topics.bundle(RELAY), payload, qos=1).wait_for_publish(10)

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_S / 2):
            self._publish()

    def die(self) -> float:
        """Stop bundling and publish what its last will says; returns when it was published."""
        self.halt()
        published = time.time()
        self.client.publish(self.topics.relay_status(RELAY), OFFLINE, qos=1, retain=True).wait_for_publish(10)
        return published

    def halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def close(self) -> None:
        self.halt()
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def history_locked(db_url: str) -> Iterator[None]:
    """Hold the history table so the monitor's next batch cannot commit (as a slow database would);
    reads (the API) still work."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        connection = sqlite3.connect(str(url.database), isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers carry on
            yield
            connection.execute("ROLLBACK")
        finally:
            connection.close()
        return
    engine = create_engine(db_url)
    try:
        with engine.connect() as locker:
            locker.execute(text("LOCK TABLE transitions IN SHARE MODE"))  # blocks inserts, not reads
            yield
            locker.rollback()
    finally:
        engine.dispose()


class History:
    def __init__(self, db_url: str) -> None:
        self.engine = create_engine(db_url)

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(TransitionModel)) or 0)

    def rows(self) -> list[Any]:
        t = TransitionModel
        query = select(t.subject, t.from_state, t.to_state, t.at, t.key).where(t.event == "transition").order_by(t.id)
        with self.engine.connect() as connection:
            return list(connection.execute(query))

    def close(self) -> None:
        self.engine.dispose()


def kill_when_decided(topo: Topology, relay_state: str) -> float:
    """kill -9 the monitor the moment its metrics count the relay's move to `relay_state` (the read
    view shows a state only once it is in SQL, and the test keeps SQL from taking it); returns when
    the count showed it: the decision was made, and dated, before that."""
    monitor = topo.services["monitor"]
    wait_until(lambda: decided(topo, "relay", relay_state) >= 1, 15, f"{RELAY} {relay_state} decided", every=0.002)
    seen = time.time()
    monitor.kill()
    return seen


def decided(topo: Topology, kind: str, to: str) -> float:
    """The monitor process's count of decided moves of `kind` subjects to `to` (from /metrics)."""
    response = httpx.get(f"{topo.api}/metrics", timeout=5)
    response.raise_for_status()
    found = re.search(rf'^relaybeat_transitions_total{{kind="{kind}",to="{to}"}} (\S+)$', response.text, re.M)
    return 0.0 if found is None else float(found.group(1))


def assert_each_once_on_time(
    history: History, move: tuple[str, str], host_move: tuple[str, str], truth: float, seen: float
) -> None:
    """The relay's `move` and every host's `host_move`, each exactly once, dated within one flush of
    `truth` (the event), or on a machine too busy for that, no later than the decision was `seen`:
    never at the restart, which came after both."""
    latest = max(truth + FLUSH_S, seen)
    rows = history.rows()
    wanted = {RELAY: move, **{f"h{i:04d}": host_move for i in range(HOSTS)}}
    found = Counter(r.subject for r in rows if (str(r.from_state), str(r.to_state)) == wanted.get(r.subject))
    missing = sorted(s for s in wanted if found[s] == 0)
    repeated = sorted(s for s, n in found.items() if n > 1)
    assert not missing, f"{len(missing)} missing (e.g. {missing[:3]})"
    assert not repeated, f"repeated: {repeated[:3]}"
    late = [
        (r.subject, round(at(r.at) - truth, 3))
        for r in rows
        if (str(r.from_state), str(r.to_state)) == wanted.get(r.subject) and not truth - 0.1 <= at(r.at) <= latest
    ]
    assert not late, f"{len(late)} of {len(wanted)} dated away from the event, e.g. {late[:3]}"
    assert all(r.key for r in rows), "every transition written carries its decision key"


def replays(topo: Topology) -> int:
    """How many starts so far wrote a whole outage or recovery that their killed predecessor had decided
    (the monitor's log is kept across restarts)."""
    written = re.findall(r"wrote (\d+) decisions the last run had not written", topo.services["monitor"].log())
    return sum(int(n) >= HOSTS + 1 for n in written)


def at(moment: datetime) -> float:
    return moment.timestamp()


@pytest.fixture
def topo(db_topo: Topology) -> Topology:
    return db_topo


def test_a_monitor_killed_before_its_batch_commits_loses_and_misdates_nothing(
    topo: Topology, central_broker: CentralBroker, db_url: str, tmp_path: Path
) -> None:
    api = pick_free("127.0.0.1")
    relay = SyntheticRelay(central_broker.url, central_broker.prefix)
    history = History(db_url)
    try:
        topo.monitor(central_broker.url, api)
        relay.start()
        wait_until(lambda: history.count() >= HOSTS + 1, 30, "all hosts and the relay up in SQL")

        # The outage: the relay dies; kill -9 as soon as the monitor has decided, before SQL has it.
        with history_locked(db_url):
            died = relay.die()
            died_seen = kill_when_decided(topo, "down")
        wait_until(lambda: time.time() > died + 2 * FLUSH_S, 5, "the restart to come well after the event")
        topo.monitor(central_broker.url, api)
        assert_each_once_on_time(history, ("up", "down"), ("up", "unreachable"), died, died_seen)
        assert replays(topo) == 1
        assert api_get(topo.api, "/api/v1/hosts/h0000")["state"] == "unreachable"  # restored, not re-decided

        # The recovery, the same way: back with a new boot; kill -9 as soon as it is decided.
        with history_locked(db_url):
            back = relay.start()
            back_seen = kill_when_decided(topo, "up")
        wait_until(lambda: time.time() > back + 2 * FLUSH_S, 5, "the restart to come well after the event")
        topo.monitor(central_broker.url, api)
        assert_each_once_on_time(history, ("down", "up"), ("unreachable", "up"), back, back_seen)
        assert replays(topo) == 2

        # This restart did not write the outage's rows again (each is still there once), and it left
        # nothing for the next one: the journal is empty once SQL holds everything.
        assert_each_once_on_time(history, ("up", "down"), ("up", "unreachable"), died, died_seen)
        assert len(history.rows()) == 3 * (HOSTS + 1)  # up, outage, recovery; nothing twice
        journal = tmp_path / "monitor.journal"
        wait_until(lambda: journal.stat().st_size == 0, 30, "the journal to be emptied once SQL holds everything")
    finally:
        relay.close()
        history.close()


# ------------------------------------------------------------------------------ in process


def small_bundle(seq: int, *hosts: str) -> bytes:
    entries = tuple(HostEntry(h, 1, 100, 1000, "ok") for h in hosts)  # type: ignore[arg-type]
    return encode_bundle(Bundle(RELAY, "boot-1", seq, 1000, entries))


def monitor_on(store: Store, journal: Path, *, webhook: bool = False) -> Monitor:
    notify = NotifySettings((Webhook(Target("ops"), "http://127.0.0.1:9/hook"),)) if webhook else NotifySettings()
    return Monitor(MonitorSettings(BrokerURL("127.0.0.1", 1), notify=notify, journal=journal), store)


async def test_decisions_a_monitor_never_wrote_are_written_at_the_next_start_as_decided(
    store: Store, tmp_path: Path
) -> None:
    journal = tmp_path / "monitor.journal"
    first = monitor_on(store, journal, webhook=True)
    await first.restore()
    topics = Topics()
    first.take(topics.bundle(RELAY), small_bundle(1, "a", "b"))
    await first.flush()  # up in SQL; the journal is empty again
    assert journal.stat().st_size == 0
    first.take(topics.relay_status(RELAY), OFFLINE)  # decided, journaled, never written: "killed"
    decided = {t.subject: t.at for t in first.pending()}
    first.close()
    with journal.open("ab") as file:
        file.write(b'["torn-", 0, [["host", "x"')  # a crash mid-write leaves half a line

    second = monitor_on(store, journal, webhook=True)
    await second.restore()
    rows = await store.history(newest_first=False)
    outage = [r for r in rows if r.to_state in (State.DOWN, State.UNREACHABLE)]
    assert {r.subject: r.at for r in outage} == decided  # dated when decided, to the microsecond
    assert {h.id: h.state for h in (await store.load())[0]} == {"a": State.UNREACHABLE, "b": State.UNREACHABLE}
    assert second.detector.relays[RELAY].state is State.DOWN  # restored as decided: nothing re-decided
    assert [m.incident for m in await store.outbox()] == [f"relay:{RELAY}"]  # its page was queued too
    assert journal.stat().st_size == 0
    second.close()

    third = monitor_on(store, journal, webhook=True)
    await third.restore()
    assert len(await store.history()) == len(rows)
    assert len(await store.outbox()) == 1
    third.close()


async def test_a_journal_that_cannot_be_written_costs_the_crash_safety_not_the_decisions(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = monitor_on(store, tmp_path / "monitor.journal")
    await monitor.restore()
    assert monitor.journal is not None
    os.close(monitor.journal._fd)  # every write now fails, as on a full or broken disk
    monitor.take(Topics().bundle(RELAY), small_bundle(1, "a"))
    await monitor.flush()
    assert monitor.journal_failures == 1  # the append (nothing written, so nothing to clear after)
    assert "decisions still go to SQL" in caplog.text
    assert sorted(r.subject for r in await store.history()) == ["a", RELAY]
    monitor.journal._fd = -1
    monitor.close()


async def test_a_journal_is_one_monitors(tmp_path: Path) -> None:
    path = tmp_path / "monitor.journal"
    held, _, _ = Journal.open(path)
    try:
        with pytest.raises(JournalUnavailable, match="held by another monitor"):
            Journal.open(path)
    finally:
        held.close()
    again, decisions, torn = Journal.open(path)
    again.close()
    assert (decisions, torn) == ([], 0)
    with pytest.raises(JournalUnavailable, match="cannot open the journal"):
        Journal.open(tmp_path / "no-such-dir" / "monitor.journal")


async def test_a_journal_that_never_drains_is_rewritten_to_its_pending_decisions(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relaybeat.monitor.journal.REWRITE_BYTES", 1)  # every commit with decisions pending rewrites
    monkeypatch.setattr("relaybeat.monitor.journal.REWRITE_SHARE", 0.0)  # ... however little of it is written
    journal = tmp_path / "monitor.journal"
    seen: list[list[tuple[str, State]]] = []

    class BusyStore(Store):
        """The relay's death is decided while the first batch is being written."""

        async def write(self, batch: Batch[TransitionRow]) -> None:
            if batch.transitions and not seen:
                monitor.take(Topics().relay_status(RELAY), OFFLINE)
            if batch.transitions:  # what the journal holds as this batch starts
                seen.append([(d.change.subject, d.change.to_state) for d in journaled(journal)])
            await super().write(batch)

    store = await BusyStore.open(db_url)
    try:
        await store.upgrade()
        monitor = monitor_on(store, journal)
        await monitor.restore()
        monitor.take(Topics().bundle(RELAY), small_bundle(1, "a", "b"))
        await monitor.flush()
        monitor.close()
    finally:
        await store.close()
    ups = [(RELAY, State.UP), ("a", State.UP), ("b", State.UP)]
    outage = [(RELAY, State.DOWN), ("a", State.UNREACHABLE), ("b", State.UNREACHABLE)]
    assert [sorted(batch) for batch in seen] == [sorted(ups + outage), sorted(outage)]
    assert journal.stat().st_size == 0


def journaled(path: Path) -> list[Decision]:
    return [d for line in path.read_bytes().splitlines() if line for d in decode(line)]


def test_the_journal_lives_next_to_a_sqlite_database_and_is_named_for_a_postgresql_one() -> None:
    assert MonitorConfig(db="sqlite:///var/relaybeat.db").journal_path() == Path("var/relaybeat.db.journal")
    assert MonitorConfig(db="sqlite://").journal_path() is None  # in memory: a restart loses it all anyway
    pg = MonitorConfig(db="postgresql+psycopg://rb@db/relaybeat", client_id="mon-a")
    assert pg.journal_path() == Path("mon-a-relaybeat.journal")
    assert MonitorConfig(journal="/srv/j").journal_path() == Path("/srv/j")
    flags = {"monitor.journal": ("--journal", "/flag/j")}
    config = load_config(None, {"RELAYBEAT_MONITOR__JOURNAL": "/env/j"}, flags)
    assert config.monitor.settings(config.detector.policy()).journal == Path("/flag/j")


def test_a_monitor_whose_journal_is_held_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "monitor.journal"
    held, _, _ = Journal.open(path)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relaybeat", "monitor", "--db", f"sqlite:///{tmp_path / 'm.db'}",
             "--journal", str(path), "--listen", f"127.0.0.1:{pick_free('127.0.0.1')}", "--log-level", "error"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        held.close()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: the journal {path} is held by another monitor: give each monitor its own --journal"
    ]


def test_a_journal_cut_down_keeps_exactly_the_lines_from_where_it_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "monitor.journal"
    journal, _, _ = Journal.open(path)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    lines = [
        encode("k-", n, [Change(kind=Kind.HOST, subject=f"h{n}", from_state=State.UNKNOWN, to_state=State.UP, at=at,
                                reason="beat received", key=f"k-{n}")], [None])
        for n in range(3)
    ]  # fmt: skip
    for line in lines:
        journal.append(line)
    journal.keep_from(len(lines[0]))
    journal.append(lines[0])  # appends go on after what was kept
    assert journal.size == sum(len(line) for line in lines)
    journal.close()
    assert path.read_bytes() == lines[1] + lines[2] + lines[0]
    assert not path.with_name(path.name + ".new").exists()
