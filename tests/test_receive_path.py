"""The relay's receive path: the MQTT packet codec (pure), the lean client on a real broker, and the
plain-beat fast path of `decode_beat` (it must decide exactly as the general path does)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaybeat.broker_config.embedded import EmbeddedBroker
from relaybeat.broker_config.passwords import add_user
from relaybeat.broker_config.settings import BrokerSettings
from relaybeat.errors import Unavailable
from relaybeat.relay.mqtt import BrokerURL, LeanClient, backlog
from relaybeat.relay.packets import (
    ConnAck,
    PacketError,
    PacketReader,
    PingResp,
    Publish,
    SubAck,
    UnsubAck,
    connect_packet,
    puback_packet,
    publish_packet,
    subscribe_packet,
)
from relaybeat.relay.wire import Beat, WireError, decode_beat, encode_beat
from tests.conftest import CentralBroker

WAIT_S = 5.0

# ------------------------------------------------------------------------------------ packets (pure)

GOLDEN_OUT = [
    (connect_packet("r1", 10), b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x0a\x00\x02r1"),
    (connect_packet("r1", 10, "u", "p"), b"\x10\x14\x00\x04MQTT\x04\xc2\x00\x0a\x00\x02r1\x00\x01u\x00\x01p"),
    (connect_packet("m", 5, clean_session=False), b"\x10\x0d\x00\x04MQTT\x04\x00\x00\x05\x00\x01m"),  # persistent
    (subscribe_packet(7, [("a/+", 1)]), b"\x82\x08\x00\x07\x00\x03a/+\x01"),
    (puback_packet(258), b"\x40\x02\x01\x02"),
    (publish_packet("a/b", b"hi"), b"\x30\x07\x00\x03a/bhi"),
]
GOLDEN_IN = [
    (b"\x20\x02\x00\x00", ConnAck(False, 0)),
    (b"\x20\x02\x01\x05", ConnAck(True, 5)),
    (b"\x90\x04\x00\x07\x01\x80", SubAck(7, (1, 0x80))),
    (b"\xd0\x00", PingResp()),
    (b"\xb0\x02\x00\x09", UnsubAck(9)),
    (b"\x30\x07\x00\x03a/bhi", Publish("a/b", b"hi", 0, False, 0)),
    (b"\x33\x09\x00\x03a/b\x01\x02hi", Publish("a/b", b"hi", 1, True, 258)),
]


@pytest.mark.parametrize(("packet", "wire"), GOLDEN_OUT)
def test_packets_we_send_are_byte_for_byte_mqtt_3_1_1(packet: bytes, wire: bytes) -> None:
    assert packet == wire


@pytest.mark.parametrize(("wire", "packet"), GOLDEN_IN)
def test_packets_a_broker_sends_are_read_as_mqtt_3_1_1_says(wire: bytes, packet: object) -> None:
    reader = PacketReader()
    assert reader.feed(wire) == [packet]
    assert reader.pending == 0


def test_a_remaining_length_of_several_bytes_is_read_and_a_fifth_byte_refused() -> None:
    payload = b"x" * 20_000  # remaining length takes three varint bytes
    assert PacketReader().feed(publish_packet("t", payload)) == [Publish("t", payload, 0, False, 0)]
    with pytest.raises(PacketError):
        PacketReader().feed(b"\x30\xff\xff\xff\xff\x01")


@pytest.mark.parametrize(
    "wire",
    [
        b"\x34\x05\x00\x01t\x00\x01",  # QoS 2: never asked for
        b"\x36\x05\x00\x01t\x00\x01",  # QoS 3: no such thing
        b"\x32\x03\x00\x01t",  # QoS 1 without a packet id
        b"\x32\x05\x00\x01t\x00\x00",  # packet id 0
        b"\x30\x01\x00",  # too short for a topic length
        b"\x30\x03\x00\x09t",  # topic runs past the packet
        b"\x20\x03\x00\x00\x00",  # CONNACK of the wrong size
        b"\x10\x00",  # a CONNECT, from a broker
    ],
)
def test_a_stream_that_breaks_the_protocol_raises_packet_error(wire: bytes) -> None:
    with pytest.raises(PacketError):
        PacketReader().feed(wire)


publishes = st.builds(
    Publish,
    topic=st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
    payload=st.binary(max_size=300),
    qos=st.sampled_from([0, 1]),
    retain=st.booleans(),
    packet_id=st.integers(1, 0xFFFF),
).map(lambda p: p._replace(packet_id=0) if p.qos == 0 else p)


@given(st.lists(publishes, max_size=20), st.data())
def test_any_stream_of_publishes_reads_back_whatever_the_reads_cut_it_into(
    messages: list[Publish], data: st.DataObject
) -> None:
    stream = b"".join(publish_packet(m.topic, m.payload, m.qos, m.packet_id, m.retain) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = PacketReader()
    got = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += reader.feed(stream[start:stop])
    assert got == messages
    assert reader.pending == 0


@given(st.binary(max_size=200))
def test_any_bytes_are_read_as_packets_or_refused_with_packet_error(junk: bytes) -> None:
    with contextlib.suppress(PacketError):
        PacketReader().feed(junk)


# ------------------------------------------------------------------------------- the beat fast path


def general(payload: bytes) -> Beat | str:
    """What decode_beat decides on the general path (a trailing space keeps the fast path out)."""
    try:
        return decode_beat(payload + b" ")
    except WireError as err:
        return err.reason


def fast(payload: bytes) -> Beat | str:
    try:
        return decode_beat(payload)
    except WireError as err:
        return err.reason


intervals = st.one_of(
    st.integers(0, 200_000),
    st.floats(0, 200_000, allow_nan=False),
    st.floats(0, 1),
    st.sampled_from([0.01, 5.0, 0.009]),
)


@given(st.integers(0, 2**63 - 1), intervals)
def test_a_plain_beat_decides_as_the_general_path_does(seq: int, interval: float) -> None:
    payload = orjson.dumps({"seq": seq, "interval": interval})
    assert fast(payload) == general(payload)


def test_the_beats_relaybeat_leaf_sends_take_the_fast_path_and_others_still_decode() -> None:
    assert decode_beat(encode_beat(Beat(seq=3, interval_s=5.0))) == Beat(seq=3, interval_s=5.0)
    assert decode_beat(b'{"seq":3,"interval":1}') == Beat(seq=3, interval_s=1.0)
    for odd in (b'{"seq":03,"interval":1}', b'{"seq":1,"interval":01}', b'{"seq":1,"interval":1.}'):
        assert fast(odd) == general(odd) == "bad_json"  # not JSON: refused as before, not read by the regex
    assert fast(b'{"seq":1,"interval":0}') == "bad_interval"
    assert fast(b'{"seq":1,"interval":100000}') == "bad_interval"
    assert fast(b'{"seq":99999999999999999999,"interval":1}') == general(b'{"seq":99999999999999999999,"interval":1}')


# ------------------------------------------------------------------------ the lean client, real broker


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(BrokerSettings(port=0)) as running:
        yield running


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self.changed = asyncio.Event()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        self.got.append((topic, payload, retained))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


async def test_the_lean_client_receives_qos_0_and_1_in_order_and_acknowledges_qos_1(broker: EmbeddedBroker) -> None:
    url = BrokerURL.parse(broker.url)
    prefix = f"t{uuid.uuid4().hex[:6]}/"
    inbox = Inbox()
    async with url.lean_client("lean-1", inbox, gather_s=0.005) as lean:
        await lean.subscribe(f"{prefix}beat/+", qos=0)
        await lean.subscribe(f"{prefix}bundle/+", qos=1)
        runner = asyncio.create_task(lean.run())
        async with aiomqtt.Client(url.host, url.port, identifier="pub-1") as pub:
            for i in range(200):
                await pub.publish(f"{prefix}beat/h{i}", f"{i}".encode(), qos=0)
            await pub.publish(f"{prefix}bundle/r1", b"bundle", qos=1)  # returns once PUBACKed via the broker
            await inbox.wait_for(201)
        await lean.publish(f"{prefix}beat/self", b"from lean")  # QoS 0 out: it hears itself
        await inbox.wait_for(202)
        assert backlog(lean) == (0, 0)
        assert not runner.done()
        runner.cancel()
    beats = [payload for topic, payload, _ in inbox.got if "/beat/h" in topic]
    assert beats == [f"{i}".encode() for i in range(200)]
    assert (f"{prefix}bundle/r1", b"bundle", False) in inbox.got
    assert inbox.got[-1] == (f"{prefix}beat/self", b"from lean", False)


async def test_a_lost_session_has_no_backlog_and_asking_raises_nothing(broker: EmbeddedBroker) -> None:
    """The expiry part asks for the backlog of whichever session hears; asked right after that
    session's connection was lost (its socket closed), it was a ValueError that stopped the monitor."""
    url = BrokerURL.parse(broker.url)
    async with url.lean_client(f"lean-lost-{uuid.uuid4().hex[:6]}", Inbox()) as lean:
        runner = asyncio.create_task(lean.run())
        stream = lean._stream
        assert stream is not None
        assert stream.transport is not None
        stream.transport.abort()
        with pytest.raises(Unavailable):
            await runner
        assert backlog(lean) == (0, 0)


