"""MQTT connection plumbing shared by the leaf agent, the relay and the monitor.

Broker URLs are `mqtt://[user:pass@]host[:port]` (plain, port 1883) or `mqtts://...` (TLS, port
8883). TLS options travel in the URL's query, so every command that takes a broker URL takes them:

    mqtts://web-01:secret@broker.example:8883?ca=/etc/relaybeat/ca.pem
    mqtts://web-01:secret@broker.example:8883?ca=ca.pem&cert=web-01.pem&key=web-01.key

- `ca`: trust only this CA (PEM file) for the broker's certificate; without it, the system's CAs.
- `cert`, `key`: a client certificate (PEM) and its unencrypted private key, for brokers that ask
  for one (`key` may be left out when the key is inside the `cert` file).
The broker's certificate is always verified, host name included; there is no switch to turn that off.
Files are checked (and the TLS settings built once) when the URL is parsed, so a wrong path stops
start-up with a message naming the option. Percent-encode `@ : / ? & %` in user names and passwords.

Passwords never reach a log: `BrokerURL.__str__` and every parse error redact them.

Every broker option takes a list too: URLs separated by commas (`Brokers`), the nodes of one
cluster, e.g. `mqtt://a:1883,mqtt://b:1883`. A client connects to the first that answers and, when
it loses that one, to the next (round the list), with the same client id, so a persistent session
that the cluster shares carries over.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import random
import ssl
import termios
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiomqtt

from relaybeat.errors import SettingsError, Unavailable
from relaybeat.relay.packets import (
    CONNACK_REFUSALS,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    SUBACK_FAILURE,
    ConnAck,
    Packet,
    PacketError,
    PacketReader,
    PingResp,
    Publish,
    SubAck,
    connect_packet,
    puback_packet,
    publish_packet,
    subscribe_packet,
)

log = logging.getLogger("relaybeat.mqtt")

LIST_CONNECT_TIMEOUT_S = 3.0  # connecting to one node of a broker list: then the next
TLS_OPTIONS = ("ca", "cert", "key")  # the query options a broker URL may carry (mqtts:// only)


class BrokerURLError(SettingsError):
    """A broker URL (or list of them) that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # ?ca=: trust this CA for mqtts:// (the system store otherwise)
    cert_file: str | None = None  # ?cert=: client certificate (PEM)
    key_file: str | None = None  # ?key=: its private key, if not inside cert_file

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Parse and check a broker URL; ValueError (password redacted) names what is wrong."""
        shown = _redact(url)
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            msg = f"broker URL {shown!r} must start with mqtt:// or mqtts://"
            raise BrokerURLError(msg)
        if not parts.hostname:
            msg = f"broker URL {shown!r} has no host"
            raise BrokerURLError(msg)
        if parts.path not in ("", "/") or parts.fragment:
            msg = f"broker URL {shown!r} has a path; expected mqtt[s]://[user:pass@]host:port[?options]"
            raise BrokerURLError(msg)
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            msg = f"broker URL {shown!r} has a bad port"
            raise BrokerURLError(msg) from None
        options: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in TLS_OPTIONS:
                msg = f"broker URL {shown!r}: unknown option {key!r}; known options are ca, cert, key"
                raise BrokerURLError(msg)
            if key in options:
                msg = f"broker URL {shown!r}: option {key!r} is given twice"
                raise BrokerURLError(msg)
            if not value:
                msg = f"broker URL {shown!r}: option {key!r} needs a file path"
                raise BrokerURLError(msg)
            options[key] = os.path.abspath(os.path.expanduser(value))
        if options and not tls:
            msg = f"broker URL {shown!r}: the options ca, cert and key need mqtts:// (TLS)"
            raise BrokerURLError(msg)
        if "key" in options and "cert" not in options:
            msg = f"broker URL {shown!r}: option 'key' needs 'cert' (the client certificate)"
            raise BrokerURLError(msg)
        for key, path in options.items():
            if not os.path.isfile(path):
                msg = f"broker URL {shown!r}: option {key!r}: {path} is not a readable file"
                raise BrokerURLError(msg)
        broker = cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=options.get("ca"),
            cert_file=options.get("cert"),
            key_file=options.get("key"),
        )
        try:
            broker.tls_context()
        except (ssl.SSLError, OSError) as exc:
            msg = f"broker URL {shown!r}: cannot use its TLS files: {exc}"
            raise BrokerURLError(msg) from None
        return broker

    def __str__(self) -> str:
        user = ""
        if self.username:
            name = quote(self.username, safe="")
            user = f"{name}:***@" if self.password else f"{name}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        options = {"ca": self.ca_file, "cert": self.cert_file, "key": self.key_file}
        query = "&".join(f"{key}={quote(path)}" for key, path in options.items() if path)
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{'?' if query else ''}{query}"

    def tls_context(self) -> ssl.SSLContext | None:
        """For mqtts://: verify the broker (certificate and host name) against `ca_file` or the
        system CAs; present the client certificate if there is one. None for plain mqtt://."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client(
        self,
        identifier: str,
        *,
        will: aiomqtt.Will | None = None,
        clean_session: bool = True,
        keepalive: int = 10,
    ) -> aiomqtt.Client:
        return Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            will=will,
            clean_session=clean_session,
            keepalive=keepalive,
            tls_context=self.tls_context(),  # built per connection: renewed certificate files are picked up
            timeout=10,
            max_queued_outgoing_messages=10_000,
        )

    def lean_client(
        self,
        identifier: str,
        on_message: OnMessage,
        *,
        keepalive: int = 10,
        gather_s: float = 0.0,
        clean_session: bool = True,
    ) -> LeanClient:
        """A lean client on this broker, for input that comes fast (see `LeanClient`)."""
        return LeanClient(
            self, identifier, on_message, keepalive=keepalive, gather_s=gather_s, clean_session=clean_session
        )


