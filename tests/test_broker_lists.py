"""Broker lists (issue 12): every broker option takes the nodes of one cluster, comma-separated; a
client uses the first that answers and moves on when it is lost. And a monitor whose MQTT session
keeps being taken over stops with an error saying so. In process, on the test broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from relaybeat.monitor.clock import SystemClock
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.ingest import SessionStolen
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.monitor.view import FleetView
from relaybeat.relay.mqtt import Brokers, BrokerURL, BrokerURLError, payload_bytes, stay_connected
from relaybeat.relay.parts import PartState
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.wire import Beat, Topics, encode_beat
from relaybeat.settings import MonitorFlags, RelayFlags, monitor_start, relay_start
from tests.conftest import CentralBroker
from tests.fakes import FakeClock
from tests.monitors import new_monitor, until


def test_a_broker_list_parses_each_url_and_hides_passwords() -> None:
    brokers = Brokers.parse("mqtt://a:1, mqtts://u:secret@b:8883")
    assert [(u.host, u.port, u.tls) for u in brokers.urls] == [("a", 1, False), ("b", 8883, True)]
    assert str(brokers) == "mqtt://a:1,mqtts://u:***@b:8883"
    with pytest.raises(BrokerURLError, match="empty entry"):
        Brokers.parse("mqtt://a:1,,mqtt://b:2")
    with pytest.raises(BrokerURLError, match="must start with mqtt://") as refused:
        Brokers.parse("mqtt://a:1,http://u:secret@b:2")
    assert "secret" not in str(refused.value)


def test_every_broker_option_takes_a_list() -> None:
    monitor = monitor_start(MonitorFlags(broker="mqtt://a:1,mqtt://b:2"), {}, None).settings
    assert Brokers.of(monitor.broker).urls == (BrokerURL("a", 1), BrokerURL("b", 2))
    relay = relay_start(RelayFlags(id="r1", local="mqtt://l1:1,mqtt://l2:1", upstream="mqtt://u1:1,mqtt://u2:1"), {},
                        None).settings  # fmt: skip
    assert [u.host for u in Brokers.of(relay.local).urls] == ["l1", "l2"]
    assert [u.host for u in Brokers.of(relay.upstream).urls] == ["u1", "u2"]
    assert relay.folds_children  # no node in common


async def test_a_client_skips_a_dead_node_and_uses_the_next(central_broker: CentralBroker) -> None:
    live = BrokerURL.parse(central_broker.url)
    brokers = Brokers((BrokerURL("127.0.0.1", 1), live))  # nothing listens on port 1
    used: list[BrokerURL] = []
    connected = asyncio.Event()

    def make(url: BrokerURL) -> aiomqtt.Client:
        used.append(url)
        return url.client("h12-broker-list-test")

    async def session(_: aiomqtt.Client) -> None:
        connected.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(stay_connected(brokers, make, session, name="test"))
    try:
        async with asyncio.timeout(20):
            await connected.wait()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert used[:2] == [BrokerURL("127.0.0.1", 1), live]


async def test_a_session_taken_over_again_and_again_stops_the_monitor(store: Store) -> None:
    monitor = new_monitor(store, FakeClock())
    ingest = monitor.ingest
    ingest.client_id = "shared-id"
    for _ in range(4):  # each session lost right after it began: another client takes it
        ingest._connection_changed(True)
        ingest._connection_changed(False)
    ingest._connection_changed(True)
    with pytest.raises(SessionStolen, match=r"another client .* uses the same client id"):
        ingest._connection_changed(False)


class Gate:
    """A TCP path to the test broker that can fail as a cluster node does: `cut` drops the
    connections through it, and new ones are taken but never answered (a NATS node electing
    JetStream leaders after another died) until `open`; `hold` leaves the ones open as they are."""

    def __init__(self, target: BrokerURL) -> None:
        self.target = target
        self.passing = True
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> BrokerURL:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return BrokerURL("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.links.add(writer)
        try:
            if not self.passing:  # taken, never answered: the client gives up on its own
                await reader.read()
                return
            up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
            self.links.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)
        finally:
            for link in (writer, *([up_writer] if "up_writer" in locals() else [])):
                self.links.discard(link)
                link.close()

    def hold(self) -> None:
        self.passing = False

    def cut(self) -> None:
        self.passing = False
        for link in list(self.links):
            link.transport.abort()

    def open(self) -> None:
        self.passing = True

    def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


class SpareRig:
    """A monitor in process on a list of gates to the test broker, with what its tests look at."""

    def __init__(self, monitor: Monitor, target: BrokerURL, topics: Topics, client_id: str) -> None:
        self.monitor, self.target, self.topics, self.client_id = monitor, target, topics, client_id
        self.ingest = monitor.ingest
        self.health = FleetView(monitor).health
        self.seq = 0

    async def beat_heard(self, times: int = 1) -> None:
        """Publish one beat; wait until it was taken `times` times (no more, in a while after)."""
        self.seq += 1
        received = self.monitor.received
        before = received["beats"]
        async with aiomqtt.Client(self.target.host, self.target.port, identifier=f"{self.client_id}-leaf") as leaf:
            await leaf.publish(self.topics.beat("web-1"), encode_beat(Beat(self.seq, 1.0)), qos=1)
        await until(lambda: received["beats"] >= before + times, 20, "the beat to be taken")
        await asyncio.sleep(0.5)
        assert received["beats"] == before + times

    def nodes(self) -> tuple[str | None, str | None]:
        """The nodes the main and the spare session are on, as /healthz names them."""
        health = self.health()
        return health.broker, health.spare_broker


@contextlib.asynccontextmanager
async def spare_rig(central_broker: CentralBroker, gates: list[Gate], tmp_path: Path) -> AsyncIterator[SpareRig]:
    target = BrokerURL.parse(central_broker.url)
    brokers = Brokers(tuple([await gate.start() for gate in gates]))
    store = await Store.open(f"sqlite:///{tmp_path / 'relaybeat.db'}")
    await store.upgrade()
    client_id = f"h12-spare-{uuid.uuid4().hex[:8]}"
    settings = MonitorSettings(brokers, Policy(misses=3), prefix=central_broker.prefix, client_id=client_id)
    monitor = Monitor(settings, store, SystemClock())
    running = asyncio.create_task(monitor.run())
    try:
        yield SpareRig(monitor, target, Topics(central_broker.prefix), client_id)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        for gate in gates:
            gate.close()
        await store.close()
        async with aiomqtt.Client(target.host, target.port, identifier=client_id, clean_session=True):
            pass  # the persistent session left on the test broker


async def test_the_spare_session_is_heard_only_while_the_main_one_is_lost(
    central_broker: CentralBroker, tmp_path: Path
) -> None:
    """Two nodes (gates to the test broker): the main session's node dies and the other stalls new
    connections; the spare, already connected and subscribed, is heard in its place (not blind). While
    the main session hears, a beat is taken once, not twice (the spare's copy is dropped unread)."""
    target = BrokerURL.parse(central_broker.url)
    gates = [Gate(target), Gate(target)]
    async with spare_rig(central_broker, gates, tmp_path) as rig:
        ingest, health = rig.ingest, rig.health
        await until(lambda: ingest._main and ingest._spare_up, 20, "both sessions to connect")
        await rig.beat_heard()  # the spare's copy dropped: taken once
        assert health().spare_takeovers == 0
        first, second = (str(gate_url) for gate_url in Brokers.of(rig.monitor.settings.broker).urls)
        assert rig.nodes() == (first, second)
        assert rig.monitor.part_states()["spare"] is PartState.RUNNING

        gates[1].hold()  # the spare's node: new connections stall, the spare's own goes on
        gates[0].cut()  # the main session's node dies
        await until(lambda: ingest._stand_in is not None, 20, "the spare to stand in")
        await rig.beat_heard()
        assert ingest._main is None  # heard through the spare alone
        assert health().spare_takeovers == 1
        assert rig.nodes() == (None, second)
        assert health().broker_connected
        assert not health().blind

        gates[0].open()
        await until(lambda: ingest._stand_in is None and ingest._main, 30, "the main session to hear again")
        await rig.beat_heard()  # the main session alone again
        assert health().spare_takeovers == 1


async def test_the_spare_session_keeps_off_the_main_sessions_node(
    central_broker: CentralBroker, tmp_path: Path
) -> None:
    """Three nodes. The first does not answer at start-up, so the main session goes on to the second,
    where the spare (from the list's second node on) would die with it: the spare is on the third.
    Then the second dies: the spare hears meanwhile, the main session comes to the third, and the
    spare leaves it for the first, which answers again. A beat is taken once throughout."""
    target = BrokerURL.parse(central_broker.url)
    gates = [Gate(target), Gate(target), Gate(target)]
    gates[0].hold()
    async with spare_rig(central_broker, gates, tmp_path) as rig:
        nodes = [str(url) for url in Brokers.of(rig.monitor.settings.broker).urls]
        await until(lambda: rig.nodes() == (nodes[1], nodes[2]), 30, "the sessions on different nodes")
        await rig.beat_heard()

        gates[0].open()
        gates[1].cut()  # the main session's node dies
        await until(lambda: rig.nodes() == (nodes[2], nodes[0]), 30, "the main on the third, the spare on the first")
        assert rig.health().spare_takeovers == 1
        await rig.beat_heard()
        assert not rig.health().blind


async def test_the_relays_spare_keeps_off_the_main_sessions_node(central_broker: CentralBroker) -> None:
    """As the monitor's spare: the relay's first upstream node does not answer at start-up, so its main
    session goes on to the second; the spare is on the third. The second dies: the spare sends the
    bundles meanwhile, the main session comes to the third, and the spare leaves it for the first."""
    target = BrokerURL.parse(central_broker.url)
    gates = [Gate(target), Gate(target), Gate(target)]
    nodes = Brokers(tuple([await gate.start() for gate in gates]))
    gates[0].hold()
    topics = Topics(central_broker.prefix)
    relay_id = f"r-{uuid.uuid4().hex[:6]}"
    relay = RelayService(
        RelaySettings(relay_id, target, nodes, flush_s=0.2, prefix=topics.prefix, accept_children=False)
    )
    running = asyncio.create_task(relay.run())
    bundles: list[bytes] = []

    async def count_bundles() -> None:
        async with aiomqtt.Client(target.host, target.port, identifier=f"{relay_id}-monitor") as client:
            await client.subscribe(topics.bundle(relay_id))
            async for message in client.messages:
                bundles.append(payload_bytes(message.payload))

    counting = asyncio.create_task(count_bundles())
    try:
        first, second, third = nodes.urls
        await until(lambda: (relay.upstream_at, relay.spare_at) == (second, third), 30, "the sessions apart")
        takeovers = relay.spare_takeovers  # 1 if the spare sent before the main session first did
        gates[0].open()
        gates[1].cut()  # the main session's node dies
        await until(
            lambda: (relay.upstream_at, relay.spare_at) == (third, first), 30, "main on the third, spare on the first"
        )
        assert relay.spare_takeovers == takeovers + 1
        sent = len(bundles)
        await until(lambda: len(bundles) >= sent + 3, 20, "bundles through the main session")
    finally:
        for task in (running, counting):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for gate in gates:
            gate.close()