async def test_a_persistent_lean_session_gets_what_was_published_while_it_was_away(broker: EmbeddedBroker) -> None:
    """What the monitor's session relies on: its subscriptions (made in one SUBSCRIBE) and the QoS 1
    messages published while it was away are kept by the broker and handed on when it is back."""
    url = BrokerURL.parse(broker.url)
    prefix = f"t{uuid.uuid4().hex[:6]}/"
    client_id = f"lean-persistent-{uuid.uuid4().hex[:6]}"
    inbox = Inbox()
    async with url.lean_client(client_id, inbox, clean_session=False) as lean:
        await lean.subscribe([(f"{prefix}bundle/+", 1), (f"{prefix}relay/+/status", 1)])
    async with aiomqtt.Client(url.host, url.port, identifier=f"pub-{client_id}") as pub:
        await pub.publish(f"{prefix}bundle/r1", b"while away", qos=1)
        await pub.publish(f"{prefix}relay/r1/status", b"offline", qos=1)
    try:
        async with url.lean_client(client_id, inbox, clean_session=False) as lean:
            runner = asyncio.create_task(lean.run())
            await inbox.wait_for(2)
            runner.cancel()
    finally:
        async with url.lean_client(client_id, inbox):
            pass  # a clean session ends the persistent one on the broker
    assert [(topic, payload) for topic, payload, _ in inbox.got] == [
        (f"{prefix}bundle/r1", b"while away"),
        (f"{prefix}relay/r1/status", b"offline"),
    ]