@dataclass(frozen=True, slots=True)
class Brokers:
    """One or more broker URLs, tried in order: the nodes of one broker cluster."""

    urls: tuple[BrokerURL, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            msg = "a broker list needs at least one URL"
            raise BrokerURLError(msg)

    @classmethod
    def parse(cls, text: str) -> Brokers:
        """`mqtt://a:1,mqtts://b:2?ca=...`: each URL parsed and checked like `BrokerURL.parse`."""
        parts = [part.strip() for part in text.split(",")]
        if any(not part for part in parts):
            msg = f"broker list {_redact(text)!r} has an empty entry: separate URLs with single commas"
            raise BrokerURLError(msg)
        return cls(tuple(BrokerURL.parse(part) for part in parts))

    @classmethod
    def of(cls, brokers: BrokerURL | Brokers) -> Brokers:
        return brokers if isinstance(brokers, Brokers) else cls((brokers,))

    @property
    def first(self) -> BrokerURL:
        return self.urls[0]

    def rotated(self) -> Brokers:
        """The same nodes from the second on (then the first): where a spare session starts."""
        return Brokers(self.urls[1:] + self.urls[:1])

    def __str__(self) -> str:
        return ",".join(str(url) for url in self.urls)


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password:
        return url.replace(f":{password}@", ":***@", 1)
    return url


C = TypeVar("C")
T = TypeVar("T")


class Client(aiomqtt.Client):
    """aiomqtt's client, mended where a session dies under it (a relay paused past its Last Will, then
    resumed: it came back only 10.2-10.4 s later, EBADF or ENOENT from the event loop in its log):

    - aiomqtt registers paho's socket with the event loop later (`call_soon_threadsafe`), and paho may
      close it first. The late registration then took a closed fd, or one reused by the next socket
      opened, whose CONNACK was never read: that connect waited out the 10 s timeout. Here the loop
      registers only paho's current socket (`_OwnSocketOnly`).
    - A QoS 1 publish (or a subscribe) in flight when the connection is lost waited its 10 s for an
      answer that cannot come; here it fails as soon as aiomqtt knows the connection is gone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = cast(asyncio.AbstractEventLoop, _OwnSocketOnly(self._loop, self._client))

    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109 - aiomqtt's signature
        lost = self._disconnected
        if fut is lost or not self._connected.done() or lost.done():  # connecting, or leaving: as aiomqtt does
            return await super()._wait_for(fut, timeout)
        answer = asyncio.ensure_future(super()._wait_for(fut, timeout))
        try:
            await asyncio.wait((answer, lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            answer.cancel()
        if answer.done() and not answer.cancelled():
            return answer.result()
        msg = "the connection was lost while waiting for the broker's answer"
        raise aiomqtt.MqttError(msg) from lost.exception()


class _OwnSocketOnly:
    """The event loop as a `Client` sees it: `add_reader` and `add_writer` act only on the fd of paho's
    open socket (they run late; the socket they were meant for may be closed by then)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, paho: Any) -> None:
        self._real, self._paho = loop, paho

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _open(self, fd: int) -> bool:
        sock = self._paho.socket()
        return sock is not None and sock.fileno() == fd

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        if self._open(fd):
            self._real.add_reader(fd, callback, *args)

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        if self._open(fd):
            self._real.add_writer(fd, callback, *args)


