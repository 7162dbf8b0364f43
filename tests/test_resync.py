"""Delta bundles and keyframe requests through a real broker, in this process: a real relay service
sends binary deltas and a keyframe when asked on `<prefix>relay/<id>/resync`; the monitor's ingest
asks for one when it missed a delta."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from relaybeat.monitor.clock import SystemClock
from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.expiry import Expiry
from relaybeat.monitor.ingest import Ingest
from relaybeat.monitor.states import State, Transition
from relaybeat.relay.compact import BundleDecoder
from relaybeat.relay.mqtt import BrokerURL, payload_bytes
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.wire import (
    Beat,
    Bundle,
    Presence,
    RelayStatus,
    Topics,
    decode_relay_status,
    encode_beat,
    encode_bundle,
)
from tests.conftest import CentralBroker

WAIT_S = 20.0  # generous: a busy machine must not fail these


def _read(got: list[bytes]) -> list[Bundle]:
    """The relay's bundles so far, read in order as a receiver does (indexed deltas refer to a keyframe)."""
    decoder = BundleDecoder()
    return [decoder.decode(payload) for payload in list(got)]


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(round(WAIT_S / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    msg = f"timed out after {WAIT_S} s waiting for {what}"
    raise AssertionError(msg)


@contextlib.asynccontextmanager
async def _running(*parts: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(part) for part in parts]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _subscriber(url: BrokerURL, topic: str, got: list[bytes]) -> None:
    async with url.client(f"test-{uuid.uuid4().hex[:8]}") as client:
        await client.subscribe(topic, qos=1)
        async for message in client.messages:
            got.append(payload_bytes(message.payload))


async def test_a_relay_sends_binary_deltas_and_a_keyframe_when_asked(central_broker: CentralBroker) -> None:
    url, topics = BrokerURL.parse(central_broker.url), Topics(central_broker.prefix)
    relay_id = f"r-{uuid.uuid4().hex[:6]}"
    settings = RelaySettings(
        relay_id, url, url, flush_s=0.2, prefix=topics.prefix, accept_children=False, keyframe_s=3600
    )
    relay = RelayService(settings)
    got: list[bytes] = []
    async with _running(relay.run(), _subscriber(url, topics.bundle(relay_id), got)):
        await _until(lambda: relay.upstream_connected.is_set() and relay.local_connected.is_set(), "relay up")
        async with url.client(f"leaf-{uuid.uuid4().hex[:8]}") as leaf:
            await _until(lambda: len(got) >= 2, "bundles")
            await leaf.publish(topics.beat("web-1"), encode_beat(Beat(seq=1, interval_s=1.0)))
            await _until(lambda: any(b.hosts for b in _read(got)), "web-1 in a bundle")
            keyframes = relay.assembler.keyframes
            await leaf.publish(topics.relay_resync(relay_id), b"")
            await _until(lambda: relay.assembler.keyframes > keyframes, "a keyframe")
            await _until(lambda: _read(got)[-1].seq > relay.assembler.seq - 1, "it sent")
    bundles = _read(got)
    assert all(b.version == 2 and b.sent_ms is not None for b in bundles)
    assert relay.resyncs == 1
    deltas = [b for b in bundles if not b.keyframe]
    assert deltas, "between keyframes a relay sends deltas"
    assert all(not b.hosts or b.hosts[0].id == "web-1" for b in deltas)
    with_web = [b for b in bundles if b.hosts]
    assert with_web[0].hosts[0].seq == 1
    later_keyframes = [b for b in bundles if b.keyframe and b.seq > with_web[0].seq]
    assert later_keyframes, "the requested keyframe"
    assert [e.id for e in later_keyframes[0].hosts] == ["web-1"]  # a keyframe lists every leaf, news or not
    payloads = dict(zip([b.seq for b in bundles], list(got), strict=True))
    answer = BundleDecoder().decode(payloads[later_keyframes[0].seq])  # as the asker, which lacks our table
    assert answer.keyframe  # it carries the ids: not a keyframe by table


async def test_the_monitor_asks_for_a_keyframe_when_it_missed_a_delta(central_broker: CentralBroker) -> None:
    url, topics = BrokerURL.parse(central_broker.url), Topics(central_broker.prefix)
    clock = SystemClock()
    detector = Detector(Policy(), clock.now())
    decided: list[Transition] = []

    async def nothing() -> None:
        return None

    expiry = Expiry(detector, clock, decided.extend, nothing)
    ingest = Ingest(topics, detector, clock, decided.extend, expiry)
    asked: list[bytes] = []
    relay_id = f"r-{uuid.uuid4().hex[:6]}"
    # Two keyframes, sent 0.1 s apart by the relay's clock and published 0.5 s apart: as a live relay's
    # (the monitor dates bundles by a relay clock that two such confirm: monitor/dating.py).
    first = Bundle(relay_id, "b", 1, 1000, version=2, sent_ms=0)
    second = Bundle(relay_id, "b", 2, 1000, version=2, sent_ms=100)
    skipped = Bundle(relay_id, "b", 4, 1000, version=2, keyframe=False, sent_ms=200)  # seq 3 never came
    monitor_id = f"monitor-{uuid.uuid4().hex[:8]}"
    async with _running(ingest.run(url, monitor_id), _subscriber(url, topics.relay_resync(relay_id), asked)):
        await _until(lambda: not detector.disconnected and ingest._client is not None, "monitor connected")
        async with url.client(f"relay-{uuid.uuid4().hex[:8]}") as relay:
            await relay.publish(topics.bundle(relay_id), encode_bundle(first), qos=1)
            await asyncio.sleep(0.5)  # pacing, not a wait: arrival gaps of live bundles
            await relay.publish(topics.bundle(relay_id), encode_bundle(second), qos=1)
            await _until(lambda: relay_id in detector.relays, "the keyframes")
            assert detector.take_resync_requests() == []
            await relay.publish(topics.bundle(relay_id), encode_bundle(skipped), qos=1)
            await _until(lambda: bool(asked), "a keyframe request")
    assert detector.relays[relay_id].state == State.UP
    assert detector.relays[relay_id].desynced
    assert ingest.received["resync_requests"] == 1


async def test_a_relay_names_its_upstream_session_in_its_presence(central_broker: CentralBroker) -> None:
    """`online <boot> <session>` on connect, `stopped <boot> <session>` on a clean stop, and the will
    it left with the broker names the same session (a will of an older one is known stale)."""
    url, topics = BrokerURL.parse(central_broker.url), Topics(central_broker.prefix)
    relay_id = f"r-{uuid.uuid4().hex[:6]}"
    relay = RelayService(RelaySettings(relay_id, url, url, flush_s=0.2, prefix=topics.prefix, accept_children=False))
    got: list[bytes] = []
    async with _running(_subscriber(url, topics.relay_status(relay_id), got)):
        async with _running(relay.run()):
            await _until(lambda: bool(got), "the relay's online status")
        await _until(lambda: len(got) >= 2, "the relay's stopped status")
    assert [decode_relay_status(payload) for payload in got] == [
        Presence(RelayStatus.ONLINE, relay.boot, 1),
        Presence(RelayStatus.STOPPED, relay.boot, 1),
    ]
    next_will = payload_bytes(relay._will().payload)
    assert decode_relay_status(next_will) == Presence(RelayStatus.OFFLINE, relay.boot, 2)
