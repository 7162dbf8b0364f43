"""Broker lists (issue 12): every broker option takes the nodes of one cluster, comma-separated; a
client uses the first that answers and moves on when it is lost. And a monitor whose MQTT session
keeps being taken over stops with an error saying so. In process, on the test broker."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from relaybeat.monitor.ingest import SessionStolen
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import Brokers, BrokerURL, BrokerURLError, stay_connected
from relaybeat.settings import MonitorFlags, RelayFlags, monitor_start, relay_start
from tests.conftest import CentralBroker
from tests.fakes import FakeClock
from tests.monitors import new_monitor


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