async def stay_connected(
    brokers: BrokerURL | Brokers,
    make_client: Callable[[BrokerURL], AbstractAsyncContextManager[C]],
    session: Callable[[C], Awaitable[None]],
    *,
    name: str,
    on_state: Callable[[bool], None] | None = None,
    max_delay_s: float = 10.0,
    avoid: Callable[[BrokerURL], bool] | None = None,
) -> None:
    """Run `session(client)` on a client connected to one of `brokers`, until cancelled. A lost
    broker is followed at once by the next in the list; once every one failed in a row, with jittered
    exponential backoff (0.1 s growing by 1.5 up to `max_delay_s`); `ReconnectLog` says what happens.
    Brokers that `avoid` names when their turn comes are passed over, unless it names them all."""
    urls = Brokers.of(brokers).urls
    index = 0
    failed_in_row = 0  # brokers tried without a connection since the last one that answered
    attempt = 0
    said = ReconnectLog(name, urls[0])

    def candidates() -> int:
        return sum(not avoid(url) for url in urls) if avoid is not None else len(urls)

    while True:
        if avoid is not None and avoid(urls[index]) and candidates():
            index = (index + 1) % len(urls)
            continue
        url = said.url = urls[index]
        try:
            async with contextlib.AsyncExitStack() as stack:
                # With other nodes to try, one that takes the connection but does not answer (a cluster
                # node electing leaders after another died) is given up on sooner than aiomqtt's 10 s.
                async with asyncio.timeout(LIST_CONNECT_TIMEOUT_S if len(urls) > 1 else None):
                    client = await stack.enter_async_context(make_client(url))
                attempt = failed_in_row = 0
                said.connected()
                if on_state is not None:
                    on_state(True)
                await session(client)
                return
        except (aiomqtt.MqttError, OSError) as exc:  # OSError: e.g. a TLS file that went away
            if on_state is not None:
                on_state(False)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from exc  # asked to stop: never reconnect instead
            failed_in_row += 1
            index = (index + 1) % len(urls)
            if failed_in_row < candidates():
                while avoid is not None and avoid(urls[index]):
                    index = (index + 1) % len(urls)
                log.warning("%s: broker %s unavailable (%s); trying %s", name, url, failure_reason(exc), urls[index])
                continue
            failed_in_row = 0
            delay = random.uniform(0.05, min(max_delay_s, 0.1 * 1.5**attempt))  # noqa: S311 - jitter, not a secret
            attempt += 1
            said.failed(exc)
            await asyncio.sleep(delay)


def _unread_bytes(fileno: int) -> int:
    if fileno < 0:  # the socket was closed (the connection lost): nothing more will be read from it
        return 0
    unread = array.array("i", [0])
    try:
        fcntl.ioctl(fileno, termios.FIONREAD, unread)
    except OSError:  # closed under us: nothing more will be read from it
        return 0
    return unread[0]


