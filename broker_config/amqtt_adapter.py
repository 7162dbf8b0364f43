"""amqtt 0.12.1 with its known bugs closed: the only module that imports amqtt.

Rules of this module:
- Every use of amqtt beyond its documented API (a private method overridden or called, a private
  attribute read or written, a plugin hook amqtt calls by name) is listed in `AMQTT_PRIVATE_API`
  below, and tests/test_amqtt_adapter.py checks each one against the installed amqtt, so an upgrade
  fails there with a message naming what changed, not somewhere in the broker's behaviour.
- amqtt is pinned to exactly 0.12.1 (`check_amqtt_version`): `EmbeddedBroker` refuses any other.
- What to enforce is decided elsewhere, without amqtt: the topic policy and the client-id rule in
  broker_config/policy.py, passwords in broker_config/passwords.py, failed-login throttling in
  broker_config/throttle.py. This module only plugs them into amqtt.

What is fixed, by the numbering of LIBRARIES.md §2.5:
1. keepalive is never enforced        -> `KeepaliveEnforcer` closes connections silent for
                                         grace x keepalive, so their Last Will fires.
2. retained messages leak on connect  -> `RelaybeatBroker` sends retained messages only for
                                         filters the receiving session holds.
3. CONNECT deletes the old session before authenticating (a wrong password wipes the monitor's
   subscriptions)                     -> `RelaybeatBroker` authenticates first.
4. no session takeover                -> a second connection with the same client id (same user)
                                         closes the first one, without its will: the client is alive.
5. wills bypass the publish ACL       -> a CONNECT whose will the user may not publish is refused.
6. argon2 blocks the event loop, and  -> `ThreadedFileAuth` verifies in its own small thread pool;
   a storm of bad logins makes every     `LoginThrottle` refuses a source with too many failed logins
   client queue behind it                at accept, before amqtt reads anything; `PasswordChecks`
                                         serves the checks to sources in turn, a failing source one
                                         at a time; a returning client (`RecentLogins`) never queues.
Also fixed: anonymous persistent sessions were dropped on disconnect, with nothing queued for them
(AnonymousAuthPlugin marks sessions `is_anonymous`, which amqtt takes as "keep nothing"); the
anonymous broker uses `AnyoneAllowed` instead.
Not fixed: QoS upgrade on delivery, no packet size limit, no MQTT 5 (use Mosquitto for those).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import importlib.metadata
import logging
import os
import secrets
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, NoReturn

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginInitError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from relaybeat.broker_config.passwords import RecentLogins, hash_password, read_password_file, verify_password
from relaybeat.broker_config.policy import TopicPolicy, client_id_allowed, topic_policy
from relaybeat.broker_config.settings import BrokerConfigError, BrokerPortInUse, BrokerSettings, host_port
from relaybeat.broker_config.throttle import LoginThrottle, PasswordChecks
from relaybeat.errors import Unavailable

AMQTT_VERSION: Final = "0.12.1"

# ------------------------------------------------------------------------- what amqtt must still have


class Use(StrEnum):
    OVERRIDE = "override"  # a method `RelaybeatBroker` or a plugin replaces: amqtt calls it by position
    CALL = "call"  # a method called here, with these parameters
    ATTRIBUTE = "attribute"  # read or written on live objects (instances, so not on the class)
    EVENT = "event"  # a plugin hook `on_<name>`: amqtt fires the event with these keyword arguments


@dataclass(frozen=True, slots=True)
class PrivateUse:
    """One thing of amqtt's, outside its documented API, that this module relies on."""

    owner: str  # the class (dotted path) it lives on; for EVENT, the events enum
    name: str
    use: Use
    parameters: tuple[str, ...] = ()  # OVERRIDE/CALL: amqtt's parameter names after self; EVENT: keywords


