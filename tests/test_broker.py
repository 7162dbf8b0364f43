"""The embedded broker against real clients: aiomqtt, and raw sockets where a client must misbehave.

Every embedded broker listens on port 0 (a free port it picks) and every test gets its own topic
prefix. Negative checks ("X is not delivered") are ordered against a later message that must arrive,
so no test sleeps and then asserts.

The tests marked `both` also run against Mosquitto started from broker_config/mosquitto.conf and
broker_config/acl, so the shipped production config is exercised. Without a `mosquitto` binary they
skip, unless RELAYBEAT_TEST_MOSQUITTO=1 says it must be there.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import argon2
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from relaybeat.broker_config import CONFIG_DIR, amqtt_adapter, passwords
from relaybeat.broker_config.embedded import EmbeddedBroker
from relaybeat.broker_config.passwords import RecentLogins, add_user, hash_password, read_password_file
from relaybeat.broker_config.settings import BrokerConfigError, BrokerPortInUse, BrokerSettings, load_broker_settings
from relaybeat.broker_config.throttle import FairGate, LoginThrottle, PasswordChecks
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import Topics
from tests.processes import Topology, shipped_amqtt_config, shipped_mosquitto_config, wait_until

PASSWORDS = {
    "h1": "pw-h1",
    "h1-b": "pw-h1-b",
    "h2": "pw-h2",
    "h3": "pw-h3",
    "relay-a": "pw-relay-a",
    "monitor": "pw-monitor",
}
WAIT_S = 3.0

# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broker") / "passwd"
    for user, password in PASSWORDS.items():
        add_user(path, user, password)
    return path


@pytest.fixture
def topics() -> Topics:
    return Topics(f"t{uuid.uuid4().hex[:8]}/relaybeat/")


@pytest.fixture
async def anonymous_broker(topics: Topics) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(BrokerSettings(port=0, prefix=topics.prefix)) as broker:
        yield broker


@pytest.fixture
async def auth_broker(password_file: Path, topics: Topics) -> AsyncIterator[EmbeddedBroker]:
    settings = BrokerSettings(
        port=0, password_file=password_file, relays=("relay-a",), monitors=("monitor",), prefix=topics.prefix
    )
    async with EmbeddedBroker(settings) as broker:
        yield broker


@dataclass(frozen=True)
class Endpoint:
    """A running broker of either kind, as the tests see it."""

    host: str
    port: int
    kind: str  # "amqtt" or "mosquitto"
    topics: Topics


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Endpoint]:
    """Mosquitto running the shipped config, with paths and port moved into this test's directory."""
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    passwd_tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")
    if binary is None or passwd_tool is None:
        if os.environ.get("RELAYBEAT_TEST_MOSQUITTO"):
            pytest.fail("RELAYBEAT_TEST_MOSQUITTO is set but mosquitto/mosquitto_passwd are not installed")
        pytest.skip("mosquitto is not installed")
    passwd = tmp_path / "passwd"
    for index, (user, password) in enumerate(PASSWORDS.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run([passwd_tool, *create, "-b", str(passwd), user, password], check=True, capture_output=True)
    port, log_file = pick_free(), tmp_path / "mosquitto.log"
    config = tmp_path / "mosquitto.conf"
    config.write_text(shipped_mosquitto_config(tmp_path, port, passwd, CONFIG_DIR / "acl"))
    process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 5
        while not _port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                log = log_file.read_text() if log_file.exists() else ""
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                pytest.fail(f"mosquitto did not start: {stderr} {log}")
            time.sleep(0.02)
        yield Endpoint("127.0.0.1", port, "mosquitto", Topics("relaybeat/"))  # the ACL names relaybeat/
    finally:
        process.terminate()
        process.wait(timeout=5)
        if process.stderr:
            process.stderr.close()


def _endpoint(request: pytest.FixtureRequest, kind: str, topics: Topics) -> Endpoint:
    if kind == "mosquitto":
        endpoint: Endpoint = request.getfixturevalue("mosquitto")
        return endpoint
    broker: EmbeddedBroker = request.getfixturevalue("auth_broker" if kind == "amqtt" else "anonymous_broker")
    return Endpoint(broker.host, broker.port, kind, topics)


@pytest.fixture(params=["amqtt", "mosquitto"])
def both(request: pytest.FixtureRequest, topics: Topics) -> Endpoint:
    """The password-protected embedded broker, then Mosquitto with the shipped config."""
    return _endpoint(request, request.param, topics)


@pytest.fixture(params=["amqtt-anonymous", "amqtt", "mosquitto"])
def every(request: pytest.FixtureRequest, topics: Topics) -> Endpoint:
    """`both`, and first the anonymous embedded broker (what `relaybeat up` runs)."""
    return _endpoint(request, request.param, topics)


def client(
    broker: EmbeddedBroker | Endpoint,
    user: str | None = None,
    *,
    identifier: str | None = None,
    password: str | None = None,
    will: aiomqtt.Will | None = None,
    keepalive: int = 60,
    clean_session: bool = True,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=user,
        password=PASSWORDS.get(user or "") if password is None else password,
        identifier=identifier or user,
        will=will,
        keepalive=keepalive,
        clean_session=clean_session,
        timeout=WAIT_S,
    )


async def next_message(subscriber: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(WAIT_S):
        return await anext(subscriber.messages)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(
    client_id: str,
    keepalive_s: int,
    will: tuple[str, bytes] | None = None,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """An MQTT 3.1.1 CONNECT, clean session; the will (if any) at QoS 0, not retained."""
    flags, payload = 0x02, _string(client_id)
    if will is not None:
        flags |= 0x04
        payload += _string(will[0]) + _string(will[1])
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    body = _string("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + payload
    return b"\x10" + _remaining_length(len(body)) + body


class RawClient:
    """A client that does only what the test tells it: CONNECT, PINGREQ, DISCONNECT, or nothing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, return_code: int) -> None:
        self.reader, self.writer, self.return_code = reader, writer, return_code

    @classmethod
    async def connect(
        cls,
        broker: EmbeddedBroker | Endpoint,
        client_id: str,
        keepalive_s: int = 60,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> RawClient:
        reader, writer = await asyncio.open_connection(broker.host, broker.port)
        writer.write(connect_packet(client_id, keepalive_s, will, username, password))
        async with asyncio.timeout(WAIT_S):
            connack = await reader.readexactly(4)
        assert connack[:2] == b"\x20\x02", connack
        return cls(reader, writer, connack[3])

    async def ping(self) -> None:
        self.writer.write(b"\xc0\x00")
        async with asyncio.timeout(WAIT_S):
            assert await self.reader.readexactly(2) == b"\xd0\x00"

    async def disconnect(self) -> None:
        self.writer.write(b"\xe0\x00")
        await self.writer.drain()
        self.drop()

    async def closed_by_broker(self) -> bool:
        async with asyncio.timeout(WAIT_S):
            closed = await self.reader.read(1) == b""
        self.writer.close()
        return closed

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed process would."""
        self.writer.transport.abort()
        self.writer.close()


# -------------------------------------------------------------------------------------- anonymous


async def test_anonymous_clients_can_publish_and_subscribe_without_a_password_file(
    anonymous_broker: EmbeddedBroker, topics: Topics
) -> None:
    assert anonymous_broker.url == f"mqtt://127.0.0.1:{anonymous_broker.port}"
    async with client(anonymous_broker) as subscriber, client(anonymous_broker) as publisher:
        await subscriber.subscribe(topics.all_beats, qos=1)
        await publisher.publish(topics.beat("h1"), b'{"seq":1}', qos=1)
        message = await next_message(subscriber)
    assert (message.topic.value, message.payload) == (topics.beat("h1"), b'{"seq":1}')


async def test_persistent_session_queues_qos1_messages_while_away_and_redelivers_them(every: Endpoint) -> None:
    """clean_session=false: the subscription and the QoS 1 messages published meanwhile wait for
    the client's return (amqtt 0.12.1 dropped both for anonymous clients)."""
    topics = every.topics
    async with client(every, "monitor", clean_session=False) as subscriber:
        await subscriber.subscribe(topics.all_beats, qos=1)
    async with client(every, "h1") as publisher:
        for n in range(3):
            await publisher.publish(topics.beat("h1"), b"%d" % n, qos=1)
    async with client(every, "monitor", clean_session=False) as subscriber:  # no new SUBSCRIBE
        received = [await next_message(subscriber) for _ in range(3)]
    assert [(m.topic.value, m.payload, m.qos) for m in received] == [
        (topics.beat("h1"), b"%d" % n, 1) for n in range(3)
    ]


async def test_silent_client_is_closed_after_one_and_a_half_keepalives_and_its_will_fires(
    anonymous_broker: EmbeddedBroker, topics: Topics
) -> None:
    async with client(anonymous_broker) as observer:
        await observer.subscribe(topics.all_beats)
        started = time.monotonic()
        silent = await RawClient.connect(anonymous_broker, "silent", 1, will=(topics.beat("silent"), b"gone"))
        pinger = await RawClient.connect(anonymous_broker, "pinger", 1, will=(topics.beat("pinger"), b"gone"))
        assert (silent.return_code, pinger.return_code) == (0, 0)

        async def keep_pinging() -> None:
            while time.monotonic() - started < 3.0:  # twice pinger's deadline of 1.5 s
                await pinger.ping()  # raises if the broker closed the pinger
                await asyncio.sleep(0.3)

        pinging = asyncio.create_task(keep_pinging())
        will = await next_message(observer)
        elapsed_s = time.monotonic() - started
        assert (will.topic.value, will.payload) == (topics.beat("silent"), b"gone")
        assert elapsed_s >= 1.0, elapsed_s  # not before its keepalive ran out (a busy box only makes it later)
        await pinging  # the pinger stayed connected for 3 s
        await pinger.disconnect()
        await observer.publish(topics.beat("barrier"), b"")
        assert (await next_message(observer)).topic.value == topics.beat("barrier")  # no will from pinger
        silent.drop()


async def test_retained_message_is_not_sent_to_a_client_that_never_subscribed_to_it(
    anonymous_broker: EmbeddedBroker, topics: Topics
) -> None:
    status = topics.relay_status("relay-a")
    async with client(anonymous_broker) as watcher, client(anonymous_broker) as publisher:
        await watcher.subscribe(topics.all_relay_statuses)  # amqtt replays every held filter on connect
        await publisher.publish(status, b"online", qos=1, retain=True)
        assert (await next_message(watcher)).topic.value == status

        async with client(anonymous_broker) as newcomer:
            await newcomer.subscribe(topics.beat("newcomer"))
            await publisher.publish(topics.beat("newcomer"), b"", qos=1)
            first = await next_message(newcomer)
            assert first.topic.value == topics.beat("newcomer"), "a retained message leaked before it"

            await newcomer.subscribe(topics.all_relay_statuses)  # now it asked: it gets the retained one
            retained = await next_message(newcomer)
            assert (retained.topic.value, retained.payload, retained.retain) == (status, b"online", True)


async def test_shutdown_leaves_no_tasks_behind(topics: Topics) -> None:
    async with EmbeddedBroker(BrokerSettings(port=0, prefix=topics.prefix)) as broker:
        idle = await RawClient.connect(broker, "idle", 60, will=(topics.beat("idle"), b"gone"))
        busy = await RawClient.connect(broker, "busy", 60)
        await busy.ping()
        lurker_reader, lurker_writer = await asyncio.open_connection(broker.host, broker.port)  # no CONNECT
        await busy.ping()  # by now the broker has accepted the lurker's socket too
    assert await idle.closed_by_broker()
    assert await busy.closed_by_broker()
    async with asyncio.timeout(WAIT_S):
        assert await lurker_reader.read(1) == b""
    lurker_writer.close()
    assert {task for task in asyncio.all_tasks() if task is not asyncio.current_task()} == set()


async def test_port_in_use_raises_broker_port_in_use_naming_host_and_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(BrokerPortInUse, match=re.escape(f"127.0.0.1:{port}")) as caught:
            async with EmbeddedBroker(BrokerSettings(port=port)):
                pass
    assert isinstance(caught.value, OSError)


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("user", "password"),
    [("h1", "wrong"), ("stranger", "pw-h1"), (None, None)],
    ids=["wrong-password", "unknown-user", "no-credentials"],
)
async def test_bad_credentials_are_refused(both: Endpoint, user: str | None, password: str | None) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with client(both, user, identifier=user or "anyone", password=password or ""):
            pass
    async with client(both, "h1"):  # and the right password works
        pass


@pytest.mark.parametrize(
    ("identifier", "accepted"),
    [("h1", True), ("h1/agent", True), ("h1/a/b", True), ("h1-agent", False), ("h1-b", False), ("h1/", False),
     ("h2", False), ("h1x", False), ("relay-a", False), ("x-h1", False), ("h2/h1", False)],
)  # fmt: skip
async def test_client_id_must_be_the_username_or_username_slash_anything(
    auth_broker: EmbeddedBroker, identifier: str, accepted: bool
) -> None:
    if accepted:
        async with client(auth_broker, "h1", identifier=identifier):
            pass
    else:
        with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
            async with client(auth_broker, "h1", identifier=identifier):
                pass


async def test_leaf_publishing_another_hosts_beat_is_not_delivered(both: Endpoint) -> None:
    topics = both.topics
    async with client(both, "monitor") as monitor, client(both, "h1") as leaf:
        await monitor.subscribe(f"{topics.prefix}#", qos=1)
        await leaf.publish(topics.beat("h2"), b"spoofed", qos=1)
        await leaf.publish(topics.bundle("h1"), b"not a relay", qos=1)
        await leaf.publish(topics.beat("h1"), b"own", qos=1)
        message = await next_message(monitor)
    assert (message.topic.value, message.payload) == (topics.beat("h1"), b"own")


def _code(granted: int | ReasonCode) -> int:
    """A SUBACK code as a number (paho gives MQTT 3.1.1 codes as ReasonCode objects)."""
    return granted if isinstance(granted, int) else granted.value


async def test_relay_and_monitor_rights_over_the_wire(auth_broker: EmbeddedBroker, topics: Topics) -> None:
    async with client(auth_broker, "monitor") as monitor, client(auth_broker, "relay-a") as relay:
        granted = await relay.subscribe([(topics.all_beats, 1), (f"{topics.prefix}#", 1)])
        assert [_code(code) for code in granted] == [1, 0x80]
        assert [_code(code) for code in await monitor.subscribe(f"{topics.prefix}#", qos=1)] == [1]
        async with client(auth_broker, "h1") as leaf:
            assert [_code(code) for code in await leaf.subscribe(topics.all_beats)] == [0x80]
            await leaf.publish(topics.beat("h1"), b"beat", qos=1)
        assert (await next_message(relay)).topic.value == topics.beat("h1")
        assert (await next_message(monitor)).topic.value == topics.beat("h1")

        await relay.publish(topics.bundle("relay-b"), b"spoofed", qos=1)
        await monitor.publish(topics.bundle("relay-a"), b"monitor may not write", qos=1)
        await relay.publish(topics.bundle("relay-a"), b"bundle", qos=1)
        message = await next_message(monitor)
        assert (message.topic.value, message.payload) == (topics.bundle("relay-a"), b"bundle")


async def test_will_on_a_forbidden_topic_is_never_delivered(both: Endpoint) -> None:
    topics = both.topics
    async with client(both, "monitor") as monitor:
        await monitor.subscribe(f"{topics.prefix}#")
        forbidden = await RawClient.connect(
            both, "h1", will=(topics.beat("h2"), b"offline"), username="h1", password="pw-h1"
        )
        # amqtt (ours) refuses such a CONNECT; Mosquitto 2.0.11 accepts it and drops the will.
        assert forbidden.return_code == {"amqtt": 5, "mosquitto": 0}[both.kind]
        forbidden.drop()
        allowed = await RawClient.connect(
            both, "h1/agent", will=(topics.beat("h1"), b"offline"), username="h1", password="pw-h1"
        )
        assert allowed.return_code == 0
        allowed.drop()
        will = await next_message(monitor)
    assert (will.topic.value, will.payload) == (topics.beat("h1"), b"offline")


async def test_wrong_password_with_a_live_client_id_does_not_disturb_that_client(
    auth_broker: EmbeddedBroker, topics: Topics
) -> None:
    async with client(auth_broker, "monitor") as monitor:
        await monitor.subscribe(f"{topics.prefix}#")
        intruder = await RawClient.connect(auth_broker, "monitor", username="monitor", password="guess")
        assert intruder.return_code == 5
        assert await intruder.closed_by_broker()
        async with client(auth_broker, "h1") as leaf:
            await leaf.publish(topics.beat("h1"), b"still subscribed?", qos=1)
        assert (await next_message(monitor)).payload == b"still subscribed?"


async def test_reconnect_with_the_same_client_id_takes_over_without_firing_the_old_will(
    auth_broker: EmbeddedBroker, topics: Topics
) -> None:
    will = (topics.beat("h1"), b"offline")
    async with client(auth_broker, "monitor") as monitor:
        await monitor.subscribe(f"{topics.prefix}#")
        old = await RawClient.connect(auth_broker, "h1", will=will, username="h1", password="pw-h1")
        new = await RawClient.connect(auth_broker, "h1", will=will, username="h1", password="pw-h1")
        assert (old.return_code, new.return_code) == (0, 0)
        assert await old.closed_by_broker()
        await new.ping()
        async with client(auth_broker, "h2") as other:
            await other.publish(topics.beat("h2"), b"barrier", qos=1)
        assert (await next_message(monitor)).topic.value == topics.beat("h2")  # no "offline" for h1 first
        new.drop()
        assert (await next_message(monitor)).payload == b"offline"  # the live connection's will still works


async def test_a_user_cannot_squat_the_client_id_of_a_user_whose_name_extends_its_own(
    auth_broker: EmbeddedBroker, topics: Topics
) -> None:
    # "h1-b" fitted the old rule "h1-*": h1 could hold it in a persistent session for a day and
    # lock user h1-b out ("identifier rejected").
    with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
        async with client(auth_broker, "h1", identifier="h1-b", clean_session=False):
            pass
    async with client(auth_broker, "h1-b", clean_session=False) as owner:
        await owner.publish(topics.beat("h1-b"), b"", qos=1)


async def test_a_leaf_claiming_a_relays_client_id_cannot_kick_the_relay_off(both: Endpoint) -> None:
    """The embedded broker refuses the CONNECT; Mosquitto (use_username_as_clientid) lets the leaf in
    under its own name. Either way the relay stays connected and its will never fires."""
    topics = both.topics
    status = topics.relay_status("relay-a")
    will = aiomqtt.Will(status, b"offline", qos=1)
    async with client(both, "monitor") as monitor, client(both, "relay-a", will=will) as relay:
        await monitor.subscribe(f"{topics.prefix}#", qos=1)
        try:
            async with client(both, "h1", identifier="relay-a") as squatter:
                await squatter.publish(topics.beat("h1"), b"squatter", qos=1)
            squatted = True
        except aiomqtt.MqttCodeError as exc:
            refusal = str(exc)
            squatted = False
        if not squatted:
            assert "Not authorized" in refusal
        assert squatted is (both.kind == "mosquitto")
        await relay.publish(status, b"online", qos=1)  # raises if the relay was disconnected
        expected = [(topics.beat("h1"), b"squatter")] if squatted else []
        received = [await next_message(monitor) for _ in range(len(expected) + 1)]
    assert [(m.topic.value, m.payload) for m in received] == [*expected, (status, b"online")]  # no "offline"


async def test_password_checks_do_not_stall_the_event_loop(
    auth_broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every argon2 check of 20 concurrent logins runs in the broker's auth threads, never on the event
    loop's thread: that is what keeps the loop free, whatever the box's load. (How long the loop would
    stall otherwise is a speed, measured by `python -m bench auth`, not asserted here.)"""
    checked_on: list[str] = []
    real_verify = passwords.verify_password

    def verify_and_record(hashed: str, password: str) -> bool:
        checked_on.append(threading.current_thread().name)
        return real_verify(hashed, password)

    monkeypatch.setattr(amqtt_adapter, "verify_password", verify_and_record)
    loop_thread = threading.current_thread().name

    async def connect(index: int) -> None:
        async with client(auth_broker, "h1", identifier=f"h1/{index}"):
            pass

    await asyncio.gather(*(connect(index) for index in range(20)))
    assert checked_on  # at least the first login of each burst (RecentLogins spares repeats)
    assert loop_thread not in checked_on
    assert all(name.startswith("relaybeat-auth") for name in checked_on), set(checked_on)


async def test_a_returning_client_is_let_in_while_every_check_thread_is_busy(
    auth_broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h2 logged in before, so its next login needs no argon2 check (`RecentLogins`) and does not
    queue behind the slow checks that hold every auth thread (here: wrong passwords whose checks
    are held until the end)."""
    async with client(auth_broker, "h2"):
        pass
    release, started = threading.Event(), threading.Semaphore(0)
    real_verify = passwords.verify_password

    def held_verify(hashed: str, password: str) -> bool:
        if password.startswith("guess"):
            started.release()
            release.wait(30)
        return real_verify(hashed, password)

    monkeypatch.setattr(amqtt_adapter, "verify_password", held_verify)
    threads = amqtt_adapter._auth_threads()

    async def guess(index: int) -> None:
        with pytest.raises(aiomqtt.MqttCodeError):
            async with client(auth_broker, "h1", password=f"guess-{index}", identifier=f"h1/{index}"):
                pass

    guesses = [asyncio.create_task(guess(index)) for index in range(threads)]
    try:
        for _ in range(threads):  # every auth thread is held by a guess
            assert await asyncio.to_thread(started.acquire, True, 10)
        async with asyncio.timeout(WAIT_S), client(auth_broker, "h2") as again:
            await again.publish("no/matter", b"")
    finally:
        release.set()
        await asyncio.gather(*guesses)


async def _storm(port: int, source: str, attempts: int, concurrency: int, sent: Any, answered: Any, codes: Any) -> None:
    async def attacker() -> None:
        while True:
            with sent.get_lock():
                if sent.value >= attempts:
                    return
                sent.value += 1
                guess = sent.value
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            writer.write(connect_packet("h1", 60, None, "h1", f"guess-{guess}"))
            try:
                async with asyncio.timeout(60):
                    codes.put((await reader.readexactly(4))[3])
            except asyncio.IncompleteReadError:
                codes.put(None)
            with answered.get_lock():
                answered.value += 1
            writer.close()

    await asyncio.gather(*(attacker() for _ in range(concurrency)))


def _run_storm(*args: Any) -> None:
    asyncio.run(_storm(*args))


class LoginStorm:
    """`attempts` CONNECTs with wrong passwords from `source`, `concurrency` at a time, in a process of
    its own (an attacker does not share the measured client's interpreter). `codes()` collects the
    CONNACK return codes (None: the broker closed without one) once it has ended."""

    def __init__(self, port: int, source: str, attempts: int = 500, concurrency: int = 50) -> None:
        context = multiprocessing.get_context("spawn")
        self.attempts, self.concurrency = attempts, concurrency
        self._sent, self._answered, self._codes = context.Value("i", 0), context.Value("i", 0), context.Queue()
        args = (port, source, attempts, concurrency, self._sent, self._answered, self._codes)
        self._process = context.Process(target=_run_storm, args=args, name="login-storm", daemon=True)

    def start(self) -> None:
        self._process.start()

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    @property
    def answered(self) -> int:
        return int(self._answered.value)

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def codes(self) -> list[int | None]:
        return [self._codes.get(timeout=10) for _ in range(self.answered)]

    def join(self, timeout_s: float) -> None:
        self._process.join(timeout_s)


def _timed_login(port: int, user: str, password: str | None = None) -> tuple[int, float]:
    """(CONNACK return code, seconds from TCP connect to CONNACK) for a login from 127.0.0.1 (with the
    user's right password unless another is given)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.0.1", 0)) as sock:
        sock.sendall(connect_packet(user, 60, None, user, PASSWORDS[user] if password is None else password))
        connack = b""
        while len(connack) < 4 and (chunk := sock.recv(4 - len(connack))):
            connack += chunk
    return connack[3], time.monotonic() - started


def test_a_storm_of_failed_logins_from_one_address_does_not_delay_clients_from_another(
    tmp_path: Path, password_file: Path
) -> None:
    """500 wrong passwords from 127.0.0.2 against `relaybeat broker` while good clients log in from
    127.0.0.1: h2 again and again (it logged in before: `RecentLogins` lets it in without argon2 and
    without queueing for a check thread) and
    h3 once (its first login pays the argon2 check). Before the throttle, every guess cost an argon2
    check in a 2-thread pool and the good client queued behind them for seconds. The bounds (1 s)
    are about queueing, not speed; the figures are printed (the target is 100 ms)."""
    topo = Topology(tmp_path, "relaybeat/")
    port = pick_free("127.0.0.1")
    try:
        topo.broker("broker", port, shipped_amqtt_config(tmp_path, password_file, ("relay-a",), ("monitor",)))
        assert _timed_login(port, "h2")[0] == 0  # warm: the first login pays for imports and the pool
        assert _timed_login(port, "h2", "wrong")[0] == 5  # a remembered user with another password is checked
        storm = LoginStorm(port, "127.0.0.2")
        storm.start()
        wait_until(lambda: storm.sent >= storm.concurrency, 30, "the storm to be under way")
        first_code, first_login = _timed_login(port, "h3")
        assert first_code == 0, f"a first login was refused with return code {first_code}"
        during: list[float] = []
        while storm.is_alive():
            code, seconds = _timed_login(port, "h2")
            assert code == 0, f"the good client was refused with return code {code}"
            if storm.answered < storm.attempts:  # the storm was still on when this login ended
                during.append(seconds)
        storm.join(60)
        assert during, "the storm ended before one good login could be measured during it"
        worst, median = max(during), sorted(during)[len(during) // 2]
        print(f"good login during a 500-guess storm: worst {worst * 1000:.0f} ms, median {median * 1000:.0f} ms "
              f"over {len(during)} logins; a first login (argon2 check) {first_login * 1000:.0f} ms")  # fmt: skip
        assert worst < 1.0, f"a good login took {worst * 1000:.0f} ms during the storm (median {median * 1000:.0f} ms)"
        assert first_login < 1.0, f"a first login took {first_login * 1000:.0f} ms during the storm"

        codes = collections.Counter(storm.codes())
        assert sum(codes.values()) == storm.attempts, codes
        assert set(codes) <= {3, 5}, codes
        assert codes[3] >= 400, f"most guesses must be refused unchecked (CONNACK 3): {codes}"
        log = topo.services["broker"].log()
        assert "without checking them" in log, log[-2000:]
        assert "from 127.0.0.2" in log, log[-2000:]
        assert log.count("127.0.0.2") < 50, "refusals must be logged rate-limited"
    finally:
        topo.close()


def test_login_throttle_lets_a_source_fail_a_burst_then_refills_and_keeps_sources_apart() -> None:
    throttle = LoginThrottle(burst=3, per_second=0.5)
    for _ in range(5):  # successful logins cost nothing
        assert throttle.may_try("10.0.0.1", 100.0)
        throttle.take("10.0.0.1", 100.0)
        throttle.give_back("10.0.0.1", 100.0)
    for _ in range(3):  # failed ones cost a token each
        assert throttle.may_try("10.0.0.1", 100.0)
        throttle.take("10.0.0.1", 100.0)
    assert not throttle.may_try("10.0.0.1", 100.0)
    assert not throttle.may_try("10.0.0.1", 101.9)  # 0.95 of a token back
    assert throttle.may_try("10.0.0.2", 101.9)  # another source is not affected
    assert throttle.refused == 2
    assert throttle.may_try("10.0.0.1", 102.0)  # one token back after 2 s
    throttle.take("10.0.0.1", 102.0)
    assert not throttle.may_try("10.0.0.1", 102.0)
    throttle.take("10.0.0.9", 200.0)  # a minute on: recovered sources are forgotten
    assert set(throttle._records) == {"10.0.0.9"}


async def test_fair_gate_serves_sources_in_turn_and_lets_a_lone_source_use_every_slot() -> None:
    gate = FairGate(slots=2)
    order: list[str] = []
    done = {name: asyncio.Event() for name in ("a1", "a2", "a3", "a4", "gone", "b1")}

    async def hold(source: str, name: str) -> None:
        async with gate.turn(source):
            order.append(name)
            await done[name].wait()

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    tasks = {name: asyncio.create_task(hold(name[0], name)) for name in ("a1", "a2", "a3", "a4", "gone")}
    await settle()
    assert order == ["a1", "a2"]  # source a alone holds both slots
    tasks["b1"] = asyncio.create_task(hold("b", "b1"))  # arrives behind a3, a4 and "gone" (source g)
    tasks["gone"].cancel()
    await settle()
    done["a1"].set()
    await settle()
    assert order == ["a1", "a2", "a3"]  # the next turn is source a's ...
    done["a2"].set()
    await settle()
    assert order == ["a1", "a2", "a3", "b1"]  # ... then b's, not a4's (and the cancelled one is skipped)
    for event in done.values():
        event.set()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == ["a1", "a2", "a3", "b1", "a4"]
    assert gate._waiting == {}
    assert gate._free == 2


async def test_password_checks_give_a_failing_source_one_thread_and_keep_the_others_free() -> None:
    """Source a (failing) runs one check at a time even with a slot free, so b's check starts at
    once; a source that has not failed may use every slot."""
    throttle = LoginThrottle(burst=5, per_second=0.001)
    checks = PasswordChecks(throttle, slots=2)
    running: list[str] = []
    loop = asyncio.get_running_loop()
    names = ("a1", "a2", "a3", "b1", "c1", "c2")
    results: dict[str, asyncio.Future[bool]] = {name: loop.create_future() for name in names}

    def check(name: str) -> Callable[[], Awaitable[bool]]:
        async def run() -> bool:
            running.append(name)
            return await results[name]

        return run

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    tasks = {name: asyncio.create_task(checks.run(name[0], check(name))) for name in ("a1", "a2")}
    await settle()
    assert running == ["a1", "a2"]  # a has not failed yet: both slots
    results["a1"].set_result(False)  # now it has
    await settle()
    tasks["a3"] = asyncio.create_task(checks.run("a", check("a3")))
    await settle()
    assert running == ["a1", "a2"]  # a slot is free, but a holds one and has failed: a3 waits
    tasks["b1"] = asyncio.create_task(checks.run("b", check("b1")))
    await settle()
    assert running == ["a1", "a2", "b1"]  # the free slot is b's at once
    results["a2"].set_result(False)
    await settle()
    assert running == ["a1", "a2", "b1", "a3"]
    results["b1"].set_result(True)
    results["a3"].set_result(True)
    assert [await tasks[name] for name in ("a1", "a2", "b1", "a3")] == [False, False, True, True]
    for name in ("c1", "c2"):  # c never failed: both slots
        tasks[name] = asyncio.create_task(checks.run("c", check(name)))
    await settle()
    assert running[-2:] == ["c1", "c2"]
    for name in ("c1", "c2"):
        results[name].set_result(True)
    assert [await tasks[name] for name in ("c1", "c2")] == [True, True]
    for _ in range(3):  # a's budget: 5 tokens, 2 failed, 3 left ...
        assert await checks.run("a", lambda: asyncio.sleep(0, False)) is False
    assert await checks.run("a", check("never")) is None  # ... then refused without a check
    assert "never" not in running


# ------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_listener_serves_mqtts_only(tls_files: tuple[Path, Path], topics: Topics) -> None:
    cert, key = tls_files
    settings = BrokerSettings(port=0, tls_cert=cert, tls_key=key, prefix=topics.prefix)
    async with EmbeddedBroker(settings) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        secure = aiomqtt.Client(broker.host, broker.port, tls_context=context, timeout=WAIT_S)
        async with secure:
            await secure.subscribe(topics.all_beats)
            await secure.publish(topics.beat("h1"), b"over tls")
            assert (await next_message(secure)).payload == b"over tls"
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(broker.host, broker.port, timeout=1):  # plain MQTT on the TLS port
                pass
    swapped = BrokerSettings(port=0, tls_cert=key, tls_key=cert)
    with pytest.raises(BrokerConfigError, match="tls_cert"):
        async with EmbeddedBroker(swapped):
            pass


# ---------------------------------------------------------------------------- settings, passwords


def test_shipped_amqtt_toml_loads_and_bad_keys_are_named(tmp_path: Path) -> None:
    settings = load_broker_settings(CONFIG_DIR / "amqtt.toml")
    assert settings.prefix == "relaybeat/"
    assert settings.port == 1883
    assert settings.password_file is None  # the shipped file is the anonymous loopback demo

    path = tmp_path / "broker.toml"
    path.write_text('[broker]\nport = 1884\npassword_file = "passwd"\nrelays = ["r1"]\n')
    loaded = load_broker_settings(path)
    assert (loaded.port, loaded.password_file, loaded.relays) == (1884, tmp_path / "passwd", ("r1",))

    for body, key in [
        ("[broker]\nprot = 1\n", "broker.prot"),
        ('[broker]\nport = "1883"\n', "broker.port"),
        ("[broker]\nport = 70000\n", "broker.port"),
        ('[broker]\nrelays = ["a/b"]\n', "broker.relays"),
        ('[broker]\nprefix = "no-slash"\n', "broker.prefix"),
        ('[broker]\ntls_cert = "c.pem"\n', "broker.tls_cert"),
        ("[other]\n", "other"),
    ]:
        path.write_text(body)
        with pytest.raises(BrokerConfigError, match=re.escape(key)):
            load_broker_settings(path)


async def test_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match="cannot read password file"):
        async with EmbeddedBroker(BrokerSettings(port=0, password_file=tmp_path / "nope")):
            pass


def test_add_user_writes_cheap_argon2_hashes_and_replaces_existing_users(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    add_user(path, "h1", "first")
    add_user(path, "h2", "other")
    add_user(path, "h1", "second")
    users = read_password_file(path)
    assert sorted(users) == ["h1", "h2"]
    assert users["h1"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert argon2.PasswordHasher().verify(users["h1"], "second")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert hash_password("x") != hash_password("x")  # salted
    with pytest.raises(BrokerConfigError):
        add_user(path, "bad/name", "pw")
    path.write_text("h1:$6$sha512crypt$x\n")
    with pytest.raises(BrokerConfigError, match=r"passwd:1"):
        read_password_file(path)


def test_recent_logins_let_a_repeated_password_in_only_against_the_same_hash() -> None:
    recent = RecentLogins()
    hashed = hash_password("pw-1")
    assert not recent.known("web-1", hashed, "pw-1")  # never seen: the full check runs
    recent.remember("web-1", hashed, "pw-1")
    assert recent.known("web-1", hashed, "pw-1")
    assert not recent.known("web-1", hashed, "pw-2")  # another password: checked in full
    assert not recent.known("web-2", hashed, "pw-1")  # another user with the same password
    assert not recent.known("web-1", hash_password("pw-1"), "pw-1")  # the password file changed
