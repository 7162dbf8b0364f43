"""Sparkplug B payloads: what liveness needs from them, read with the public Sparkplug B schema.

Rules of this module:
- Pure: bytes in, values out; a payload that is not a Sparkplug B `Payload` raises
  `WireError("watch_bad_payload")`, nothing else.
- The schema is the public `sparkplug_b.proto` (package `org.eclipse.tahu.protobuf`, proto2): its
  `Payload` and `Payload.Metric` messages are declared here as protobuf descriptors with the same
  names, field numbers and types, so no generated code and no `protoc` are needed. Fields not
  declared (metadata, properties, data sets, templates) are kept by protobuf as unknown fields.
- Topics: `spBv1.0/<group>/NBIRTH|NDEATH/<node>` and `spBv1.0/<group>/DBIRTH|DDEATH/<node>/<device>`.
  NDEATH is the node's Last Will; it carries the `bdSeq` metric of the session it ends, which must
  match the `bdSeq` of that session's NBIRTH.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from relaybeat.relay.wire import WireError

NAMESPACE = "spBv1.0"
FILTERS = tuple(f"{NAMESPACE}/+/{kind}/+" for kind in ("NBIRTH", "NDEATH")) + tuple(
    f"{NAMESPACE}/+/{kind}/+/+" for kind in ("DBIRTH", "DDEATH")
)
MAX_PAYLOAD_BYTES = 1024 * 1024
BD_SEQ = "bdSeq"

# Sparkplug B data types (the schema's comment table) that a bdSeq may be sent as.
INT64, UINT64, INT32, UINT32 = 4, 8, 3, 7


class Message(StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    group: str
    message: Message
    node: str
    device: str | None  # None for node messages


def parse_topic(topic: str) -> SparkplugTopic | None:
    """A birth or death topic, or None for any other topic (NDATA, STATE, ...)."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE or parts[2] not in Message.__members__:
        return None
    kind = Message(parts[2])
    node_message = kind in (Message.NBIRTH, Message.NDEATH)
    if len(parts) != (4 if node_message else 5):
        return None
    return SparkplugTopic(parts[1], kind, parts[3], None if node_message else parts[4])


def _schema() -> tuple[Any, Any]:
    """The `Payload` and `Payload.Metric` message classes of the public schema."""
    f = descriptor_pb2.FieldDescriptorProto
    optional, repeated = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(
        name="relaybeat/sparkplug_b.proto", package="org.eclipse.tahu.protobuf", syntax="proto2"
    )
    payload = file.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, number, kind in (
        ("name", 1, f.TYPE_STRING),
        ("alias", 2, f.TYPE_UINT64),
        ("timestamp", 3, f.TYPE_UINT64),
        ("datatype", 4, f.TYPE_UINT32),
        ("is_historical", 5, f.TYPE_BOOL),
        ("is_transient", 6, f.TYPE_BOOL),
        ("is_null", 7, f.TYPE_BOOL),
        # fields 10 to 16 are the `value` oneof
        ("int_value", 10, f.TYPE_UINT32),
        ("long_value", 11, f.TYPE_UINT64),
        ("float_value", 12, f.TYPE_FLOAT),
        ("double_value", 13, f.TYPE_DOUBLE),
        ("boolean_value", 14, f.TYPE_BOOL),
        ("string_value", 15, f.TYPE_STRING),
        ("bytes_value", 16, f.TYPE_BYTES),
    ):
        added = metric.field.add(name=name, number=number, type=kind, label=optional)
        if number >= 10:
            added.oneof_index = 0
    payload.field.add(name="timestamp", number=1, type=f.TYPE_UINT64, label=optional)
    metric_type = ".org.eclipse.tahu.protobuf.Payload.Metric"
    payload.field.add(name="metrics", number=2, type=f.TYPE_MESSAGE, label=repeated, type_name=metric_type)
    payload.field.add(name="seq", number=3, type=f.TYPE_UINT64, label=optional)
    payload.field.add(name="uuid", number=4, type=f.TYPE_STRING, label=optional)
    payload.field.add(name="body", number=5, type=f.TYPE_BYTES, label=optional)
    payload.extension_range.add(start=6, end=536_870_912)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    payload_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))
    return payload_class, getattr(payload_class, "Metric")  # noqa: B009 (built at run time: mypy cannot see it)


Payload, Metric = _schema()


def encode(metrics: dict[str, int], seq: int | None = None, timestamp_ms: int | None = None) -> bytes:
    """A payload of unsigned 64-bit metrics (what an edge node sends in NBIRTH and NDEATH, `bdSeq`)."""
    payload = Payload()
    if timestamp_ms is not None:
        payload.timestamp = timestamp_ms
    if seq is not None:
        payload.seq = seq
    for name, value in metrics.items():
        payload.metrics.add(name=name, datatype=UINT64, long_value=value)
    data: bytes = payload.SerializeToString()
    return data


def decode(data: bytes) -> Any:
    """The `Payload`, or WireError('watch_bad_payload')."""
    if len(data) > MAX_PAYLOAD_BYTES:
        msg = "too_large"
        raise WireError(msg, f"{len(data)} bytes > {MAX_PAYLOAD_BYTES}")
    payload = Payload()
    try:
        payload.ParseFromString(data)
    except message.DecodeError as exc:
        msg = "watch_bad_payload"
        raise WireError(msg, f"not a Sparkplug B payload ({str(exc)[:60]})") from None
    return payload


def bd_seq(data: bytes) -> int:
    """The `bdSeq` metric of an NBIRTH or NDEATH payload; WireError if there is none."""
    for metric in decode(data).metrics:
        if metric.name == BD_SEQ:
            field = metric.WhichOneof("value")
            if field in ("long_value", "int_value"):
                value: int = getattr(metric, field)
                return value
    msg = "watch_bad_payload"
    raise WireError(msg, "no integer bdSeq metric in a node birth or death")