async def test_a_backlog_is_handed_on_over_many_turns_of_the_loop_in_order(central_broker: CentralBroker) -> None:
    """A persistent session's backlog comes in big reads; handing one on stops after HAND_ON_BUDGET_S
    and goes on at the next turn of the event loop, so a replayed backlog never holds the loop (here
    each message costs 1 ms; without the budget the loop turns only between reads: Mosquitto has at
    most 20 QoS 1 messages in flight, so about 20 times for 400 messages)."""
    url = BrokerURL.parse(central_broker.url)
    prefix = central_broker.prefix
    client_id = f"lean-backlog-{uuid.uuid4().hex[:6]}"
    got: list[bytes] = []
    turns, at_turn = [0], []
    all_in = asyncio.Event()

    def slow(topic: str, payload: bytes, retained: bool) -> None:
        time.sleep(0.001)  # a millisecond of the loop per message
        got.append(payload)
        at_turn.append(turns[0])
        if len(got) == 400:
            all_in.set()

    async def count_turns() -> None:
        while True:
            await asyncio.sleep(0)
            turns[0] += 1

    async with url.lean_client(client_id, slow, clean_session=False) as lean:
        await lean.subscribe([(f"{prefix}bundle/+", 1)])
    async with aiomqtt.Client(url.host, url.port, identifier=f"pub-{client_id}") as pub:
        for i in range(400):
            await pub.publish(f"{prefix}bundle/r1", f"{i}".encode(), qos=1)
    counter = asyncio.create_task(count_turns())
    try:
        async with url.lean_client(client_id, slow, clean_session=False) as lean:
            runner = asyncio.create_task(lean.run())
            async with asyncio.timeout(60):
                await all_in.wait()
            assert lean.queued() == 0
            runner.cancel()
    finally:
        counter.cancel()
        async with url.lean_client(client_id, slow):
            pass  # a clean session ends the persistent one on the broker
    assert got == [f"{i}".encode() for i in range(400)]
    assert len(set(at_turn)) >= 60, f"the loop turned {len(set(at_turn))} times while 400 messages were handed on"


