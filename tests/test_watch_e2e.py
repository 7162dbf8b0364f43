"""Watched sources end to end (issue 13): `relaybeat relay --watch tasmota --watch zigbee2mqtt --watch
sparkplug` and `relaybeat monitor` as real processes; the devices are raw MQTT clients (paho) that
connect with retained Last Wills and are then cut off abruptly (the socket closed, no DISCONNECT), so
the broker fires their wills; the Sparkplug B edge node's payloads are built with the public schema.

The devices' broker is the relay's own embedded amqtt broker (`--local embedded`) and the test's
central broker (Mosquitto when RELAYBEAT_TEST_MQTT_URL is set, else an embedded one).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import paho.mqtt.publish
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, select

from relaybeat.monitor.tables import HostModel
from relaybeat.relay import sparkplug
from relaybeat.relay.compact import BundleDecoder
from relaybeat.relay.mqtt import BrokerURL, payload_bytes
from relaybeat.relay.ports import pick_free
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.watch import sources
from relaybeat.relay.wire import Vouch, WatchedEntry
from tests.conftest import CentralBroker
from tests.monitors import until
from tests.processes import History, Service, api_get, port_open, wait_until

pytestmark = pytest.mark.e2e


class Device:
    """A raw MQTT client with a retained Last Will (`will`), that says `online` (retained) and can be cut off."""

    def __init__(
        self, port: int, will: tuple[str, bytes], online: tuple[str, bytes], *, retain_will: bool = True
    ) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:10]}")
        self.client.will_set(will[0], will[1], qos=1, retain=retain_will)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.say(*online)

    def say(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def cut_off(self) -> float:
        """Close the socket without DISCONNECT, as a device losing power does; when, on our clock."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert sock is not None
        sock.close()
        return time.monotonic()


def host(api: str, host_id: str) -> Any:
    return api_get(api, f"/api/v1/hosts/{host_id}")


def state(api: str, host_id: str) -> str | None:
    body = host(api, host_id)
    return None if body is None else str(body["state"])


def within(api: str, host_id: str, wanted: str, timeout: float) -> float:
    """Seconds until the API shows `host_id` in state `wanted`, polled every 20 ms."""
    wait_until(lambda: state(api, host_id) == wanted, timeout, f"{host_id} {wanted}", every=0.02)
    return time.monotonic()


@pytest.fixture(params=["relay-embedded-amqtt", "central-broker"])
def local_broker(request: pytest.FixtureRequest, central_broker: CentralBroker) -> Iterator[tuple[list[str], int]]:
    """The relay's --local arguments and the port the devices connect to."""
    if request.param == "central-broker":
        url = BrokerURL.parse(central_broker.url)
        yield ["--local", central_broker.url], url.port
    else:
        port = pick_free("127.0.0.1")
        yield ["--local", "embedded", "--serve", f"127.0.0.1:{port}"], port