_BROKER: Final = "amqtt.broker.Broker"
_SESSION: Final = "amqtt.session.Session"
_HANDLER: Final = "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler"
_SESSION_FIELDS: Final = (
    "attributes", "transitions", "client_id", "clean_session", "parent", "keep_alive", "username", "password",
    "will_flag", "will_topic", "will_message", "will_qos", "will_retain",
)  # fmt: skip

AMQTT_PRIVATE_API: Final[tuple[PrivateUse, ...]] = (
    # the connect path, retained delivery and shutdown (RelaybeatBroker)
    PrivateUse(_BROKER, "stream_connected", Use.OVERRIDE, ("reader", "writer", "listener_name")),
    PrivateUse(_BROKER, "shutdown", Use.OVERRIDE),
    PrivateUse(
        _BROKER, "_initialize_client_session", Use.OVERRIDE, ("reader", "writer", "remote_address", "remote_port")
    ),
    PrivateUse(_BROKER, "_authenticate", Use.OVERRIDE, ("session", "_")),
    PrivateUse(_BROKER, "_publish_retained_messages_for_subscription", Use.OVERRIDE, ("subscription", "session")),
    PrivateUse(_BROKER, "_delete_session", Use.CALL, ("client_id",)),
    PrivateUse(_BROKER, "_topic_filtering", Use.CALL, ("session", "topic", "action")),
    PrivateUse(_BROKER, "_get_handler", Use.CALL, ("session",)),
    PrivateUse(_BROKER, "_matches", Use.CALL, ("topic", "a_filter")),
    PrivateUse(_BROKER, "_sessions", Use.ATTRIBUTE),  # client id -> (Session, BrokerProtocolHandler)
    PrivateUse(_BROKER, "_subscriptions", Use.ATTRIBUTE),  # filter -> [(Session, qos)]
    PrivateUse(_BROKER, "_retained_messages", Use.ATTRIBUTE),  # topic -> RetainedApplicationMessage
    PrivateUse(_BROKER, "_servers", Use.ATTRIBUTE),  # listener name -> Server, whose `instance` has the sockets
    PrivateUse(_BROKER, "config", Use.ATTRIBUTE),  # .get("timeout-disconnect-delay")
    PrivateUse(_BROKER, "plugins_manager", Use.ATTRIBUTE),
    PrivateUse("amqtt.plugins.manager.PluginManager", "map_plugin_auth", Use.CALL, ("session",)),
    PrivateUse("amqtt.plugins.manager.PluginManager", "close", Use.CALL),
    PrivateUse("amqtt.broker.Server", "instance", Use.ATTRIBUTE),  # the asyncio.Server
    PrivateUse("amqtt.broker.RetainedApplicationMessage", "data", Use.ATTRIBUTE),
    PrivateUse("amqtt.broker.RetainedApplicationMessage", "qos", Use.ATTRIBUTE),
    PrivateUse("amqtt.broker.BrokerContext", "_broker_instance", Use.ATTRIBUTE),  # a plugin's way to the broker
    # reading a CONNECT, answering it, ending a connection
    PrivateUse(_HANDLER, "init_from_connect", Use.CALL, ("reader", "writer", "plugins_manager")),
    PrivateUse(_HANDLER, "handle_connection_closed", Use.CALL),
    PrivateUse(_HANDLER, "mqtt_publish", Use.CALL, ("topic", "data", "qos", "retain")),
    PrivateUse(_HANDLER, "writer", Use.ATTRIBUTE),
    PrivateUse("amqtt.adapters.StreamWriterAdapter", "_writer", Use.ATTRIBUTE),  # the asyncio.StreamWriter
    PrivateUse("amqtt.mqtt.connack.ConnackPacket", "build", Use.CALL, ("session_parent", "return_code")),
    PrivateUse("amqtt.mqtt.connack.ConnackPacket", "to_stream", Use.CALL, ("writer",)),
    # the session of a connection: read, and its will, keepalive and credentials copied on resume
    *(PrivateUse(_SESSION, name, Use.ATTRIBUTE) for name in _SESSION_FIELDS),
    # plugin hooks (KeepaliveEnforcer)
    PrivateUse("amqtt.events.BrokerEvents", "broker_post_start", Use.EVENT),
    PrivateUse("amqtt.events.BrokerEvents", "broker_pre_shutdown", Use.EVENT),
    PrivateUse("amqtt.events.BrokerEvents", "broker_client_connected", Use.EVENT, ("client_id", "client_session")),
    PrivateUse("amqtt.events.BrokerEvents", "broker_client_disconnected", Use.EVENT, ("client_id", "client_session")),
    PrivateUse("amqtt.events.MQTTEvents", "mqtt_packet_received", Use.EVENT, ("packet", "session")),
)

