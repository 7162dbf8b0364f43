"""Hot-standby monitors on one PostgreSQL database (issue 12), with real processes.

Two `relaybeat monitor` processes (failover_s 1 s) follow one synthetic relay whose bundles flip
hosts between `ok` and `stopping` many times a second: a burst of transitions whose exact sequence
the test knows. kill -9 the active mid-burst: the standby is active within a few seconds and every
transition is in SQL exactly once. SIGSTOP the active for twice failover_s, then SIGCONT: it writes
nothing more (no transition twice) and reports `standby`. With a webhook receiver: one POST per
incident across a takeover. A second monitor on one SQLite file is refused at start in one line.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, select

from relaybeat.monitor.tables import OutboxModel, TransitionModel
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import OFFLINE, ONLINE, Bundle, HostEntry, LeafStatus, Topics, encode_bundle
from tests.conftest import CentralBroker
from tests.processes import Receiver, Service, Topology, api_get, wait_until

pytestmark = pytest.mark.e2e

FAILOVER_S = 2.0  # small for a short test, yet above the lease round trips of a busy shared database
RELAY = "r1"
HOSTS = 24


class FlippingRelay:
    """Relay r1 as the monitor sees it: a bundle every `every_s` with every host fresh; `flip()`
    turns the next host `stopping` (or back `ok`), so each bundle may carry a known transition."""

    def __init__(self, broker: str, prefix: str, every_s: float = 0.5) -> None:
        url = BrokerURL.parse(broker)
        self.topics = Topics(prefix)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flipper-{secrets.token_hex(4)}")
        self.client.connect(url.host, url.port)
        self.client.loop_start()
        self.every_s = every_s
        self.ids = [f"h{i:02d}" for i in range(HOSTS)]
        self.stopping: set[str] = set()
        self.expected: dict[str, list[tuple[str, str]]] = {h: [("unknown", "up")] for h in self.ids}
        self.flips_per_bundle = 0
        self.boot = secrets.token_hex(4)
        self.seq = 0
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.client.publish(self.topics.relay_status(RELAY), ONLINE, qos=1, retain=True).wait_for_publish(10)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                for _ in range(self.flips_per_bundle):
                    host = self.ids[self._next % HOSTS]
                    self._next += 1
                    if host in self.stopping:
                        self.stopping.discard(host)
                        self.expected[host].append(("stopped", "up"))
                    else:
                        self.stopping.add(host)
                        self.expected[host].append(("up", "stopped"))
                self._publish()

    def _publish(self) -> None:
        self.seq += 1
        hosts = tuple(
            HostEntry(h, self.seq, 0, 60_000, LeafStatus.STOPPING if h in self.stopping else LeafStatus.OK)
            for h in self.ids
        )
        payload = encode_bundle(Bundle(RELAY, self.boot, self.seq, int(self.every_s * 1000), hosts))
        self.client.publish(self.topics.bundle(RELAY), payload, qos=1).wait_for_publish(10)

    def burst(self, flips_per_bundle: int) -> None:
        with self._lock:
            self.flips_per_bundle = flips_per_bundle

    def transitions(self) -> int:
        with self._lock:
            return sum(len(moves) for moves in self.expected.values())

    def die(self) -> None:
        """Stop bundling, then the will: an outage of relay r1 (its hosts unreachable)."""
        self.close(goodbye=False)
        self.client.publish(self.topics.relay_status(RELAY), OFFLINE, qos=1, retain=True).wait_for_publish(10)

    def close(self, goodbye: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if goodbye:
            self.client.loop_stop()
            self.client.disconnect()


class History:
    def __init__(self, db_url: str) -> None:
        self.engine = create_engine(db_url)

    def moves(self) -> dict[str, list[tuple[str, str]]]:
        t = TransitionModel
        query = (
            select(t.subject, t.from_state, t.to_state).where(t.kind == "host", t.event == "transition").order_by(t.id)
        )
        found: dict[str, list[tuple[str, str]]] = {}
        with self.engine.connect() as connection:
            for subject, from_state, to_state in connection.execute(query):
                found.setdefault(subject, []).append((str(from_state), str(to_state)))
        return found

    def dump(self, *subjects: str) -> str:
        t = TransitionModel
        query = select(t.subject, t.from_state, t.to_state, t.at, t.reason, t.key).where(t.subject.in_(subjects))
        with self.engine.connect() as connection:
            return "\n".join(str(tuple(row)) for row in connection.execute(query.order_by(t.id)))

    def delivered(self) -> int:
        with self.engine.connect() as connection:
            o = OutboxModel
            return len(list(connection.execute(select(o.id).where(o.delivered_at.is_not(None)))))

    def count(self) -> int:
        return sum(len(m) for m in self.moves().values())

    def close(self) -> None:
        self.engine.dispose()


def start_monitor(topo: Topology, node: str, broker: str, db_url: str, extra: list[str] | None = None) -> str:
    """A monitor process named `node` (its node id too), on its own port, client id and journal."""
    port = pick_free("127.0.0.1")
    topo.start(
        node,
        ["monitor", "--broker", broker, "--db", db_url, "--listen", f"127.0.0.1:{port}", "--prefix", topo.prefix,
         "--client-id", f"{topo.monitor_id}-{node}", "--node-id", node, "--failover", str(FAILOVER_S),
         "--journal", str(topo.log_dir / f"{node}.journal"), "--misses", "4", "--log-level", "info",
         *(extra or [])],
    )  # fmt: skip
    api = f"http://127.0.0.1:{port}"
    wait_until(lambda: api_get(api, "/healthz"), 30, f"{node}'s API", service=topo.services[node])
    return api


def active_then_standby(
    topo: Topology, history: History, relay: FlippingRelay, broker: str, db_url: str, extra: list[str] | None = None
) -> tuple[str, str]:
    """node-a started and active, `relay`'s hosts all up in SQL, then node-b started: their APIs."""
    a = start_monitor(topo, "node-a", broker, db_url, extra)
    wait_until(lambda: role(a) == "active", 15, "node-a active")
    relay.start()
    wait_until(lambda: history.count() >= HOSTS, 20, "every host up in SQL")
    return a, start_monitor(topo, "node-b", broker, db_url, extra)