def test_watched_devices_are_up_without_beats_and_down_or_unreachable_at_their_wills(
    central_broker: CentralBroker, local_broker: tuple[list[str], int], tmp_path: Path
) -> None:
    prefix, tag = central_broker.prefix, uuid.uuid4().hex[:6]
    local_args, port = local_broker
    api_port = pick_free("127.0.0.1")
    api, db_url = f"http://127.0.0.1:{api_port}", f"sqlite:///{tmp_path / 'relaybeat.db'}"
    monitor = Service(
        "monitor",
        ["monitor", "--broker", central_broker.url, "--db", db_url, "--listen", f"127.0.0.1:{api_port}",
         "--prefix", prefix, "--client-id", f"monitor-{tag}"],
        tmp_path,
    )  # fmt: skip
    relay = Service(
        "relay",
        ["relay", "--id", f"r-{tag}", *local_args, "--upstream", central_broker.url, "--prefix", prefix,
         "--watch", "tasmota", "--watch", "zigbee2mqtt", "--watch", "sparkplug"],
        tmp_path,
    )  # fmt: skip
    plug, lamp, door, group = f"plug-{tag}", f"lamp-{tag}", f"door-{tag}", f"plant{tag}"
    bridge_topic = "zigbee2mqtt/bridge/state"
    retained = [
        f"tele/{plug}/LWT",
        bridge_topic,
        f"zigbee2mqtt/{lamp}/availability",
        f"zigbee2mqtt/{door}/availability",
        f"spBv1.0/{group}/NBIRTH/edge-1",  # a birth said retained, as the Device helper says its online word
        f"spBv1.0/{group}/DBIRTH/edge-1/press",
    ]
    devices: list[Device] = []
    history = History(db_url)
    try:
        wait_until(lambda: api_get(api, "/healthz"), 30, "the monitor's API", service=monitor)
        wait_until(lambda: port_open(port), 30, "the relay's local broker", service=relay)
        wait_until(lambda: api_get(api, f"/api/v1/relays/r-{tag}"), 20, "the relay's first bundle", service=relay)

        # A Tasmota plug, a Zigbee2MQTT bridge with two devices, a Sparkplug B edge node with one device.
        tasmota = Device(port, (f"tele/{plug}/LWT", b"Offline"), (f"tele/{plug}/LWT", b"Online"))
        z2m = Device(port, (bridge_topic, b'{"state":"offline"}'), (bridge_topic, b'{"state":"online"}'))
        z2m.say(f"zigbee2mqtt/{lamp}/availability", b'{"state":"online"}')
        z2m.say(f"zigbee2mqtt/{door}/availability", b"online")
        node = f"spBv1.0/{group}/NBIRTH/edge-1"
        death = (f"spBv1.0/{group}/NDEATH/edge-1", sparkplug.encode({"bdSeq": 5}))
        edge = Device(port, death, (node, sparkplug.encode({"bdSeq": 5}, seq=0)), retain_will=False)
        # Retained here: the relay (a separate process) may subscribe after this is said, and a live
        # DBIRTH said before that is lost (a real edge node answers a rebirth request; this one cannot).
        edge.say(f"spBv1.0/{group}/DBIRTH/edge-1/press", sparkplug.encode({}, seq=1), retain=True)
        devices += [tasmota, z2m, edge]
        for host_id in (plug, lamp, door, f"{group}.edge-1", f"{group}.edge-1.press", "zigbee2mqtt-bridge"):
            wait_until(lambda h=host_id: state(api, h) == "up", 15, f"{host_id} up", service=relay)  # type: ignore[misc]
        assert (host(api, plug)["source"], host(api, lamp)["source"]) == ("tasmota", "zigbee2mqtt")

        # No beats, and they stay up (through several relay timeouts: flush 1 s × 3).
        time.sleep(4.0)
        assert state(api, plug) == state(api, lamp) == state(api, f"{group}.edge-1.press") == "up"

        # A stale NDEATH (an older bdSeq) is ignored; the node's real will makes its device unreachable.
        edge.say(f"spBv1.0/{group}/NDEATH/edge-1", sparkplug.encode({"bdSeq": 4}), retain=False)
        cut = edge.cut_off()
        node_down = within(api, f"{group}.edge-1", "down", 5) - cut
        assert state(api, f"{group}.edge-1.press") == "unreachable"

        # The plug loses power: its will says Offline, and it is down at once, the reason naming it.
        cut = tasmota.cut_off()
        plug_down = within(api, plug, "down", 5) - cut
        rows = wait_until(lambda: rows if len(rows := history.rows(plug)) == 2 else None, 5, "the plug's rows")
        assert rows[-1] == ("up", "down", f"tasmota: tele/{plug}/LWT said Offline")

        # Zigbee2MQTT says one device is offline (its own timeout), then the bridge dies: the bridge
        # is down and the device still online behind it unreachable, not down.
        z2m.say(f"zigbee2mqtt/{door}/availability", b'{"state":"offline"}')
        within(api, door, "down", 5)
        cut = z2m.cut_off()
        bridge_down = within(api, "zigbee2mqtt-bridge", "down", 5) - cut
        wait_until(lambda: state(api, lamp) == "unreachable", 5, "the lamp unreachable")
        assert state(api, door) == "down"
        assert history.rows(lamp)[-1] == ("up", "unreachable", f"zigbee2mqtt: bridge {bridge_topic} said offline")

        with create_engine(db_url).connect() as connection:
            sources = dict(connection.execute(select(HostModel.id, HostModel.source)).all())
        assert (sources[plug], sources[f"{group}.edge-1.press"]) == ("tasmota", "sparkplug")
        print(f"\nwill → down in the API: plug {plug_down:.3f} s, bridge {bridge_down:.3f} s, node {node_down:.3f} s")
        assert max(plug_down, bridge_down, node_down) < 5.0  # generous: the box may be busy
        assert monitor.stop() == 0
        assert relay.stop() == 0
    finally:
        for device in devices:
            device.client.loop_stop()
        cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"clean-{tag}")
        try:  # retained wills stay on a shared broker: clear ours
            cleaner.connect("127.0.0.1", port)
            cleaner.loop_start()
            for topic in retained:
                cleaner.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
            cleaner.loop_stop()
            cleaner.disconnect()
        except OSError:
            pass  # the relay's embedded broker is gone with it, and its retained messages too
        for service in (relay, monitor):
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
        history.close()