# ------------------------------------------------------------------------------------------ limits

CONNECT_TIMEOUT_S: Final = 10.0  # a socket that sends no CONNECT in time is closed
TAKEOVER_TIMEOUT_S: Final = 2.0
AUTH_THREADS_MAX: Final = 4  # argon2 checks run in min(this, CPU count) threads

log = logging.getLogger(__name__)

# Keys in amqtt's `Session.attributes`, its slot for extensions.
_ADMITTED: Final = "relaybeat.admitted"
_LAST_PACKET: Final = "relaybeat.last_packet_monotonic"
_CONNECTION_TASK: Final = "relaybeat.connection_task"
_CHECK_IN_TURN: Final = "relaybeat.check_in_turn"  # runs a slow password check in the source's turn
_THROTTLED_IN_TURN: Final = "relaybeat.throttled_in_turn"  # the source ran out while this login waited

_THROTTLED: Final = "throttled: too many failed logins from this address"  # LoginThrottle logs these itself
_MAX_THROTTLED_CONNECT_BYTES: Final = 65_536  # a bigger "CONNECT" from a throttled source is just dropped
_CONNACK_SERVER_UNAVAILABLE: Final = bytes([0x20, 0x02, 0x00, SERVER_UNAVAILABLE])


# ---------------------------------------------------------------------------------------- plugins
# amqtt loads plugins by dotted path and hands each its `Config` dataclass (checked strictly).
# amqtt ships no type information, so its classes are `Any` to mypy.


class KeepaliveEnforcer(BasePlugin):  # type: ignore[misc]
    """Close connections silent for more than `grace` x keepalive, so the broker publishes their will.

    amqtt 0.12.1 reads with a timeout but ignores it (`handle_read_timeout` is `pass`). Sessions are
    tracked by object, not client id, so a connection replaced under the same id is still watched.
    """

    @dataclass
    class Config:
        grace: float = 1.5
        check_interval_s: float = 0.25

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._watched: dict[int, tuple[Any, Any]] = {}  # id(session) -> (session, handler)
        self._task: asyncio.Task[None] | None = None

    async def on_broker_post_start(self) -> None:
        self._task = asyncio.create_task(self._reap_forever(), name="relaybeat-keepalive-enforcer")

    async def on_broker_pre_shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._watched.clear()

    async def on_broker_client_connected(self, *, client_id: str, client_session: Any) -> None:
        entry = self.context._broker_instance.sessions.get(client_id)
        if entry is not None and entry[0] is client_session and entry[1] is not None:
            client_session.attributes[_LAST_PACKET] = time.monotonic()
            self._watched[id(client_session)] = (client_session, entry[1])

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Any) -> None:
        self._watched.pop(id(client_session), None)

    async def on_mqtt_packet_received(self, *, packet: Any, session: Any = None) -> None:
        if session is not None:
            session.attributes[_LAST_PACKET] = time.monotonic()

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval_s)
            self.reap(time.monotonic())

    def reap(self, now: float) -> int:
        """Close every watched connection past its deadline; return how many."""
        closed = 0
        for key, (session, handler) in list(self._watched.items()):
            if session.transitions.state != "connected" or handler.writer is None:
                del self._watched[key]
                continue
            keepalive_s = session.keep_alive  # amqtt already added timeout_disconnect_delay
            if keepalive_s <= 0:
                continue
            silent_s = now - session.attributes.get(_LAST_PACKET, now)
            if silent_s > self.config.grace * keepalive_s:
                del self._watched[key]
                log.info("closing %s: silent for %.1f s with keepalive %d s", session.client_id, silent_s, keepalive_s)
                _abort(handler.writer)
                closed += 1
        return closed


