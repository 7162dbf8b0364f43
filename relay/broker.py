"""The embedded MQTT broker: amqtt 0.12.1 with its known bugs closed. The only module that imports amqtt.

Rules of this module:
- amqtt is pinned to exactly 0.12.1: the fixes below override private methods of `amqtt.broker.Broker`
  and read private attributes, so `EmbeddedBroker` refuses to start on any other version.
- Who may publish and subscribe where is one pure table (`topic_policy`), mosquitto-style: patterns
  for everyone (`*`) and per user, with `%u` for the username. `broker_config/acl` says the same
  thing to Mosquitto, and a test checks that they agree.
- Without a password file the broker is anonymous and applies no topic policy (the loopback demo).
- With one, a client id belongs to one user: the username itself or `username/<anything>`
  (`client_id_allowed`; Mosquitto's `use_username_as_clientid` is the stricter half of that rule).

What is fixed, by the numbering of LIBRARIES.md §2.5:
1. keepalive is never enforced        -> `KeepaliveEnforcer` closes connections silent for
                                         grace x keepalive, so their Last Will fires.
2. retained messages leak on connect  -> `_RelaybeatBroker` sends retained messages only for
                                         filters the receiving session holds.
3. CONNECT deletes the old session before authenticating (a wrong password wipes the monitor's
   subscriptions)                     -> `_RelaybeatBroker` authenticates first.
4. no session takeover                -> a second connection with the same client id (same user)
                                         closes the first one, without its will: the client is alive.
5. wills bypass the publish ACL       -> a CONNECT whose will the user may not publish is refused.
6. argon2 blocks the event loop, and  -> `ThreadedFileAuth` verifies in its own small thread pool;
   a storm of bad logins makes every     `LoginThrottle` refuses a source with too many failed logins
   client queue behind it                before checking; `FairGate` serves sources in turn.
Also fixed: anonymous persistent sessions were dropped on disconnect, with nothing queued for them
(AnonymousAuthPlugin marks sessions `is_anonymous`, which amqtt takes as "keep nothing"); the
anonymous broker uses `AnyoneAllowed` instead.
Not fixed: QoS upgrade on delivery, no packet size limit, no MQTT 5 (use Mosquitto for those).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import getpass
import importlib.metadata
import logging
import os
import secrets
import ssl
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn

import argon2
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError, PluginInitError
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, SERVER_UNAVAILABLE, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin

from relay.ports import PortInUse, ensure_free
from relay.wire import Topics, is_valid_id

AMQTT_VERSION: Final = "0.12.1"
DEFAULT_PORT: Final = 1883
CONNECT_TIMEOUT_S: Final = 10.0  # a socket that sends no CONNECT in time is closed
TAKEOVER_TIMEOUT_S: Final = 2.0
AUTH_THREADS_MAX: Final = 4  # argon2 checks run in min(this, CPU count) threads

log = logging.getLogger(__name__)

# Keys in amqtt's `Session.attributes`, its slot for extensions.
_ADMITTED: Final = "relaybeat.admitted"
_LAST_PACKET: Final = "relaybeat.last_packet_monotonic"
_CONNECTION_TASK: Final = "relaybeat.connection_task"

_THROTTLED: Final = "throttled: too many failed logins from this address"  # LoginThrottle logs these itself
_MAX_THROTTLED_CONNECT_BYTES: Final = 65_536  # a bigger "CONNECT" from a throttled source is just dropped
_CONNACK_SERVER_UNAVAILABLE: Final = bytes([0x20, 0x02, 0x00, SERVER_UNAVAILABLE])


class BrokerConfigError(ValueError):
    """A bad broker setting or password file. The message names the key (or file line)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


class BrokerPortInUse(PortInUse):
    """Another process already listens on the broker's host:port."""