def role(api: str) -> str | None:
    try:
        return str(api_get(api, "/healthz")["role"])
    except (httpx.HTTPError, OSError):
        return None


def assert_exactly_once(history: History, relay: FlippingRelay) -> None:
    found = history.moves()
    for host, moves in relay.expected.items():
        assert found.get(host) == moves, f"{host}: SQL has {found.get(host)}, the relay made {moves}"


def settle(history: History, relay: FlippingRelay, active: Service) -> None:
    """Once SQL holds as many transitions as the relay made (or 20 s passed), each exactly once."""
    try:
        wait_until(lambda: history.count() >= relay.transitions(), 20, "every transition in SQL")
        time.sleep(1.0)  # anything written twice would be in by now
    finally:
        try:
            assert_exactly_once(history, relay)
        except AssertionError as exc:
            rows = history.dump(RELAY, "h00")
            msg = f"{exc}\n{rows}\n{active.name}'s log:\n{active.log()[-4000:]}"
            raise AssertionError(msg) from None


@pytest.fixture
def ha(tmp_path: Path, central_broker: CentralBroker, postgres_url: str) -> Iterator[tuple[Topology, History]]:
    topo = Topology(tmp_path, central_broker.prefix, postgres_url)
    history = History(postgres_url)
    try:
        yield topo, history
    finally:
        topo.close()
        history.close()


def test_kill_9_of_the_active_mid_burst_loses_and_doubles_no_transition(
    ha: tuple[Topology, History], central_broker: CentralBroker, postgres_url: str
) -> None:
    topo, history = ha
    relay = FlippingRelay(central_broker.url, central_broker.prefix)
    try:
        _, b = active_then_standby(topo, history, relay, central_broker.url, postgres_url)
        assert role(b) == "standby"
        cluster = api_get(b, "/api/v1/cluster")
        assert cluster["active_node"] == "node-a"
        assert {n["node"]: n["holds_lease"] for n in cluster["nodes"]} == {"node-a": True, "node-b": False}
        refused = httpx.delete(f"{b}/api/v1/hosts/h00", timeout=5)
        assert refused.status_code == 409
        assert refused.json()["active"] == "node-a"
        assert "node-a" in refused.json()["detail"]

        relay.burst(6)  # 12 transitions a second
        wait_until(lambda: history.count() >= HOSTS + 30, 20, "the burst under way in SQL")
        topo.services["node-a"].kill()
        killed = time.monotonic()
        wait_until(lambda: role(b) == "active", 20, "node-b to take over")
        took_over_s = time.monotonic() - killed
        time.sleep(2.0)  # more of the burst, written by node-b alone
        relay.burst(0)
        settle(history, relay, topo.services["node-b"])
        health = api_get(b, "/healthz")
        assert (health["role"], health["node"], health["active_node"]) == ("active", "node-b", "node-b")
        print(f"\ntakeover after kill -9: node-b active {took_over_s:.2f} s after the kill (failover_s {FAILOVER_S})")
        status = subprocess.run(
            [sys.executable, "-m", "relaybeat", "status", "--api", b],
            capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"},  # one line, unwrapped
        )  # fmt: skip
        assert "node node-b (active)" in status.stdout, status.stdout + status.stderr
    finally:
        relay.close()