def _abort(writer: Any) -> None:
    """Drop the TCP connection now. (amqtt's `close()` drains first, which never ends if the peer
    stopped reading.) The reader then sees EOF and the broker handles an abnormal disconnect."""
    stream = getattr(writer, "_writer", None)  # amqtt's StreamWriterAdapter wraps a StreamWriter
    if isinstance(stream, asyncio.StreamWriter):
        stream.transport.abort()
    else:  # not reached with tcp listeners; keep some effect for other adapters
        asyncio.get_running_loop().create_task(writer.close())


class ThreadedFileAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Password file auth with argon2 verification off the event loop, in a small dedicated pool
    (so a reconnect storm neither stalls the loop nor starves the default executor)."""

    @dataclass
    class Config:
        password_file: str = ""
        max_threads: int = AUTH_THREADS_MAX

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._hashes = read_password_file(Path(self.config.password_file))
        self._decoy = hash_password(secrets.token_hex(16))  # unknown users cost the same as known ones
        self._recent = RecentLogins()
        self._executor: ThreadPoolExecutor | None = None

    async def authenticate(self, *, session: Any) -> bool:
        username = session.username
        if not username:
            return False
        stored = self._hashes.get(username)
        password = str(session.password or "")
        if stored is not None and self._recent.known(username, stored, password):
            return True
        if self._executor is None:
            workers = _auth_threads(self.config.max_threads)
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="relaybeat-auth")
        executor, hashed = self._executor, stored or self._decoy

        async def check() -> bool:
            return await asyncio.get_running_loop().run_in_executor(executor, verify_password, hashed, password)

        in_turn = session.attributes.get(_CHECK_IN_TURN)  # set by RelaybeatBroker when it throttles
        ok = await check() if in_turn is None else await in_turn(check)
        if ok is None:
            session.attributes[_THROTTLED_IN_TURN] = True
            return False
        if ok and stored is not None:
            self._recent.remember(username, stored, password)
            return True
        return False

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class ClientIdMatchesUsername(BaseAuthPlugin):  # type: ignore[misc]
    """The client id must be the username or `username/<anything>` (`client_id_allowed`)."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Any) -> bool:
        return client_id_allowed(session.username, session.client_id or "")