async def test_a_message_read_after_a_pause_to_gather_is_dated_no_later_than_it_was_published(
    broker: EmbeddedBroker,
) -> None:
    """Reading pauses after each small read for `gather_s`; what the next read hands on arrived after
    the pause began, and `waited_s` dates it back to then at most, never to when it was read."""
    url = BrokerURL.parse(broker.url)
    prefix = f"t{uuid.uuid4().hex[:6]}/"
    loop = asyncio.get_running_loop()
    heard: list[tuple[str, float, float]] = []  # topic, read at, dated at
    arrived = asyncio.Event()
    clients: list[LeanClient] = []

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        now = loop.time()
        heard.append((topic, now, now - clients[0].waited_s))
        arrived.set()

    gather_s = 2.0
    async with url.lean_client("lean-gather", on_message, gather_s=gather_s) as lean:
        clients.append(lean)
        await lean.subscribe(f"{prefix}beat/+", qos=0)
        runner = asyncio.create_task(lean.run())
        async with aiomqtt.Client(url.host, url.port, identifier="pub-gather") as pub:
            await pub.publish(f"{prefix}beat/a", b"", qos=0)
            async with asyncio.timeout(WAIT_S):
                await arrived.wait()
            await asyncio.sleep(1.0)  # reading is paused now (it pauses after every small read), for 2 s
            published_at = loop.time()
            await pub.publish(f"{prefix}beat/b", b"", qos=0)
            async with asyncio.timeout(WAIT_S):
                while len(heard) < 2:
                    arrived.clear()
                    await arrived.wait()
        runner.cancel()
    (_, a_read, _), (topic, b_read, b_dated) = heard
    assert topic == f"{prefix}beat/b"
    assert b_read > published_at  # it waited in the socket for the pause to end (about 1 s)
    assert a_read <= b_dated <= published_at  # dated within the pause, not when it was read
    assert b_read - b_dated <= gather_s


async def test_the_lean_client_says_why_a_session_ends(broker: EmbeddedBroker, tmp_path: Path) -> None:
    url = BrokerURL.parse(broker.url)
    async with url.lean_client("lean-2", Inbox()) as lean:
        runner = asyncio.create_task(lean.run())
        await asyncio.sleep(0.1)
        await broker.__aexit__(None, None, None)  # the broker goes away under a live session
        with pytest.raises(Unavailable, match="closed the connection"):
            await asyncio.wait_for(runner, WAIT_S)
    with pytest.raises(ConnectionRefusedError):  # nobody listens: an OSError, which stay_connected retries
        async with url.lean_client("lean-3", Inbox()):
            pass


async def test_the_lean_client_is_refused_with_a_reason_on_bad_credentials(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    add_user(passwd, "relay-a", "right")
    async with EmbeddedBroker(BrokerSettings(port=0, password_file=passwd, relays=("relay-a",))) as running:
        wrong = BrokerURL.parse(f"mqtt://relay-a:wrong@127.0.0.1:{running.port}")
        with pytest.raises(Unavailable, match="refused"):
            async with wrong.lean_client("relay-a/local-x", Inbox()):
                pass
        right = BrokerURL.parse(f"mqtt://relay-a:right@127.0.0.1:{running.port}")
        async with right.lean_client("relay-a/local-x", Inbox()) as lean:
            assert isinstance(lean, LeanClient)


async def test_what_the_session_heard_before_it_was_ready_is_taken_in_order_with_the_loop_free_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnected persistent session's backlog arrives right after CONNACK, before the monitor is
    ready: thousands of bundles, taken a step at a time (not in one hold), what arrives meanwhile after them."""
    from typing import cast

    from relaybeat.monitor.store import Store
    from tests.fakes import FakeClock
    from tests.monitors import new_monitor

    monkeypatch.setattr("relaybeat.monitor.ingest.HAND_ON_BUDGET_S", 0.0)  # a step per message
    ingest = new_monitor(cast(Store, None), FakeClock()).ingest
    taken: list[bytes] = []
    monkeypatch.setattr(ingest, "take", lambda topic, payload, retained=False: taken.append(payload))
    topic = "relaybeat/bundle/r1"
    for n in range(5):
        ingest._heard(topic, b"early %d" % n, False)  # the session is not ready: kept
    assert taken == []
    ingest._main = cast(LeanClient, object())  # now it is
    turns = 0

    async def probe() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counting = asyncio.create_task(probe())
    draining = asyncio.create_task(ingest._drain_early())
    await asyncio.sleep(0)
    ingest._heard(topic, b"while draining", False)
    await draining
    ingest._heard(topic, b"after", False)
    counting.cancel()
    assert taken == [*(b"early %d" % n for n in range(5)), b"while draining", b"after"]
    assert turns >= 5  # the loop ran between the messages