async def test_a_relay_takes_the_retained_availability_it_finds_on_subscribing_as_current_state(
    central_broker: CentralBroker,
) -> None:
    """A relay (re)starting under devices that said what they are long ago: the broker replays their
    retained words, and those are their states (amqtt or Mosquitto, a wildcard subscription)."""
    tag = uuid.uuid4().hex[:6]
    url = BrokerURL.parse(central_broker.url)
    said = {f"tele/on-{tag}/LWT": b"Online", f"tele/off-{tag}/LWT": b"Offline"}
    paho.mqtt.publish.multiple(
        [(topic, payload, 1, True) for topic, payload in said.items()], hostname=url.host, port=url.port
    )
    settings = RelaySettings(
        f"r-{tag}", url, url, prefix=central_broker.prefix, watch=sources(["tasmota"]), accept_children=False
    )
    relay = RelayService(settings)
    running = asyncio.create_task(relay.run())
    try:
        expected = {f"on-{tag}": Vouch.UP, f"off-{tag}": Vouch.DOWN}
        await until(
            lambda: {h: d.state for h, d in relay.watch.devices.items() if tag in h} == expected, 10, "the replay"
        )
        assert not relay.rejections.counts
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        paho.mqtt.publish.multiple([(topic, b"", 1, True) for topic in said], hostname=url.host, port=url.port)


async def test_a_watched_change_goes_upstream_at_once_not_at_the_next_flush(central_broker: CentralBroker) -> None:
    """With a 20 s flush, a device's online and then its will each reach the upstream broker in an extra
    bundle (at most one per quarter flush), long before the planned flush."""
    tag = uuid.uuid4().hex[:6]
    url = BrokerURL.parse(central_broker.url)
    topic = f"tele/w-{tag}/LWT"
    settings = RelaySettings(
        f"r-{tag}", url, url, flush_s=20.0, prefix=central_broker.prefix, watch=sources(["tasmota"]),
        accept_children=False,
    )  # fmt: skip
    relay = RelayService(settings)
    said: list[tuple[float, tuple[WatchedEntry, ...]]] = []
    async with aiomqtt.Client(url.host, url.port, identifier=f"up-{tag}") as upstream:
        await upstream.subscribe(f"{central_broker.prefix}bundle/r-{tag}", qos=1)

        async def listen() -> None:
            decoder = BundleDecoder()  # the relay's deltas are indexed against its keyframe: read in order
            async for message in upstream.messages:
                said.append((time.monotonic(), decoder.decode(payload_bytes(message.payload)).watched))

        listening = asyncio.create_task(listen())
        running = asyncio.create_task(relay.run())
        try:
            await until(lambda: said, 15, "the first bundle")
            # The upstream side may flush before the local side subscribed: a live "Online" sent before
            # that is lost (a real Tasmota retains it), so wait for the local session's subscriptions.
            await until(lambda: relay._local_client is not None, 15, "the relay's local subscriptions")
            started = time.monotonic()
            paho.mqtt.publish.single(topic, b"Online", qos=1, hostname=url.host, port=url.port)
            device = f"w-{tag}"  # a shared broker may hold other devices' retained words: look for ours

            def state() -> Vouch | None:
                return next((w.state for w in said[-1][1] if w.id == device), None)

            await until(lambda: state() is Vouch.UP, 10, "the device up")
            paho.mqtt.publish.single(topic, b"Offline", qos=1, hostname=url.host, port=url.port)
            await until(lambda: state() is Vouch.DOWN, 10, "the device down")
            assert said[-1][0] - started < 15.0  # the planned flush was 20 s after the first bundle
            assert all(at - started < 15.0 for at, _ in said[1:])  # every bundle since was an extra one
        finally:
            for task in (running, listening):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