def test_a_paused_active_writes_nothing_after_resuming_and_reports_standby(
    ha: tuple[Topology, History], central_broker: CentralBroker, postgres_url: str
) -> None:
    topo, history = ha
    relay = FlippingRelay(central_broker.url, central_broker.prefix)
    try:
        a, b = active_then_standby(topo, history, relay, central_broker.url, postgres_url)
        relay.burst(2)
        wait_until(lambda: history.count() >= HOSTS + 10, 20, "the flips under way in SQL")

        paused = topo.services["node-a"].process
        paused.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: role(b) == "active", 20, "node-b to take over")
            time.sleep(2 * FAILOVER_S)  # node-a keeps receiving (its socket buffers) while stopped
        finally:
            paused.send_signal(signal.SIGCONT)
        wait_until(lambda: role(a) == "standby", 20, "node-a to report standby")
        time.sleep(1.0)  # node-a decides what it read while stopped: it must not write any of it
        relay.burst(0)
        settle(history, relay, topo.services["node-b"])
        assert role(a) == "standby"
        assert role(b) == "active"
        assert "steps down to standby" in topo.services["node-a"].log()
    finally:
        relay.close()


def test_two_monitors_send_one_post_per_incident_across_a_takeover(
    ha: tuple[Topology, History], central_broker: CentralBroker, postgres_url: str, tmp_path: Path
) -> None:
    topo, history = ha
    receiver = Receiver()
    relay = FlippingRelay(central_broker.url, central_broker.prefix)
    try:
        _, b = active_then_standby(topo, history, relay, central_broker.url, postgres_url, receiver.config(tmp_path))
        assert role(b) == "standby"

        relay.die()  # one outage: relay r1 down, its hosts unreachable
        wait_until(lambda: receiver.kinds()[("outage", f"relay:{RELAY}")] >= 1, 20, "the outage POST")
        # kill -9 once node-a recorded the delivery (dying between a 2xx and its record is the one way to
        # send a message twice, with the same Idempotency-Key: README, Notifications)
        wait_until(lambda: history.delivered() >= 1, 20, "the delivery recorded")
        topo.services["node-a"].kill()
        wait_until(lambda: role(b) == "active", 20, "node-b to take over")

        back = FlippingRelay(central_broker.url, central_broker.prefix)
        back.start()  # a new boot: the recovery, told by node-b
        try:
            wait_until(lambda: receiver.kinds()[("recovery", f"relay:{RELAY}")] >= 1, 20, "the recovery POST")
            time.sleep(2.0)  # a second POST of either would come by now
        finally:
            back.close()
        assert receiver.kinds() == Counter({("outage", f"relay:{RELAY}"): 1, ("recovery", f"relay:{RELAY}"): 1})
        assert len({key for key, _ in receiver.posts}) == 2
    finally:
        relay.close()
        receiver.close()


def test_a_second_monitor_on_one_sqlite_file_is_refused_in_one_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'one.db'}"
    args = ["--broker", "mqtt://127.0.0.1:1", "--db", db, "--log-level", "warning"]
    first = Service("first", ["monitor", *args, "--listen", f"127.0.0.1:{pick_free('127.0.0.1')}"], tmp_path)
    try:
        port = pick_free("127.0.0.1")
        wait_until(lambda: (tmp_path / "one.db.lock").exists(), 30, "the first monitor's lock", service=first)
        time.sleep(0.5)
        second = subprocess.run(
            [sys.executable, "-m", "relaybeat", "monitor", *args, "--listen", f"127.0.0.1:{port}",
             "--journal", str(tmp_path / "second.journal")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "another monitor already runs on the SQLite database" in lines[0]
        first.assert_running()
    finally:
        first.stop()
