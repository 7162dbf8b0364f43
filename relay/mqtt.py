"""MQTT connection plumbing shared by the leaf agent, the relay and the monitor.

Broker URLs are `mqtt://[user:pass@]host:port` or `mqtts://...` (TLS). Passwords never reach a log:
`BrokerURL.__str__` redacts them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import aiomqtt

log = logging.getLogger("relaybeat.mqtt")


@dataclass(frozen=True, slots=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None  # trust this CA for mqtts:// (the system store otherwise)

    @classmethod
    def parse(cls, url: str, ca_file: str | None = None) -> BrokerURL:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL {_redact(url)!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError(f"broker URL {_redact(url)!r} has no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ValueError(f"broker URL {_redact(url)!r} has a bad port") from None
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=ca_file,
        )

    def __str__(self) -> str:
        user = ""
        if self.username:
            user = f"{self.username}:***@" if self.password else f"{self.username}@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def client(
        self,
        identifier: str,
        *,
        will: aiomqtt.Will | None = None,
        clean_session: bool = True,
        keepalive: int = 10,
    ) -> aiomqtt.Client:
        tls_context = None
        if self.tls:
            tls_context = ssl.create_default_context(cafile=self.ca_file)
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            will=will,
            clean_session=clean_session,
            keepalive=keepalive,
            tls_context=tls_context,
            timeout=10,
            max_queued_outgoing_messages=10_000,
        )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


async def stay_connected(
    url: BrokerURL,
    make_client: Callable[[], aiomqtt.Client],
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    name: str,
    on_state: Callable[[bool], None] | None = None,
    max_delay_s: float = 10.0,
) -> None:
    """Run `session(client)` on a connected client, reconnecting with jittered exponential backoff
    (0.1 s doubling by 1.5 up to `max_delay_s`) until cancelled."""
    attempt = 0
    while True:
        try:
            async with make_client() as client:
                attempt = 0
                log.info("%s connected to %s", name, url)
                if on_state is not None:
                    on_state(True)
                await session(client)
                return
        except aiomqtt.MqttError as exc:
            if on_state is not None:
                on_state(False)
            delay = random.uniform(0.05, min(max_delay_s, 0.1 * 1.5**attempt))
            attempt += 1
            log.warning("%s: broker %s unavailable (%s); retrying in %.1f s", name, url, exc, delay)
            await asyncio.sleep(delay)


def payload_bytes(raw: object) -> bytes:
    """An aiomqtt message payload as bytes (paho hands bytes; be safe with the other types it allows)."""
    if isinstance(raw, bytes | bytearray):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode()
    return b"" if raw is None else str(raw).encode()