class AnyoneAllowed(BaseAuthPlugin):  # type: ignore[misc]
    """Lets every client in (the anonymous broker). Unlike amqtt's AnonymousAuthPlugin it does not
    mark sessions `is_anonymous`, which amqtt 0.12.1 takes as "discard this session on disconnect
    and queue nothing for it": persistent sessions (clean_session=false) keep their subscriptions
    and their QoS 1/2 messages while the client is away, as on Mosquitto."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Any) -> bool:
        return True


class TopicACL(BaseTopicPlugin):  # type: ignore[misc]
    """Applies a `TopicPolicy` (given as plain lists, since amqtt builds `Config` from a dict)."""

    @dataclass
    class Config:
        publish: dict[str, list[str]] = field(default_factory=dict)
        subscribe: dict[str, list[str]] = field(default_factory=dict)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.policy = TopicPolicy(
            publish={user: tuple(patterns) for user, patterns in self.config.publish.items()},
            subscribe={user: tuple(patterns) for user, patterns in self.config.subscribe.items()},
        )

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool:
        if session is None or topic is None:
            return False
        username = session.username
        if action == Action.PUBLISH:
            return self.policy.may_publish(username, topic)
        if action == Action.SUBSCRIBE:
            return self.policy.may_subscribe(username, topic)
        if action == Action.RECEIVE:
            return self.policy.may_receive(username, topic)
        return False


def _auth_threads(max_threads: int = AUTH_THREADS_MAX) -> int:
    return max(1, min(max_threads, os.cpu_count() or 1))


class RelaybeatBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the connect path and retained delivery fixed (see the module docstring)."""

    def __init__(self, config: dict[str, Any], login_throttle: LoginThrottle | None = None) -> None:
        super().__init__(config)
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.login_throttle = login_throttle
        self._password_checks = None if login_throttle is None else PasswordChecks(login_throttle, _auth_threads())

    # --- connections: tracked, so that shutdown can end them all

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        task = asyncio.current_task()
        if task is None:  # amqtt always runs this in a connection's own task; without one, nothing to track
            await super().stream_connected(reader, writer, listener_name)
            return
        self._connections[task] = writer
        try:
            peer = writer.get_extra_info("peername")
            source = str(peer[0]) if isinstance(peer, tuple) else ""
            if self.login_throttle is not None and not self.login_throttle.may_try(source, time.monotonic()):
                await _refuse_throttled(reader, writer)  # before amqtt builds a session: cheap
            else:
                await super().stream_connected(reader, writer, listener_name)
        finally:
            del self._connections[task]

    async def shutdown(self) -> None:
        await super().shutdown()
        # amqtt ends the connections it has sessions for; a socket still before its CONNECT is not
        # one of them. Drop whatever is left and wait for those tasks, so none outlives the broker.
        for writer in self._connections.values():
            writer.transport.abort()
        pending = set(self._connections)
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=1.0)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1.0)

    # --- CONNECT: authenticate first, then take over or resume the session (§2.5 points 3, 4, 5)

    async def _initialize_client_session(
        self, reader: Any, writer: Any, remote_address: str, remote_port: int
    ) -> tuple[Any, Any]:
        peer = f"{remote_address}:{remote_port}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                handler, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, NoDataError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            with contextlib.suppress(OSError):
                await writer.close()
            msg = f"{peer}: no valid CONNECT: {exc!r}"
            raise AMQTTError(msg) from exc
        except MQTTError:
            with contextlib.suppress(OSError):  # the peer may be gone already (§2.5 point 9)
                await writer.close()
            raise

        who = f"client {incoming.client_id!r} (user {incoming.username!r}) from {peer}"
        refusal = await self._admission_refusal(incoming, remote_address)
        if refusal is not None:
            return_code, reason = refusal
            await self._refuse(writer, return_code, f"{who}: {reason}")

        client_id = incoming.client_id
        existing = self._sessions.get(client_id) if client_id else None
        if existing is not None:
            old_session, old_handler = existing
            if old_session.username != incoming.username:
                await self._refuse(writer, IDENTIFIER_REJECTED, f"{who}: client id belongs to another user")
            if old_session.transitions.is_connected():
                await self._take_over(old_session, old_handler)

        if incoming.clean_session:
            if client_id:
                await self._delete_session(client_id)
            incoming.parent = 0
            session = incoming
        elif client_id in self._sessions:
            session = self._sessions[client_id][0]
            session.will_flag = incoming.will_flag
            session.will_message = incoming.will_message
            session.will_topic = incoming.will_topic
            session.will_qos = incoming.will_qos
            session.will_retain = incoming.will_retain
            session.keep_alive = incoming.keep_alive
            session.username = incoming.username
            session.password = incoming.password
            session.parent = 1
        else:
            incoming.parent = 0
            session = incoming

        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        session.attributes[_ADMITTED] = True
        session.attributes[_CONNECTION_TASK] = asyncio.current_task()
        return handler, session

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        # Called by amqtt after `_initialize_client_session`, which already admitted the session.
        return bool(session.attributes.pop(_ADMITTED, False))

    async def _admission_refusal(self, session: Any, source: str) -> tuple[int, str] | None:
        """Why this CONNECT may not proceed (CONNACK return code, reason), or None. A source with too
        many failed logins is refused before its password is checked (`LoginThrottle`): at accept
        (`stream_connected`), and again when it ran out while this CONNECT waited for its turn."""
        checks = self._password_checks
        if checks is not None:  # `ThreadedFileAuth` runs its slow check through this, in turn
            session.attributes[_CHECK_IN_TURN] = functools.partial(checks.run, source)
        refusal = await self._credentials_refusal(session)
        session.attributes.pop(_CHECK_IN_TURN, None)
        if session.attributes.pop(_THROTTLED_IN_TURN, False):
            return SERVER_UNAVAILABLE, _THROTTLED
        if refusal is None:
            refusal = await self._will_refusal(session)
        return None if refusal is None else (NOT_AUTHORIZED, refusal)

    async def _credentials_refusal(self, session: Any) -> str | None:
        """Every auth plugin must say True (None is abstaining)."""
        results = await self.plugins_manager.map_plugin_auth(session=session)
        votes = [result for result in results.values() if result is not None]
        if not votes or not all(votes):
            return "bad credentials or client id"
        return None

    async def _will_refusal(self, session: Any) -> str | None:
        """The will must be something the user may publish."""
        if session.will_flag:
            topic = session.will_topic or ""
            if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
                return f"invalid will topic {topic[:80]!r}"
            if not await self._topic_filtering(session, topic, Action.PUBLISH):
                return f"will topic {topic[:80]!r} is not one this user may publish"
        return None

    async def _refuse(self, writer: Any, return_code: int, reason: str) -> NoReturn:
        with contextlib.suppress(OSError):
            await ConnackPacket.build(0, return_code).to_stream(writer)
            await writer.close()
        msg = f"refused {reason}"
        raise MQTTError(msg)

    async def _take_over(self, old_session: Any, old_handler: Any) -> None:
        """Close the older connection of a reconnecting client, as MQTT 3.1.4-2 asks. Its will is
        dropped: the client has just proven it is alive."""
        log.info("client %r reconnected: closing its previous connection", old_session.client_id)
        old_session.will_flag = False
        old_task = old_session.attributes.get(_CONNECTION_TASK)
        if old_handler.writer is not None:
            _abort(old_handler.writer)  # not a polite close: the old peer may have stopped reading
        await old_handler.handle_connection_closed()
        if isinstance(old_task, asyncio.Task) and old_task is not asyncio.current_task():
            # amqtt ends that connection (handler stopped, CLIENT_DISCONNECTED fired) before this
            # one goes on, so plugins see the old disconnect before the new connect.
            await asyncio.wait({old_task}, timeout=TAKEOVER_TIMEOUT_S)

    # --- retained messages only for the session's own filters (§2.5 point 2)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        # amqtt calls this after a SUBSCRIBE (fine) and, on every connect, for *every* filter any
        # client holds (the leak). Serve only filters this very session is subscribed to.
        topic_filter = subscription[0]
        granted = next((qos for holder, qos in self._subscriptions.get(topic_filter, ()) if holder is session), None)
        handler = self._get_handler(session)
        if granted is None or handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic, Action.RECEIVE):
                continue
            qos = granted if retained.qos is None else min(granted, retained.qos)
            sends.append(asyncio.ensure_future(handler.mqtt_publish(topic, retained.data, qos, retain=True)))
        if sends:
            await asyncio.gather(*sends, return_exceptions=True)