def backlog(client: aiomqtt.Client | LeanClient) -> tuple[int, int]:
    """What has reached a connected client but not its reader yet: (messages in aiomqtt's queue,
    bytes waiting unread in its socket: paho reads about one packet per event-loop turn). A
    `LeanClient` hands a read's messages on at once, unless that takes too long: what it read and
    did not hand on yet, and its socket."""
    if isinstance(client, LeanClient):
        return client.queued(), client.unread()
    queued = len(client.messages)
    sock = client._client.socket()  # aiomqtt hands out no other way to its socket
    if sock is None:
        return queued, 0
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0  # decrypted, not yet read by paho
    return queued, _unread_bytes(sock.fileno()) + pending


async def messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """`client.messages`, but what is already queued comes without a turn of the event loop each
    (aiomqtt's iterator starts a task per message: under a flood, that was the cost of a message)."""
    queue = client._queue  # aiomqtt's incoming queue: filled only by its reader, on this event loop
    async for message in client.messages:
        yield message
        while not queue.empty():
            yield queue.get_nowait()


async def read_backlog(client: aiomqtt.Client | LeanClient, bound_s: float, clock: Callable[[], float]) -> bool:
    """Yield to the event loop, so the client's reader and its consumer run, until nothing waits
    (True) or `bound_s` passed (False: input comes faster than it is read, or in a burst)."""
    started = clock()
    while sum(backlog(client)):
        if clock() - started >= bound_s:
            return False
        await asyncio.sleep(0)  # paho reads about one packet per turn of the loop
    return True


def payload_bytes(raw: object) -> bytes:
    """An aiomqtt message payload as bytes (paho hands bytes; be safe with the other types it allows)."""
    if isinstance(raw, bytes | bytearray):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode()
    return b"" if raw is None else str(raw).encode()


_BROKER_ADVICE = (  # (what the error says, lower case; what to do); the first match wins
    ("name or service not known", "Unknown host: check the broker URL."),
    ("nodename nor servname", "Unknown host: check the broker URL."),
    ("temporary failure in name resolution", "The host name cannot be resolved now: check DNS or the broker URL."),
    ("not authorized", "Check the user name and password in the broker URL."),
    ("bad user name or password", "Check the user name and password in the broker URL."),
    ("refused", "Is the broker running on that host and port?"),
    ("connect call failed", "Is the broker running on that host and port?"),  # asyncio's words (lean client)
    ("certificate", "Check the broker URL's ?ca= file and the broker's certificate."),
    ("timed out", "Is the host reachable and the port open?"),
    ("cannot connect to", "Is the host reachable and the port open?"),  # the lean client's connect timeout
)


