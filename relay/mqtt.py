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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiomqtt

from relaybeat.errors import SettingsError

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
        return aiomqtt.Client(
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


async def stay_connected(
    brokers: BrokerURL | Brokers,
    make_client: Callable[[BrokerURL], aiomqtt.Client],
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    name: str,
    on_state: Callable[[bool], None] | None = None,
    max_delay_s: float = 10.0,
) -> None:
    """Run `session(client)` on a client connected to one of `brokers`, until cancelled. A lost
    broker is followed at once by the next in the list; once every one failed in a row, with jittered
    exponential backoff (0.1 s growing by 1.5 up to `max_delay_s`)."""
    urls = Brokers.of(brokers).urls
    index = 0
    failed_in_row = 0  # brokers tried without a connection since the last one that answered
    attempt = 0
    while True:
        url = urls[index]
        try:
            async with contextlib.AsyncExitStack() as stack:
                # With other nodes to try, one that takes the connection but does not answer (a cluster
                # node electing leaders after another died) is given up on sooner than aiomqtt's 10 s.
                async with asyncio.timeout(LIST_CONNECT_TIMEOUT_S if len(urls) > 1 else None):
                    client = await stack.enter_async_context(make_client(url))
                attempt = failed_in_row = 0
                log.info("%s connected to %s", name, url)
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
            if len(urls) > 1 and failed_in_row < len(urls):
                log.warning("%s: broker %s unavailable (%s); trying %s", name, url, exc, urls[index])
                continue
            failed_in_row = 0
            delay = random.uniform(0.05, min(max_delay_s, 0.1 * 1.5**attempt))  # noqa: S311 - jitter, not a secret
            attempt += 1
            log.warning("%s: broker %s unavailable (%s); retrying in %.1f s", name, url, exc, delay)
            await asyncio.sleep(delay)


def backlog(client: aiomqtt.Client) -> tuple[int, int]:
    """What has reached a connected client but not its reader yet: (messages in aiomqtt's queue,
    bytes waiting unread in its socket: paho reads about one packet per event-loop turn)."""
    queued = len(client.messages)
    sock = client._client.socket()  # aiomqtt hands out no other way to its socket
    if sock is None:
        return queued, 0
    unread = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread)
    except OSError:  # closed under us: nothing more will be read from it
        return queued, 0
    pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0  # decrypted, not yet read by paho
    return queued, unread[0] + pending


async def messages(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """`client.messages`, but what is already queued comes without a turn of the event loop each
    (aiomqtt's iterator starts a task per message: under a flood, that was the cost of a message)."""
    queue = client._queue  # aiomqtt's incoming queue: filled only by its reader, on this event loop
    async for message in client.messages:
        yield message
        while not queue.empty():
            yield queue.get_nowait()


async def read_backlog(client: aiomqtt.Client, bound_s: float, clock: Callable[[], float]) -> bool:
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
