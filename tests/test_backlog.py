"""No false alarm from our own backlog (issue 9, findings 3 and 4), with real processes.

- A relay frozen (SIGSTOP) past its timeout is truly `down` and its hosts truly `unreachable`; once
  it resumes (SIGCONT) it must read the beats waiting for it before it flushes, so no host that kept
  beating is ever reported `down`. A host that really stopped during the pause still is.
- A flood of malformed messages (4,000 msg/s on the monitor's broker and on the relay's local broker)
  delays real news; neither the relay nor the monitor may read that delay as silence.

Leaves are one paho connection in the test process beating for every host (no network thread: one
thread publishes and runs paho's loop). The flood runs on private Mosquitto brokers whatever
RELAYBEAT_TEST_MQTT_URL says: the embedded amqtt broker tops out near this rate on its own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from relaybeat.monitor.tables import TransitionModel
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.ports import pick_free
from relaybeat.relay.service import CATCH_UP_MAX_S, catch_up_s
from relaybeat.relay.wire import Beat, LeafStatus, encode_beat
from tests.conftest import CentralBroker
from tests.processes import History, Topology, require_mosquitto, wait_until

pytestmark = pytest.mark.e2e

INTERVAL_S = 1.0  # every leaf's beat interval: a host's timeout is 3 s (3 misses)
FLUSH_S = 0.5  # the relay's flush: its timeout at the monitor is 1.5 s
RELAY = f"relay-{os.getpid()}"  # its upstream client id: unique, on a Mosquitto other tests share


class PahoLoop(threading.Thread):
    """One paho connection driven by its own thread (paho without a network thread): `tick()` is
    called about every `step_s` and may publish; the thread runs paho's loop between ticks."""

    def __init__(self, port: int, name: str, step_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.monotonic_ns()}")
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.step_s = step_s
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def tick(self, now: float) -> None:
        raise NotImplementedError

    def run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self.stopping.is_set():
                self.tick(time.monotonic())
                next_at += self.step_s
                while (wait := next_at - time.monotonic()) > 0:
                    self.client.loop(timeout=min(wait, 0.05))
                if next_at < time.monotonic() - 1.0:
                    next_at = time.monotonic()  # far behind: skip ahead rather than burst
        except BaseException as exc:  # reported by __exit__, not lost in a thread
            self.error = exc
        finally:
            self.client.disconnect()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stopping.set()
        self.join(10)
        if self.error is not None and exc is None:
            msg = f"{self.name} failed: {self.error!r}"
            raise AssertionError(msg) from self.error


