"""A minimal MQTT 3.1.1 client on raw asyncio sockets, for load generation only.

It speaks just what the benchmarks need: CONNECT (clean session, optional will), PUBLISH QoS 0
and 1 (with PUBACK counting), SUBSCRIBE, and incoming PUBLISH for reading `$SYS` topics. One
process can hold thousands of these: a client is one protocol object and one transport, no task.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

from relaybeat.relay.packets import utf8, varint

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    0x10,
    0x20,
    0x30,
    0x40,
    0x80,
    0x90,
    0xC0,
    0xD0,
    0xE0,
)


def connect_packet(
    client_id: str,
    keepalive_s: int = 0,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    flags = 0x02  # clean session
    payload = utf8(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += utf8(topic) + utf8(message)
    body = utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s) + payload
    return bytes([CONNECT]) + varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    head = PUBLISH | (qos << 1) | (1 if retain else 0)
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"")
    return bytes([head]) + varint(len(body) + len(payload)) + body + payload


def subscribe_packet(packet_id: int, topic: str, qos: int = 0) -> bytes:
    body = struct.pack("!H", packet_id) + utf8(topic) + bytes([qos])
    return bytes([SUBSCRIBE | 0x02]) + varint(len(body)) + body


class Client(asyncio.Protocol):
    """One MQTT connection. `ready` resolves on CONNACK; `on_message(topic, payload)` gets publishes."""

    def __init__(self, client_id: str, keepalive_s: int = 0, will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.client_id = client_id
        self._connect = connect_packet(client_id, keepalive_s, will)
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_message: Callable[[str, bytes], None] | None = None
        self.acked = 0  # PUBACKs received
        self._buffer = bytearray()
        self._next_id = 0
        self._ack_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # ---------------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        transport = self.transport
        transport.write(self._connect)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in (self.ready, self.closed):
            if not future.done():
                future.set_exception(ConnectionError(f"{self.client_id}: connection lost ({exc})"))
        self.closed.exception()  # mark retrieved: nobody has to await it

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= 2:
            length, shift, at = 0, 0, 1
            while True:
                if at >= len(buffer):
                    return
                byte = buffer[at]
                length |= (byte & 0x7F) << shift
                at += 1
                if not byte & 0x80:
                    break
                shift += 7
            if len(buffer) < at + length:
                return
            kind, body = buffer[0], bytes(buffer[at : at + length])
            del buffer[: at + length]
            self._packet(kind, body)

    def _packet(self, kind: int, body: bytes) -> None:
        packet = kind & 0xF0
        if packet == CONNACK:
            if body[1] != 0 and not self.ready.done():
                self.ready.set_exception(ConnectionError(f"{self.client_id}: CONNACK return code {body[1]}"))
            elif not self.ready.done():
                self.ready.set_result(None)
        elif packet == PUBACK:
            self.acked += 1
            if self._ack_waiters:
                waiting = []
                for count, future in self._ack_waiters:
                    if self.acked < count:
                        waiting.append((count, future))
                    elif not future.done():
                        future.set_result(None)
                self._ack_waiters = waiting
        elif packet == PUBLISH:
            (topic_length,) = struct.unpack_from("!H", body)
            topic = body[2 : 2 + topic_length].decode()
            qos = (kind >> 1) & 0x03
            start = 2 + topic_length + (2 if qos else 0)
            if qos == 1 and self.transport is not None:
                self.transport.write(bytes([PUBACK, 2]) + body[2 + topic_length : start])
            if self.on_message is not None:
                self.on_message(topic, body[start:])

    # ---------------------------------------------------------------------------------- commands

    def publish(self, topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Queue a publish; returns how many QoS 1 publishes this client has sent in all."""
        if self.transport is None:
            msg = f"{self.client_id}: not connected"
            raise ConnectionError(msg)
        packet_id = 0
        if qos:
            self._next_id += 1
            packet_id = (self._next_id - 1) % 65535 + 1
        self.transport.write(publish_packet(topic, payload, qos, packet_id, retain))
        return self._next_id

    async def wait_acked(self, count: int) -> None:
        """Until at least `count` PUBACKs have arrived."""
        if self.acked >= count:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ack_waiters.append((count, future))
        await future

    def subscribe(self, topic: str, qos: int = 0) -> None:
        assert self.transport is not None
        self._next_id += 1
        self.transport.write(subscribe_packet(self._next_id, topic, qos))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(bytes([DISCONNECT, 0]))
            self.transport.close()


async def connect(
    host: str,
    port: int,
    client_id: str,
    *,
    keepalive_s: int = 0,
    will: tuple[str, bytes, int, bool] | None = None,
    timeout_s: float = 20.0,
) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_connection(lambda: Client(client_id, keepalive_s, will), host, port), timeout_s
    )
    await asyncio.wait_for(client.ready, timeout_s)
    return client
