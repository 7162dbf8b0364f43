"""MQTT 3.1.1 packets for a lean client: what the relay's local session sends, and reading a stream
of what a broker sends back, many packets per read.

Rules of this module:
- Pure and synchronous: bytes in, packets out; no socket, no clock.
- `PacketReader.feed(data)` takes any slice of the stream (a byte at a time or 256 KiB at once) and
  returns every packet completed by it, in order; a partial packet waits for the next call.
- A stream that breaks MQTT 3.1.1 raises `PacketError` (the session must then be dropped: nothing
  after a framing error can be trusted); nothing else is raised.
- Only what a subscriber at QoS 0 and 1 (that may publish at QoS 0), in a clean or a persistent
  session, needs: CONNECT, SUBSCRIBE, PUBLISH (QoS 0), PUBACK, PINGREQ and DISCONNECT out; CONNACK,
  SUBACK, PUBLISH (QoS 0/1), PINGRESP and UNSUBACK in.
"""

from __future__ import annotations

from typing import NamedTuple

from relaybeat.errors import RelaybeatError

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    0x10, 0x20, 0x30, 0x40, 0x82, 0x90, 0xB0, 0xC0, 0xD0, 0xE0,
)  # fmt: skip
PINGREQ_PACKET = bytes([PINGREQ, 0])
DISCONNECT_PACKET = bytes([DISCONNECT, 0])
SUBACK_FAILURE = 0x80

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3): why a broker refused a connection.
CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class PacketError(RelaybeatError, ValueError):
    """The broker's byte stream breaks MQTT 3.1.1; the message says where."""


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int  # 0 at QoS 0


class ConnAck(NamedTuple):
    session_present: bool
    return_code: int  # 0: accepted; see CONNACK_REFUSALS


class SubAck(NamedTuple):
    packet_id: int
    granted: tuple[int, ...]  # per filter: the QoS granted, or SUBACK_FAILURE


class PingResp(NamedTuple):
    pass


class UnsubAck(NamedTuple):
    packet_id: int


Packet = Publish | ConnAck | SubAck | PingResp | UnsubAck


def varint(value: int) -> bytes:
    """MQTT's variable byte integer (the remaining length)."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text: str | bytes) -> bytes:
    """An MQTT UTF-8 string: two bytes of length, then the bytes."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 0xFFFF:
        msg = f"an MQTT string holds at most 65,535 bytes, not {len(raw)}"
        raise ValueError(msg)
    return len(raw).to_bytes(2, "big") + raw


def _packet(head: int, body: bytes) -> bytes:
    return bytes([head]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
    clean_session: bool = True,
) -> bytes:
    """CONNECT, with a clean session (the relay's local side) or a persistent one (the monitor's); no will."""
    flags = (
        (0x02 if clean_session else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    )
    if password is not None and username is None:
        msg = "MQTT 3.1.1 allows a password only with a user name"
        raise ValueError(msg)
    body = utf8("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return _packet(CONNECT, body)


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = packet_id.to_bytes(2, "big") + b"".join(utf8(f) + bytes([qos]) for f, qos in filters)
    return _packet(SUBSCRIBE, body)


def puback_packet(packet_id: int) -> bytes:
    return bytes([PUBACK, 2]) + packet_id.to_bytes(2, "big")


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, retain: bool = False) -> bytes:
    """A PUBLISH (the client sends QoS 0 only; brokers send QoS 0 and 1 to it)."""
    head = PUBLISH | (qos << 1) | (1 if retain else 0)
    return _packet(head, utf8(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload)


class PacketReader:
    """Turns a broker's byte stream into packets; keeps the unfinished tail between calls."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes of an unfinished packet held for the next `feed`."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        buffer = self._buffer + data if self._buffer else data
        end = len(buffer)
        out: list[Packet] = []
        at = 0
        while at + 2 <= end:
            head = buffer[at]
            # Remaining length: one to four varint bytes (nearly always one or two).
            byte = buffer[at + 1]
            length = byte & 0x7F
            body = at + 2
            if byte & 0x80:
                shift = 7
                while True:
                    if body >= end:
                        break
                    byte = buffer[body]
                    body += 1
                    length |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        msg = "a remaining length longer than four bytes"
                        raise PacketError(msg)
                if byte & 0x80:  # the length itself is not complete yet
                    break
            stop = body + length
            if stop > end:
                break
            kind = head & 0xF0
            if kind == PUBLISH:
                out.append(_publish(head, buffer, body, stop))
            else:
                out.append(_control(head, buffer[body:stop]))
            at = stop
        self._buffer = buffer[at:]
        return out


def _publish(head: int, buffer: bytes, body: int, stop: int) -> Publish:
    qos = (head >> 1) & 3
    if qos == 3:
        msg = "a PUBLISH with QoS 3"
        raise PacketError(msg)
    if qos == 2:
        msg = "a PUBLISH with QoS 2 (this client subscribes at QoS 1 at most)"
        raise PacketError(msg)
    if stop - body < 2:
        msg = "a PUBLISH too short for its topic length"
        raise PacketError(msg)
    topic_end = body + 2 + ((buffer[body] << 8) | buffer[body + 1])
    data = topic_end + (2 if qos else 0)
    if data > stop:
        msg = "a PUBLISH whose topic runs past its end"
        raise PacketError(msg)
    packet_id = ((buffer[topic_end] << 8) | buffer[topic_end + 1]) if qos else 0
    if qos and not packet_id:
        msg = "a QoS 1 PUBLISH with packet id 0"
        raise PacketError(msg)
    topic = buffer[body + 2 : topic_end].decode(errors="replace")  # a bad topic is the caller's to count
    return Publish(topic, buffer[data:stop], qos, bool(head & 1), packet_id)


def _control(head: int, body: bytes) -> Packet:
    if head == CONNACK and len(body) == 2:
        return ConnAck(bool(body[0] & 1), body[1])
    if head == SUBACK and len(body) >= 3:
        return SubAck(int.from_bytes(body[:2], "big"), tuple(body[2:]))
    if head == PINGRESP and not body:
        return PingResp()
    if head == UNSUBACK and len(body) == 2:
        return UnsubAck(int.from_bytes(body, "big"))
    msg = f"an unexpected packet: type 0x{head:02x}, {len(body)} bytes"
    raise PacketError(msg)