class Leaves(PahoLoop):
    """`hosts` beating every INTERVAL_S on `prefix`beat/<id>, spread evenly over the interval."""

    def __init__(self, port: int, prefix: str, hosts: Sequence[str]) -> None:
        super().__init__(port, "leaves", step_s=0.01)
        self.hosts = list(hosts)
        self.prefix = prefix
        self.silenced: set[str] = set()
        self.seq = 0
        self._began = time.monotonic()
        self._sent = 0  # beats due so far, over all hosts

    def tick(self, now: float) -> None:
        due = int((now - self._began) / INTERVAL_S * len(self.hosts))
        for n in range(self._sent, due):
            host = self.hosts[n % len(self.hosts)]
            if host not in self.silenced:
                beat = Beat(seq=n // len(self.hosts) + 1, interval_s=INTERVAL_S)
                self.client.publish(f"{self.prefix}beat/{host}", encode_beat(beat), qos=0)
        self._sent = due


class Flood(PahoLoop):
    """`total` malformed messages (half bad beats, half bad bundles), QoS 0, at `rate` a second (less
    on a busy box); `done` is set once all were handed to the socket."""

    def __init__(self, port: int, prefix: str, rate: int, total: int) -> None:
        super().__init__(port, f"flood-{port}", step_s=0.01)
        self.per_tick = rate // 100
        self.total = total
        self.topics = [f"{prefix}beat/flood", f"{prefix}bundle/flood"]
        self.sent = 0
        self.done = threading.Event()

    def tick(self, now: float) -> None:
        for _ in range(min(self.per_tick, self.total - self.sent)):
            self.client.publish(self.topics[self.sent % 2], b"\xff{not json", qos=0)
            self.sent += 1
        if self.sent >= self.total:
            self.done.set()


def host_moves(db_url: str) -> dict[str, list[str]]:
    """Each host's states in order, as the monitor wrote them to SQL (from the `transitions` table)."""
    t = TransitionModel
    query = select(t.subject, t.to_state).where(t.kind == "host", t.event == "transition").order_by(t.id)
    history = History(db_url)
    try:
        with history.engine.connect() as connection:
            moves: dict[str, list[str]] = {}
            for subject, to_state in connection.execute(query):
                moves.setdefault(subject, []).append(str(to_state))
            return moves
    finally:
        history.close()


def all_up(db_url: str, hosts: Sequence[str]) -> bool:
    moves = host_moves(db_url)
    return all(moves.get(h, ["unknown"])[-1] == "up" for h in hosts)


def test_a_flush_reads_first_only_when_it_comes_more_than_one_interval_late() -> None:
    assert catch_up_s(planned_at=10.0, woke_at=10.0, flush_s=1.0) == 0.0
    assert catch_up_s(planned_at=10.0, woke_at=11.0, flush_s=1.0) == 0.0  # a slow broker, not a pause
    assert catch_up_s(planned_at=10.0, woke_at=15.0, flush_s=1.0) == 5.0  # a 5 s backlog: up to 5 s to read it
    assert catch_up_s(planned_at=10.0, woke_at=3610.0, flush_s=1.0) == CATCH_UP_MAX_S  # a suspended VM


def test_after_a_pause_the_leaves_that_were_beating_are_awaited_until_heard_again() -> None:
    assembler = Assembler("r1", "b", 1.0, 1.0)
    assembler.add_beat("beating", Beat(seq=1, interval_s=1.0), 9.5)
    assembler.add_beat("long-dead", Beat(seq=1, interval_s=1.0), 2.0)
    assembler.add_beat("stopped", Beat(seq=1, interval_s=1.0, status=LeafStatus.STOPPING), 9.5)
    assert assembler.awaited(paused_at=10.0, resumed_at=15.0) == 1
    assembler.add_beat("beating", Beat(seq=2, interval_s=1.0), 15.1)  # its beat that waited in the socket
    assert assembler.awaited(paused_at=10.0, resumed_at=15.0) == 0


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    topology = Topology(tmp_path, f"bl{time.monotonic_ns() % 10**8}/")
    try:
        yield topology
    finally:
        topology.close()


def test_a_relay_frozen_past_its_timeout_reads_what_waits_before_it_flushes(
    topo: Topology, central_broker: CentralBroker
) -> None:
    topo.prefix = central_broker.prefix
    site, api = pick_free("127.0.0.1"), pick_free("127.0.0.1")
    relay = topo.relay(RELAY, central_broker.url, serve=site, flush=FLUSH_S)
    topo.monitor(central_broker.url, api)
    hosts = [f"h{i:03d}" for i in range(150)]
    pause_s = 5.0  # past the relay's timeout (1.5 s) and its hosts' (3 s): their waiting beats are ~5 s old
    with Leaves(site, topo.prefix, hosts) as leaves:
        wait_until(lambda: all_up(topo.db_url, hosts), 30, "every host up")
        for cycle in range(2):
            if cycle == 1:
                leaves.silenced.add("h000")  # really stops, just before the pause: it must still go down
            relay.process.send_signal(signal.SIGSTOP)
            time.sleep(pause_s)
            relay.process.send_signal(signal.SIGCONT)
            wait_until(lambda: all_up(topo.db_url, hosts[1:]), 20, f"every beating host up again (cycle {cycle})")
            topo.wait_state("relays", RELAY, "up")
        topo.wait_state("hosts", "h000", "down")

    moves = host_moves(topo.db_url)
    false_downs = {h: m for h, m in moves.items() if h != "h000" and "down" in m}
    assert false_downs == {}, f"{len(false_downs)} hosts that never stopped went down: {list(false_downs.items())[:3]}"
    # What is true: the frozen relay was down each time, its hosts unreachable behind it.
    relay_moves = [to for _, to, _ in topo.transitions(RELAY)]
    assert relay_moves.count("down") == 2, relay_moves
    assert Counter(moves["h001"]) == Counter({"up": 3, "unreachable": 2}), moves["h001"]
    assert moves["h000"][-1] == "down"


def test_a_flood_of_malformed_messages_is_no_reason_to_page(topo: Topology) -> None:
    require_mosquitto()
    central_port, site_port, api = (pick_free("127.0.0.1") for _ in range(3))
    central = topo.mosquitto("central", central_port)
    site = topo.mosquitto("site", site_port)
    topo.relay(RELAY, central, local=site, flush=FLUSH_S)
    topo.monitor(central, api)
    hosts = [f"h{i:03d}" for i in range(150)]
    with Leaves(site_port, topo.prefix, hosts):
        wait_until(lambda: all_up(topo.db_url, hosts), 30, "every host up")
        total = 40_000  # 10 s at 4,000 msg/s
        started = time.monotonic()
        with (
            Flood(central_port, topo.prefix, 4000, total) as flood,
            Flood(site_port, topo.prefix, 4000, total) as local,
        ):
            wait_until(flood.done.is_set, 60, "the flood to be sent")
            wait_until(local.done.is_set, 60, "the local flood to be sent")
        elapsed = time.monotonic() - started
        print(f"flood: {total} messages to each broker in {elapsed:.1f} s ({total / elapsed:,.0f} msg/s each)")
        wait_until(
            lambda: sum(topo.healthz()["rejected"].values()) >= 0.95 * total, 30, "the monitor to read the flood"
        )
        time.sleep(3 * INTERVAL_S)  # one more host timeout after the backlog is read: late judgements land here

    moves = host_moves(topo.db_url)
    false_downs = {h: m for h, m in moves.items() if "down" in m}
    assert false_downs == {}, f"{len(false_downs)} hosts went down in a flood: {list(false_downs.items())[:3]}"
    assert [to for _, to, _ in topo.transitions(RELAY)] == ["up"]