async def _refuse_throttled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the CONNECT (closing with it unread could reset the connection before the client reads
    the answer), answer CONNACK 3 "server unavailable", close."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await reader.readexactly(1)  # the packet type: whatever it is, the answer is the same
            length = 0
            for shift in range(0, 28, 7):  # MQTT's remaining length: at most 4 bytes, 7 bits each
                byte = (await reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
            if length <= _MAX_THROTTLED_CONNECT_BYTES:
                await reader.readexactly(length)
                writer.write(_CONNACK_SERVER_UNAVAILABLE)
                await writer.drain()
    writer.close()


def _plugin_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def amqtt_config(settings: BrokerSettings) -> dict[str, Any]:
    """The amqtt configuration dict for these settings (`plugins` replaces all of amqtt's defaults)."""
    listener: dict[str, Any] = {"type": "tcp", "bind": host_port(settings.host, settings.port)}
    if settings.tls:
        listener |= {"ssl": True, "certfile": str(settings.tls_cert), "keyfile": str(settings.tls_key)}
    plugins: dict[str, Any] = {_plugin_path(KeepaliveEnforcer): {"grace": settings.keepalive_grace}}
    if settings.password_file is None:
        plugins[_plugin_path(AnyoneAllowed)] = {}
    else:
        policy = topic_policy(settings.prefix, settings.relays, settings.monitors)
        plugins[_plugin_path(ThreadedFileAuth)] = {"password_file": str(settings.password_file)}
        plugins[_plugin_path(ClientIdMatchesUsername)] = {}
        plugins[_plugin_path(TopicACL)] = {
            "publish": {user: list(patterns) for user, patterns in policy.publish.items()},
            "subscribe": {user: list(patterns) for user, patterns in policy.subscribe.items()},
        }
    return {
        "listeners": {"default": listener},
        "plugins": plugins,
        "session_expiry_interval": settings.session_expiry_s,
    }


def check_amqtt_version() -> None:
    found = importlib.metadata.version("amqtt")
    if found != AMQTT_VERSION:
        msg = f"broker_config.amqtt_adapter patches amqtt {AMQTT_VERSION} internals, but amqtt {found} is installed"
        raise Unavailable(msg)


class _HideThrottledRefusals(logging.Filter):
    """amqtt logs every refused CONNECT at WARNING; `LoginThrottle` logs its refusals rate-limited."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _THROTTLED not in record.getMessage()


_HIDE_THROTTLED_REFUSALS: Final = _HideThrottledRefusals()


def quiet_amqtt_logs() -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless someone configured it."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    logging.getLogger("amqtt.broker").addFilter(_HIDE_THROTTLED_REFUSALS)  # once: addFilter skips duplicates


def _address_in_use(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def start_amqtt(settings: BrokerSettings) -> RelaybeatBroker:
    """amqtt configured for `settings`, started and listening. Its start-up errors come out as
    relaybeat's (`BrokerConfigError`, `BrokerPortInUse`, `Unavailable`), so
    callers never import amqtt."""
    try:
        throttle = None if settings.anonymous else LoginThrottle()
        broker = RelaybeatBroker(amqtt_config(settings), throttle)  # loads plugins: reads the password file
    except PluginInitError as exc:
        if isinstance(exc.__cause__, BrokerConfigError):
            raise exc.__cause__ from None
        raise
    try:
        await broker.start()
    except BrokerError as exc:
        await broker.plugins_manager.close()
        cause = exc.__cause__
        if _address_in_use(exc):
            raise BrokerPortInUse(settings.host, settings.port) from None
        if isinstance(cause, ssl.SSLError):
            msg = "tls_cert"
            raise BrokerConfigError(msg, f"cannot use the TLS certificate and key: {cause}") from None
        where = host_port(settings.host, settings.port)
        if isinstance(cause, OSError):
            raise Unavailable(cause.errno, f"cannot listen on {where}: {cause.strerror}") from None
        msg = f"the broker on {where} did not start: {exc}"
        raise Unavailable(msg) from exc
    return broker


def listening_port(broker: RelaybeatBroker, configured: int) -> int:
    """The port the started broker listens on (`configured` unless that was 0)."""
    sockets = broker._servers["default"].instance.sockets
    return int(sockets[0].getsockname()[1]) if sockets else configured