# ---------------------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything the embedded broker needs. Relative paths are the caller's business."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port; `EmbeddedBroker.port` tells which
    password_file: Path | None = None  # None: anonymous, no topic policy
    relays: tuple[str, ...] = ()  # usernames with the relay role
    monitors: tuple[str, ...] = ()  # usernames with the monitor role
    prefix: str = Topics().prefix
    tls_cert: Path | None = None  # both set: the listener speaks TLS only (mqtts)
    tls_key: Path | None = None
    keepalive_grace: float = 1.5  # close a connection silent for grace x its keepalive
    session_expiry_s: int = 86_400  # forget disconnected persistent sessions after this

    def __post_init__(self) -> None:
        if not self.host:
            raise BrokerConfigError("host", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise BrokerConfigError("port", f"{self.port} is not in [0, 65535]")
        try:
            Topics(self.prefix)
        except ValueError as exc:
            raise BrokerConfigError("prefix", str(exc)) from None
        for key, names in (("relays", self.relays), ("monitors", self.monitors)):
            bad = [name for name in names if not is_valid_id(name)]
            if bad:
                raise BrokerConfigError(key, f"{bad[0]!r} is not a valid username ([A-Za-z0-9._-]{{1,128}})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise BrokerConfigError("tls_cert", "tls_cert and tls_key go together")
        if not self.keepalive_grace >= 1.0:
            raise BrokerConfigError("keepalive_grace", f"{self.keepalive_grace} is below 1.0")
        if self.session_expiry_s < 1:
            raise BrokerConfigError("session_expiry_s", f"{self.session_expiry_s} is below 1")

    @property
    def anonymous(self) -> bool:
        return self.password_file is None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


_PATH_KEYS: Final = ("password_file", "tls_cert", "tls_key")
_NAME_LIST_KEYS: Final = ("relays", "monitors")


def load_broker_settings(path: Path) -> BrokerSettings:
    """Read the `[broker]` table of a TOML file (see broker_config/amqtt.toml).

    Relative paths in it are relative to the file's directory. Unknown keys and wrong types raise
    `BrokerConfigError` naming the key.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise BrokerConfigError(str(path), f"not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"broker"})
    if extra:
        raise BrokerConfigError(f"{path}: {extra[0]}", "unknown table or key; expected only [broker]")
    table = document.get("broker", {})
    if not isinstance(table, dict):
        raise BrokerConfigError(f"{path}: broker", "must be a table")
    known = {f.name for f in fields(BrokerSettings)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = f"{path}: broker.{key}"
        if key not in known:
            raise BrokerConfigError(name, f"unknown key; known keys are {', '.join(sorted(known))}")
        if key in _PATH_KEYS:
            if not isinstance(raw, str) or not raw:
                raise BrokerConfigError(name, "must be a non-empty string (a path)")
            values[key] = path.parent / Path(raw).expanduser()
        elif key in _NAME_LIST_KEYS:
            if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
                raise BrokerConfigError(name, "must be a list of usernames")
            values[key] = tuple(raw)
        elif key in ("port", "session_expiry_s"):
            if type(raw) is not int:
                raise BrokerConfigError(name, "must be an integer")
            values[key] = raw
        elif key == "keepalive_grace":
            if type(raw) not in (int, float):
                raise BrokerConfigError(name, "must be a number")
            values[key] = float(raw)
        else:
            if not isinstance(raw, str):
                raise BrokerConfigError(name, "must be a string")
            values[key] = raw
    try:
        return BrokerSettings(**values)
    except BrokerConfigError as exc:
        raise BrokerConfigError(f"{path}: broker.{exc.key}", exc.detail) from None


# ------------------------------------------------------------------------------------ topic policy


def _levels_cover(pattern: Sequence[str], candidate: Sequence[str]) -> bool:
    """Whether every topic matched by `candidate` (a topic or a filter) is matched by `pattern`."""
    for index, level in enumerate(pattern):
        if level == "#":
            return True  # also covers the parent level itself, as MQTT's `a/#` matches `a`
        if index >= len(candidate) or candidate[index] == "#":
            return False
        if level != "+" and level != candidate[index]:
            return False
    return len(candidate) == len(pattern)


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """Mosquitto-style ACL. Patterns under `*` apply to every user; `%u` is replaced by the username.

    `publish` patterns are what a user may write; `subscribe` patterns are what a user may read: a
    subscription must lie inside one of them, and a delivered topic must match one of them.
    """

    publish: Mapping[str, tuple[str, ...]]
    subscribe: Mapping[str, tuple[str, ...]]

    def _patterns(self, table: Mapping[str, tuple[str, ...]], username: str | None) -> list[list[str]]:
        if not is_valid_id(username):  # %u must stay one plain level: no '/', '+' or '#'
            return []
        assert username is not None
        raw = (*table.get("*", ()), *table.get(username, ()))
        return [pattern.replace("%u", username).split("/") for pattern in raw]

    @staticmethod
    def _allowed(patterns: list[list[str]], topic: str) -> bool:
        levels = topic.split("/")
        if topic.startswith("$"):  # [MQTT-4.7.2-1]: wildcards never reach $-topics
            return any(pattern[0] == levels[0] and _levels_cover(pattern, levels) for pattern in patterns)
        return any(_levels_cover(pattern, levels) for pattern in patterns)

    def may_publish(self, username: str | None, topic: str) -> bool:
        if not topic or "+" in topic or "#" in topic:
            return False
        return self._allowed(self._patterns(self.publish, username), topic)

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        return bool(topic_filter) and self._allowed(self._patterns(self.subscribe, username), topic_filter)

    def may_receive(self, username: str | None, topic: str) -> bool:
        return self._allowed(self._patterns(self.subscribe, username), topic)


def topic_policy(prefix: str, relays: Sequence[str] = (), monitors: Sequence[str] = ()) -> TopicPolicy:
    """relaybeat's policy. Every user is a leaf and may publish its own beat (`pattern write
    <prefix>beat/%u`, as in Mosquitto, where pattern lines bind every user). Relays also read beats,
    bundles and relay statuses and write their own bundle and status. Monitors read `<prefix>#`."""
    topics = Topics(prefix)
    relay_publish = (topics.bundle("%u"), topics.relay_status("%u"))
    relay_subscribe = (topics.all_beats, topics.all_bundles, topics.all_relay_statuses)
    monitor_subscribe = (f"{prefix}#",)
    publish: dict[str, tuple[str, ...]] = {"*": (topics.beat("%u"),)}
    subscribe: dict[str, tuple[str, ...]] = {}
    for relay in relays:
        publish[relay] = (*publish.get(relay, ()), *relay_publish)
        subscribe[relay] = (*subscribe.get(relay, ()), *relay_subscribe)
    for monitor in monitors:
        subscribe[monitor] = (*subscribe.get(monitor, ()), *monitor_subscribe)
    return TopicPolicy(publish=publish, subscribe=subscribe)


# ------------------------------------------------------------------------------------- passwords

_HASHER: Final = argon2.PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)


def hash_password(password: str) -> str:
    """An argon2id hash with cheap parameters (m=19 MiB, t=2, p=1: about 20 ms to verify)."""
    return _HASHER.hash(password)


def read_password_file(path: Path) -> dict[str, str]:
    """`user:<argon2 hash>` lines; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerConfigError(str(path), f"cannot read password file: {exc.strerror}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        where = f"{path}:{number}"
        if not sep or not is_valid_id(username):
            raise BrokerConfigError(where, "expected 'username:<argon2 hash>' with username [A-Za-z0-9._-]+")
        if not hashed.startswith("$argon2"):
            raise BrokerConfigError(where, f"the hash for {username!r} is not argon2 (use hash_password)")
        if username in users:
            raise BrokerConfigError(where, f"user {username!r} appears twice")
        users[username] = hashed
    return users


def add_user(password_file: Path, username: str, password: str) -> None:
    """Add or replace `username` in `password_file` (created with mode 0600). Atomic."""
    if not is_valid_id(username):
        raise BrokerConfigError("username", f"{username!r} is not [A-Za-z0-9._-]{{1,128}}")
    if not password:
        raise BrokerConfigError("password", "must not be empty")
    lines = password_file.read_text(encoding="utf-8").splitlines() if password_file.exists() else []
    kept = [line for line in lines if line.strip().partition(":")[0] != username]
    kept.append(f"{username}:{hash_password(password)}")
    fd, tmp = tempfile.mkstemp(dir=password_file.parent, prefix=f".{password_file.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write("\n".join(kept) + "\n")
        os.replace(tmp, password_file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        self._executor: ThreadPoolExecutor | None = None

    async def authenticate(self, *, session: Any) -> bool:
        username = session.username
        if not username:
            return False
        stored = self._hashes.get(username)
        if self._executor is None:
            workers = _auth_threads(self.config.max_threads)
            self._executor = ThreadPoolExecutor(workers, thread_name_prefix="relaybeat-auth")
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, _verify, stored or self._decoy, str(session.password or ""))
        return ok and stored is not None

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _verify(hashed: str, password: str) -> bool:
    try:
        return _HASHER.verify(hashed, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


CLIENT_ID_SEPARATOR: Final = "/"  # cannot appear in a username ([A-Za-z0-9._-]), so the rule is unambiguous


def client_id_allowed(username: str | None, client_id: str) -> bool:
    """Whether `username` may use `client_id`: the username itself, or `username/<anything>`.

    A username cannot contain `/`, so every client id belongs to at most one user: `web` can never
    take `web-01` (user `web-01`'s), nor `web-01/agent`. (`username-*` was ambiguous: ids contain `-`.)
    """
    if not is_valid_id(username):
        return False
    assert username is not None
    if client_id == username:
        return True
    namespace = username + CLIENT_ID_SEPARATOR
    return client_id.startswith(namespace) and len(client_id) > len(namespace)


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


# --------------------------------------------------------------------------------- login throttle

FAILED_LOGIN_BURST: Final = 10  # failed logins a source may have at once ...
FAILED_LOGINS_PER_S: Final = 1.0  # ... and then this many per second
REFUSAL_LOG_INTERVAL_S: Final = 10.0  # one log line per source per interval while it is refused
_FORGET_INTERVAL_S: Final = 60.0


@dataclass(slots=True)
class _SourceRecord:
    tokens: float
    updated: float
    refused: int = 0  # refusals since the last log line
    logged: float | None = None


class LoginThrottle:
    """Failed logins per source address, as a token bucket: a source may fail `burst` times, then
    `per_second` times a second. While its bucket is empty, its CONNECTs are refused (CONNACK 3,
    "server unavailable": try later) before any password check, so a storm of bad logins costs no
    argon2 time. A check takes a token when it starts and gives it back if the login succeeds, so
    guesses waiting behind a check are refused too. (`FairGate` keeps the checks that do run from
    making other sources wait.)

    Refusals are counted (`refused`) and logged at most once per source per REFUSAL_LOG_INTERVAL_S.
    Time comes in as `now` (monotonic seconds); nothing here reads a clock.
    """

    def __init__(self, burst: int = FAILED_LOGIN_BURST, per_second: float = FAILED_LOGINS_PER_S) -> None:
        if burst < 1 or per_second <= 0:
            raise ValueError("burst must be >= 1 and per_second > 0")
        self.burst = burst
        self.per_second = per_second
        self.refused = 0
        self._records: dict[str, _SourceRecord] = {}
        self._forgot_at: float | None = None

    def _tokens(self, record: _SourceRecord, now: float) -> float:
        return min(float(self.burst), record.tokens + max(0.0, now - record.updated) * self.per_second)

    def may_try(self, source: str, now: float) -> bool:
        """Whether a login from `source` may be checked now; a refusal is counted and maybe logged."""
        record = self._records.get(source)
        if record is None or self._tokens(record, now) >= 1.0:
            return True
        self.refused += 1
        record.refused += 1
        if record.logged is None or now - record.logged >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d login(s) from %s without checking them: more than %d failed logins "
                "(then %g/s); %d refused in all",
                record.refused, source, self.burst, self.per_second, self.refused,
            )  # fmt: skip
            record.refused, record.logged = 0, now
        return False

    def take(self, source: str, now: float) -> None:
        """A password check for `source` starts: it costs one token (`give_back` if it succeeds)."""
        record = self._records.get(source)
        if record is None:
            record = self._records[source] = _SourceRecord(float(self.burst), now)
        record.tokens, record.updated = self._tokens(record, now) - 1.0, now
        self._forget_recovered(now)

    def give_back(self, source: str, now: float) -> None:
        """The login from `source` succeeded: only failures cost."""
        record = self._records.get(source)
        if record is not None:
            record.tokens, record.updated = min(float(self.burst), self._tokens(record, now) + 1.0), now

    def _forget_recovered(self, now: float) -> None:
        """Drop sources whose bucket is full again, so the table does not grow without end."""
        if self._forgot_at is not None and now - self._forgot_at < _FORGET_INTERVAL_S:
            return
        self._forgot_at = now
        for source, record in list(self._records.items()):
            if self._tokens(record, now) >= self.burst:
                del self._records[source]


class FairGate:
    """At most `slots` holders at once (one per password-check thread). Waiters are served one source
    at a time, in turn: a source with 500 CONNECTs waiting delays a source with one by at most one
    turn, and a source alone may use every slot (many leaves behind one NAT address)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self._free = slots
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}  # in turn order

    @contextlib.asynccontextmanager
    async def turn(self, source: str) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(source, collections.deque()).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # cancelled just after its turn came
                    self._pass_on()
                raise
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        """A slot came free: to the first waiter of the next source in turn, which then goes last."""
        while self._waiting:
            source = next(iter(self._waiting))
            queue = self._waiting.pop(source)
            granted = queue.popleft()
            if queue:
                self._waiting[source] = queue
            if not granted.done():  # a cancelled waiter is skipped
                granted.set_result(None)
                return
        self._free += 1


def _auth_threads(max_threads: int = AUTH_THREADS_MAX) -> int:
    return max(1, min(max_threads, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------- broker


class _RelaybeatBroker(Broker):  # type: ignore[misc]
    """amqtt's Broker with the connect path and retained delivery fixed (see the module docstring)."""

    def __init__(self, config: dict[str, Any], login_throttle: LoginThrottle | None = None) -> None:
        super().__init__(config)
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.login_throttle = login_throttle
        self._check_turns = FairGate(_auth_threads())

    # --- connections: tracked, so that shutdown can end them all

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
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
            raise AMQTTError(f"{peer}: no valid CONNECT: {exc!r}") from exc
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
        many failed logins is refused before its password is checked (`LoginThrottle`), also when
        it ran out while this CONNECT waited for its turn."""
        throttle = self.login_throttle
        if throttle is None:
            refusal = await self._credentials_refusal(session)
        else:  # `stream_connected` checked the source at accept; check again once it is this one's turn
            async with self._check_turns.turn(source):
                if not throttle.may_try(source, time.monotonic()):  # it failed again while this one waited
                    return SERVER_UNAVAILABLE, _THROTTLED
                throttle.take(source, time.monotonic())
                refusal = await self._credentials_refusal(session)
            if refusal is None:
                throttle.give_back(source, time.monotonic())
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
        raise MQTTError(f"refused {reason}")

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


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _plugin_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def amqtt_config(settings: BrokerSettings) -> dict[str, Any]:
    """The amqtt configuration dict for these settings (`plugins` replaces all of amqtt's defaults)."""
    listener: dict[str, Any] = {"type": "tcp", "bind": _hostport(settings.host, settings.port)}
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


def _check_amqtt_version() -> None:
    found = importlib.metadata.version("amqtt")
    if found != AMQTT_VERSION:
        raise RuntimeError(f"relay.broker patches amqtt {AMQTT_VERSION} internals, but amqtt {found} is installed")


class _HideThrottledRefusals(logging.Filter):
    """amqtt logs every refused CONNECT at WARNING; `LoginThrottle` logs its refusals rate-limited."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _THROTTLED not in record.getMessage()


_HIDE_THROTTLED_REFUSALS: Final = _HideThrottledRefusals()


def _quiet_amqtt_logs() -> None:
    """amqtt logs every connection at INFO; keep it at WARNING unless someone configured it."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    logging.getLogger("amqtt.broker").addFilter(_HIDE_THROTTLED_REFUSALS)  # once: addFilter skips duplicates


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear error before amqtt logs a traceback for the same problem."""
    try:
        ensure_free(host, port)
    except PortInUse:
        raise BrokerPortInUse(host, port) from None


def _check_tls_files(settings: BrokerSettings) -> None:
    """Load the certificate and key once here, so a mistake is named before amqtt logs a traceback."""
    if settings.tls_cert is None or settings.tls_key is None:
        return
    for key, tls_file in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key)):
        if not tls_file.is_file():
            raise BrokerConfigError(key, f"{tls_file} is not a file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as exc:
        raise BrokerConfigError("tls_cert", f"cannot use the TLS certificate and key: {exc}") from None


def _address_in_use(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class EmbeddedBroker:
    """An amqtt broker running in the current event loop, for `async with`:

    async with EmbeddedBroker(BrokerSettings(port=0)) as broker:
        print(broker.url)  # mqtt://127.0.0.1:<the free port it got>
    """

    def __init__(self, settings: BrokerSettings | None = None) -> None:
        self.settings = settings or BrokerSettings()
        self._broker: _RelaybeatBroker | None = None
        self._port: int | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        if self._broker is not None:
            raise RuntimeError("this EmbeddedBroker is already running")
        _check_amqtt_version()
        _quiet_amqtt_logs()
        settings = self.settings
        if settings.anonymous and settings.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("broker on %s allows anonymous clients: set a password file", settings.host)
        _check_tls_files(settings)
        _check_port_free(settings.host, settings.port)
        try:
            throttle = None if settings.anonymous else LoginThrottle()
            broker = _RelaybeatBroker(amqtt_config(settings), throttle)  # loads plugins: reads the password file
        except PluginInitError as exc:
            if isinstance(exc.__cause__, BrokerConfigError):
                raise exc.__cause__ from None
            raise
        try:
            await broker.start()
        except BrokerError as exc:  # amqtt's, which callers cannot catch without importing amqtt
            await broker.plugins_manager.close()
            cause = exc.__cause__
            if _address_in_use(exc):
                raise BrokerPortInUse(settings.host, settings.port) from None
            if isinstance(cause, ssl.SSLError):
                raise BrokerConfigError("tls_cert", f"cannot use the TLS certificate and key: {cause}") from None
            where = _hostport(settings.host, settings.port)
            if isinstance(cause, OSError):
                raise OSError(cause.errno, f"cannot listen on {where}: {cause.strerror}") from None
            raise RuntimeError(f"the broker on {where} did not start: {exc}") from exc
        sockets = broker._servers["default"].instance.sockets
        self._port = int(sockets[0].getsockname()[1]) if sockets else settings.port
        self._broker = broker
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the broker has not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.settings.tls else "mqtt"
        return f"{scheme}://{_hostport(self.host, self.port)}"


async def serve_broker(settings: BrokerSettings, stop: asyncio.Event) -> None:
    """Run the embedded broker until `stop` is set (`relaybeat broker`)."""
    async with EmbeddedBroker(settings) as broker:
        mode = "anonymous" if settings.anonymous else f"password file {settings.password_file}"
        log.info("broker listening on %s (%s, topic prefix %r)", broker.url, mode, settings.prefix)
        await stop.wait()
    log.info("broker stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m relay.broker add-user PASSWORD_FILE USERNAME` (password from a prompt or stdin)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] != "add-user":
        print("usage: python -m relay.broker add-user PASSWORD_FILE USERNAME", file=sys.stderr)
        return 2
    _, file_name, username = args
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {username}: ")
        if password != getpass.getpass("again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        add_user(Path(file_name), username, password)
    except BrokerConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{username} written to {file_name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
