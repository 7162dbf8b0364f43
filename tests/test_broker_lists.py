"""Broker lists (issue 12): every broker option takes the nodes of one cluster, comma-separated; a
client uses the first that answers and moves on when it is lost. And a monitor whose MQTT session
keeps being taken over stops with an error saying so. In process, on the test broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import aiomqtt
import pytest

from relaybeat.monitor.clock import SystemClock
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.ingest import SessionStolen
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.monitor.view import FleetView
from relaybeat.relay.mqtt import Brokers, BrokerURL, BrokerURLError, stay_connected
from relaybeat.relay.parts import PartState
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


async def test_the_spare_session_is_heard_only_while_the_main_one_is_lost(
    central_broker: CentralBroker, tmp_path: Path
) -> None:
    """Two nodes (gates to the test broker): the main session's node dies and the other stalls new
    connections; the spare, already connected and subscribed, is heard in its place (not blind). While
    the main session hears, a beat is taken once, not twice (the spare's copy is dropped unread)."""
    target = BrokerURL.parse(central_broker.url)
    gates = Gate(target), Gate(target)
    brokers = Brokers((await gates[0].start(), await gates[1].start()))
    store = await Store.open(f"sqlite:///{tmp_path / 'relaybeat.db'}")
    await store.upgrade()
    client_id = f"h12-spare-{uuid.uuid4().hex[:8]}"
    settings = MonitorSettings(brokers, Policy(misses=3), prefix=central_broker.prefix, client_id=client_id)
    monitor = Monitor(settings, store, SystemClock())
    health = FleetView(monitor).health
    ingest, topics = monitor.ingest, Topics(central_broker.prefix)
    running = asyncio.create_task(monitor.run())
    seq = 0

    async def beat_heard(times: int = 1) -> None:
        """Publish one beat; wait until it was taken `times` times (no more, in a while after)."""
        nonlocal seq
        seq += 1
        before = monitor.received["beats"]
        async with aiomqtt.Client(target.host, target.port, identifier=f"{client_id}-leaf") as leaf:
            await leaf.publish(topics.beat("web-1"), encode_beat(Beat(seq, 1.0)), qos=1)
        await until(lambda: monitor.received["beats"] >= before + times, 20, "the beat to be taken")
        await asyncio.sleep(0.5)
        assert monitor.received["beats"] == before + times

    try:
        await until(lambda: ingest._main and ingest._spare_up, 20, "both sessions to connect")
        await beat_heard()  # the spare's copy dropped: taken once
        assert health().spare_takeovers == 0
        assert (health().broker, health().spare_broker) == (str(brokers.urls[0]), str(brokers.urls[1]))
        assert monitor.part_states()["spare"] is PartState.RUNNING

        gates[1].hold()  # the spare's node: new connections stall, the spare's own goes on
        gates[0].cut()  # the main session's node dies
        await until(lambda: ingest._stand_in is not None, 20, "the spare to stand in")
        await beat_heard()
        assert ingest._main is None  # heard through the spare alone
        assert health().spare_takeovers == 1
        assert (health().broker, health().spare_broker) == (None, str(brokers.urls[1]))
        assert health().broker_connected
        assert not health().blind

        gates[0].open()
        await until(lambda: ingest._stand_in is None and ingest._main, 30, "the main session to hear again")
        await beat_heard()  # the main session alone again
        assert health().spare_takeovers == 1
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        for gate in gates:
            gate.close()
        await store.close()
        async with aiomqtt.Client(target.host, target.port, identifier=client_id, clean_session=True):
            pass  # the persistent session left on the test broker
