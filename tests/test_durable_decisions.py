"""Nothing decided may be lost or misdated (issue 9, finding 6), with real processes.

A real `relaybeat monitor` on SQLite and PostgreSQL, a synthetic relay publishing 1,000-host bundles
on the test broker, and kill -9 right after the monitor decides an outage (then a recovery), while
its batch cannot have reached SQL: the test holds a lock on the history table, as a slow database
would. After a restart on the same database and journal, every one of the 1,001 transitions is in
SQL exactly once, dated within one flush of the event, and another restart adds nothing.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import create_engine, func, make_url, select, text

from monitor.tables import TransitionModel
from relay.mqtt import BrokerURL
from relay.ports import pick_free
from relay.wire import OFFLINE, ONLINE, Bundle, HostEntry, Topics, encode_bundle
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
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"synthetic-{secrets.token_hex(4)}")
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
        with engine.connect() as connection:
            connection.execute(text("LOCK TABLE transitions IN SHARE MODE"))  # blocks inserts, not reads
            yield
            connection.rollback()
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
    """kill -9 the monitor the moment its API shows the relay in `relay_state`; returns when it showed
    it (the decision was made, and dated, before that)."""
    monitor = topo.services["monitor"]
    wait_until(lambda: topo.state("relays", RELAY) == relay_state, 15, f"{RELAY} {relay_state}", every=0.002)
    seen = time.time()
    monitor.kill()
    return seen


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
    assert not missing and not repeated, f"{len(missing)} missing (e.g. {missing[:3]}), repeated: {repeated[:3]}"
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
def topo(tmp_path: Path, central_broker: CentralBroker, db_url: str) -> Iterator[Topology]:
    topology = Topology(tmp_path, central_broker.prefix, db_url)
    try:
        yield topology
    finally:
        topology.close()


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
        assert (tmp_path / "monitor.journal").stat().st_size == 0
    finally:
        relay.close()
        history.close()