def failure_reason(exc: BaseException) -> str:
    """Why a connection failed, on one line: its message, or its type when it has none (a timeout)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class ReconnectLog:
    """What a reconnecting client says about its broker, so an outage costs a few lines, not one per
    attempt: the first failure at once (WARNING, with what to do), then one summary per `every_s`
    while it lasts (at once when the reason changes, e.g. refused, then not authorized), then "back"
    when a connection succeeds. `clock` is monotonic seconds."""

    def __init__(
        self,
        name: str,
        url: BrokerURL,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 60.0,
        logger: logging.Logger = log,
    ) -> None:
        self.name, self.url, self.clock, self.every_s, self.log = name, url, clock, every_s, logger
        self.down_since: float | None = None
        self.attempts = 0  # failed attempts in this outage
        self._said_at = 0.0
        self._said_attempts = 0
        self._reason = ""

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.attempts += 1
        reason = failure_reason(exc)
        if self.down_since is None or reason != self._reason:
            self.down_since = now if self.down_since is None else self.down_since
            self._said_at, self._said_attempts, self._reason = now, self.attempts, reason
            advice = next((f" {what}" for needle, what in _BROKER_ADVICE if needle in reason.lower()), "")
            self.log.warning(
                "%s: broker %s unavailable (%s).%s Retrying; a summary every %.0f s until it is back.",
                self.name, self.url, reason, advice, self.every_s,
            )  # fmt: skip
        elif now - self._said_at >= self.every_s:
            self.log.warning(
                "%s: broker %s still unavailable after %.0f s (%d attempts in the last %.0f s; last: %s)",
                self.name, self.url, now - self.down_since, self.attempts - self._said_attempts, now - self._said_at,
                reason,
            )  # fmt: skip
            self._said_at, self._said_attempts = now, self.attempts

    def connected(self) -> None:
        if self.down_since is None:
            self.log.info("%s connected to %s", self.name, self.url)
        else:
            self.log.warning(
                "%s: broker %s is back after %.0f s (%d failed attempts)",
                self.name, self.url, self.clock() - self.down_since, self.attempts,
            )  # fmt: skip
        self.down_since = None
        self.attempts = 0
        self._reason = ""


OnMessage = Callable[[str, bytes, bool], None]  # (topic, payload, retained)
CONNECT_TIMEOUT_S = 10.0
GATHER_BELOW_BYTES = 65_536  # a read this large means a backlog: read on at once, without gathering
# Handing on one read's messages stops after this long; the rest follow on later turns of the event
# loop, reading paused meanwhile: a read of a replayed backlog (up to 256 KiB of small messages) must
# not hold the loop (issue: nothing holds it over 5 ms).
HAND_ON_BUDGET_S = 0.002


class _Stream(asyncio.Protocol):
    """The asyncio end of a `LeanClient`: every read is parsed at once and each message handed on."""

    def __init__(self, owner: LeanClient) -> None:
        self.owner = owner
        self.reader = PacketReader()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heard_at = 0.0
        self.resuming: asyncio.TimerHandle | None = None  # set while reading pauses to gather input
        self.paused_at: float | None = None  # when reading last paused to gather (the socket was drained then)
        self.left: deque[Packet] = deque()  # a read's packets not handed on yet (over HAND_ON_BUDGET_S)
        self.read_at = 0.0  # when they were read
        self.read_waited = 0.0  # how long they may have waited before that read (`waited_s`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream connection's is one

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        try:
            packets = self.reader.feed(data)
        except PacketError as exc:
            self.close(f"the broker broke the protocol ({exc})")
            return
        self.heard_at = now = owner.loop.time()
        paused_at, self.paused_at = self.paused_at, None
        # What this read hands on arrived after reading paused (the read before drained the socket):
        # at most `gather_s` ago, unless the loop itself was late to read it.
        self.read_at, self.read_waited = now, 0.0 if paused_at is None else min(owner.gather_s, now - paused_at)
        self.left.extend(packets)
        if self.hand_on(deferred=False) and owner.gather_s and len(data) < GATHER_BELOW_BYTES:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()  # let more arrive: one wakeup for many messages
                self.paused_at = owner.loop.time()
                self.resuming = owner.loop.call_later(owner.gather_s, self.resume)

    def hand_on(self, deferred: bool) -> bool:
        """Hand on what was read, for at most HAND_ON_BUDGET_S; True once all of it was. What is left
        follows on the next turn of the loop, reading paused until then (it arrived when it was read:
        `waited_s` counts the time since, so no beat is dated younger than it is)."""
        owner, left = self.owner, self.left
        loop, on_message = owner.loop, owner.on_message
        started = loop.time()
        owner.waited_s = self.read_waited + (started - self.read_at if deferred else 0.0)
        acks = []
        while left:
            packet = left.popleft()
            if type(packet) is Publish:
                if packet.qos:
                    acks.append(puback_packet(packet.packet_id))
                on_message(packet.topic, packet.payload, packet.retain)  # never raises: it counts bad input
            else:
                owner.control(packet)
            if left and loop.time() - started > HAND_ON_BUDGET_S:
                break
        transport = self.transport
        if transport is None or transport.is_closing():
            left.clear()  # unacknowledged: a persistent session gets them again
            return False
        if acks:
            transport.write(b"".join(acks))
        if left:
            transport.pause_reading()
            loop.call_soon(self.hand_on_more)
            return False
        return True

    def hand_on_more(self) -> None:
        if self.hand_on(deferred=True) and self.transport is not None and self.resuming is None:
            self.transport.resume_reading()

    def resume(self) -> None:
        """Read again now, if reading paused to gather input."""
        if self.resuming is not None:
            self.resuming.cancel()
            self.resuming = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_exception(Unavailable(why))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.resuming is not None:
            self.resuming.cancel()
        if not self.lost.done():
            self.lost.set_exception(Unavailable(f"the broker closed the connection ({exc or 'EOF'})"))


class LeanClient:
    """An MQTT 3.1.1 session (clean or persistent; subscribes at QoS 0 and 1, publishes at QoS 0) for
    input that comes fast, or whose every wakeup counts: the relay's local side, the monitor's input.
    Each read of the socket (up to 256 KiB) is parsed in one go and every message in it goes to
    `on_message(topic, payload, retained)` right away, on the event loop (a QoS 1 message is
    acknowledged once it was handed on): no task, queue or turn of the loop per message (aiomqtt's
    paho reads one packet per turn, in three `recv` calls). `async with` connects (TLS as the URL
    says), `subscribe()` waits for its SUBACK, `run()` returns only by raising `Unavailable` when the
    session ends: the broker closed it, refused it, went silent past keepalive, or broke the protocol.

    `gather_s`: after a small read, wait this long before reading again, so that input arriving a
    message at a time is read many messages per wakeup (the wakeup, not the message, was the cost).
    A message is then handed on up to `gather_s` after it arrived; asking for `unread()` reads at
    once, so whoever checks for a backlog (the relay before it flushes) never waits for it. While
    `on_message` runs, `waited_s` says how long ago the messages of this read may have arrived at the
    earliest (0 when it did not follow a pause to gather): dated that much earlier, none of them
    looks younger than it is."""

    def __init__(
        self,
        url: BrokerURL,
        identifier: str,
        on_message: OnMessage,
        *,
        keepalive: int = 10,
        gather_s: float = 0.0,
        clean_session: bool = True,
    ) -> None:
        self.url = url
        self.clean_session = clean_session  # False: the broker keeps our subscriptions and QoS 1 messages
        self.identifier = identifier
        self.on_message = on_message
        self.keepalive = keepalive
        self.gather_s = gather_s
        self.waited_s = 0.0
        self.loop = asyncio.get_running_loop()
        self._stream: _Stream | None = None
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._connack: asyncio.Future[ConnAck] | None = None

    async def __aenter__(self) -> Self:
        url = self.url
        self._connack = self.loop.create_future()
        tls = url.tls_context()  # built per connection: renewed certificate files are picked up
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, self._stream = await self.loop.create_connection(
                    lambda: _Stream(self), url.host, url.port, ssl=tls, server_hostname=url.host if tls else None
                )
        except TimeoutError:
            msg = f"cannot connect to {url} within {CONNECT_TIMEOUT_S:g} s"
            raise Unavailable(msg) from None
        try:
            self._send(connect_packet(self.identifier, self.keepalive, url.username, url.password, self.clean_session))
            code = (await self._answer(self._connack, "CONNACK")).return_code
        except BaseException:
            self._abort()
            raise
        if code:
            self._abort()
            msg = f"broker refused the connection: {CONNACK_REFUSALS.get(code, 'refused')} (code {code})"
            raise Unavailable(msg)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stream = self._stream
        if stream is not None and stream.transport is not None and not stream.lost.done():
            with contextlib.suppress(Exception):
                stream.transport.write(DISCONNECT_PACKET)
        self._abort()

    def _abort(self) -> None:
        stream = self._stream
        if stream is not None:
            if not stream.lost.done():
                stream.lost.set_exception(Unavailable("session closed"))
            stream.lost.exception()  # retrieved: never "exception was never retrieved"
            if stream.transport is not None:
                stream.transport.close()
        for waiter in self._waiting.values():
            waiter.cancel()
        self._waiting.clear()

    def _send(self, packet: bytes) -> None:
        stream = self._stream
        if stream is None or stream.transport is None or stream.transport.is_closing():
            msg = "not connected"
            raise Unavailable(msg)
        stream.transport.write(packet)

    def control(self, packet: object) -> None:
        """A packet other than PUBLISH, from the stream."""
        if isinstance(packet, ConnAck):
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, SubAck):
            waiter = self._waiting.pop(packet.packet_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(packet.granted)
        elif not isinstance(packet, PingResp) and self._stream is not None:  # an UNSUBACK we never asked for
            self._stream.close(f"the broker sent an unexpected {type(packet).__name__}")

    async def subscribe(self, topic_filter: str | Sequence[tuple[str, int]], qos: int = 0) -> None:
        """One SUBSCRIBE: a filter at `qos`, or several `(filter, qos)`; waits for the SUBACK."""
        filters = [(topic_filter, qos)] if isinstance(topic_filter, str) else list(topic_filter)
        stream = self._stream
        if stream is None:
            msg = "not connected"
            raise Unavailable(msg)
        self._next_id = self._next_id % 0xFFFF + 1
        waiter: asyncio.Future[tuple[int, ...]] = self.loop.create_future()
        self._waiting[self._next_id] = waiter
        self._send(subscribe_packet(self._next_id, filters))
        named = ", ".join(repr(f) for f, _ in filters)
        if SUBACK_FAILURE in await self._answer(waiter, f"SUBACK for {named}"):
            msg = f"broker refused the subscription to {named}"
            raise Unavailable(msg)

    async def _answer(self, waiter: asyncio.Future[T], what: str) -> T:
        """The broker's answer to what we just sent, unless the session ends or it takes too long."""
        stream = self._stream
        if stream is None:
            msg = "not connected"
            raise Unavailable(msg)
        lost: asyncio.Future[None] = stream.lost
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            msg = f"no {what} from {self.url} within {CONNECT_TIMEOUT_S:g} s"
            raise Unavailable(msg) from None
        if not waiter.done():
            lost.result()  # raises why the session ended
        return waiter.result()

    async def publish(self, topic: str, payload: bytes = b"", qos: int = 0) -> None:
        """Send at QoS 0: at most once, so a message sent while the session is down is just lost."""
        if qos != 0:
            msg = f"LeanClient publishes at QoS 0 only, not {qos}"
            raise ValueError(msg)
        stream = self._stream
        if stream is not None and stream.transport is not None and not stream.transport.is_closing():
            stream.transport.write(publish_packet(topic, payload))

    async def run(self) -> None:
        """Keep the session alive (PINGREQ every keepalive) until it ends; raises `Unavailable` saying why."""
        stream = self._stream
        if stream is None:
            msg = "not connected"
            raise Unavailable(msg)
        while True:
            try:
                async with asyncio.timeout(self.keepalive):
                    await asyncio.shield(stream.lost)
            except TimeoutError:
                # Silent, unless input waits unread (we were stopped or our loop was blocked, not the broker).
                if self.loop.time() - stream.heard_at > 2 * self.keepalive and not self.unread():
                    stream.close(f"the broker was silent for more than {2 * self.keepalive} s")
                else:
                    self._send(PINGREQ_PACKET)

    def queued(self) -> int:
        """Messages read but not handed on yet (a read that took more than HAND_ON_BUDGET_S)."""
        return 0 if self._stream is None else len(self._stream.left)

    def unread(self) -> int:
        """Bytes waiting in the socket, not read yet; if reading paused to gather input, it resumes:
        what waits is wanted now."""
        stream = self._stream
        transport = None if stream is None else stream.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        waiting = 0 if sock is None else _unread_bytes(sock.fileno())
        if waiting and stream is not None:
            stream.resume()
        return waiting
