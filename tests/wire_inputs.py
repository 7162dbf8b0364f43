"""Wire messages built for tests: bundle JSON with fields replaced, messages nested too deep, and
Hypothesis strategies for hostile beats and bundles (used by the decoder fuzz and the end-to-end
hostile-input test)."""

from __future__ import annotations

import contextlib
import json
import re
import zlib
from collections.abc import Callable

import orjson
from hypothesis import strategies as st


def bundle_json(**override: object) -> bytes:
    body: dict[str, object] = {"v": 1, "relay": "r1", "boot": "b", "seq": 1, "flush_ms": 1000, "hosts": []}
    body.update(override)
    return orjson.dumps(body)


DEEP_META = b'{"meta":' + b'{"a":' * 300 + b"1" + b"}" * 301
DEEP_LIST = b"[" * 1000 + b"]" * 1000


# Structure-aware: payloads are built as JSON text, so values can nest deeper than any Python encoder
# (or decoder) would go, carry NUL and other control characters, and hold numbers no double can.

ID_GRAMMAR = re.compile(r"[A-Za-z0-9._-]{1,128}")  # the README's grammar, independent of relay/wire.py
valid_ids = st.from_regex(ID_GRAMMAR, fullmatch=True)
control_characters = st.characters(max_codepoint=0x1F) | st.sampled_from("\x7f\x85\u2028")
hostile_ids = (
    st.lists(valid_ids, min_size=2, max_size=3).map("\0".join)  # many ids joined the way the decoder once did
    | st.builds(lambda a, c, b: a + c + b, valid_ids, control_characters | st.sampled_from("/ +#\u00e9"), valid_ids)
    | st.integers(129, 300).map(lambda n: "h" * n)
    | st.builds(lambda a, b: "x" * 128 + "\0" + a + b, valid_ids, st.just("") | control_characters)
    | st.text(max_size=10)
    | st.sampled_from(["", "\0", "h\0", "\0h"])
)
huge_numbers = st.sampled_from(["1e308", "-1e308", "1e309", "-1e400", "18446744073709551616", "1" + "0" * 400])
scalar_json = (
    st.sampled_from(["null", "true", "false", "0", "-0", "-1", "1.0", "0.5", '"ok"', '"stopping"', '"\\ud800"'])
    | huge_numbers
    | st.integers().map(str)
    | st.floats().map(json.dumps)  # NaN, Infinity and -Infinity included
    | (st.text(max_size=12) | hostile_ids).map(json.dumps)  # json.dumps escapes NUL as \u0000
)


def _nested(depth: int, kind: str, inner: str) -> str:
    if kind == "list":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


deep_json = st.builds(_nested, st.integers(2, 1100), st.sampled_from(["list", "object"]), scalar_json)
hostile_json = st.recursive(
    scalar_json | deep_json,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.dictionaries(st.text(max_size=6).map(json.dumps), inner, max_size=4).map(
            lambda fields: "{" + ",".join(f"{key}:{value}" for key, value in fields.items()) + "}"
        )
    ),
    max_leaves=8,
)


class _Raw(str):
    """JSON text to be written as is."""


def _json_text(value: object) -> str:
    if isinstance(value, _Raw):
        return value
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(key)}:{_json_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(item) for item in value) + "]"
    return json.dumps(value)


def _put(body: dict[str, object], slot: tuple[str | int, ...], value: object) -> None:
    target: object = body
    for step in slot[:-1]:
        target = target[step]  # type: ignore[index]
    target[slot[-1]] = value  # type: ignore[index]


BEAT_SLOTS: list[tuple[str | int, ...]] = [("seq",), ("interval",), ("status",), ("meta",), ("meta", "k"), ("x",)]
_CHILD_FIELDS = ["relay", "boot", "seq", "flush_ms", "hosts", "age_ms", "children", "x"]
BUNDLE_SLOTS: list[tuple[str | int, ...]] = [
    *((key,) for key in ["v", "relay", "boot", "seq", "flush_ms", "hosts", "children", "age_ms", "x"]),
    ("hosts", 0), *(("hosts", 0, i) for i in range(5)),
    ("children", 0), *(("children", 0, key) for key in _CHILD_FIELDS),
    ("children", 0, "hosts", 0), *(("children", 0, "hosts", 0, i) for i in range(5)),
]  # fmt: skip
ID_SLOTS = {("relay",), ("boot",), ("hosts", 0, 0), ("children", 0, "relay"), ("children", 0, "boot"),
            ("children", 0, "hosts", 0, 0)}  # fmt: skip


def _sound_beat() -> dict[str, object]:
    return {"seq": 1, "interval": 1.5, "status": "ok", "meta": {"role": "db"}}


def _sound_bundle() -> dict[str, object]:
    child = {"relay": "c1", "boot": "b2", "seq": 3, "flush_ms": 1000, "hosts": [["ch", 1, 5, 1000, "ok"]], "age_ms": 9}
    return {"v": 1, "relay": "evil", "boot": "b1", "seq": 1, "flush_ms": 1000, "hosts": [["h", 1, 5, 1000, "ok"]],
            "children": [child]}  # fmt: skip


def _hostile_value(slot: tuple[str | int, ...]) -> st.SearchStrategy[object]:
    raw: st.SearchStrategy[object] = hostile_json.map(_Raw)
    return (hostile_ids | raw) if slot in ID_SLOTS else raw


@st.composite
def _hostile_payload(
    draw: st.DrawFn, sound: Callable[[], dict[str, object]], slots: list[tuple[str | int, ...]]
) -> bytes:
    """A sound message with one to three of its slots (anywhere in it) holding hostile values; or
    just a hostile value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(hostile_json).encode()
    body = sound()
    for slot in draw(st.lists(st.sampled_from(slots), min_size=1, max_size=3, unique=True)):
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier pick replaced the path
            _put(body, slot, draw(_hostile_value(slot)))
    return _json_text(body).encode()


hostile_beats = _hostile_payload(_sound_beat, BEAT_SLOTS)
hostile_bundles = _hostile_payload(_sound_bundle, BUNDLE_SLOTS)


# Version 2 (binary), structure-aware: a sound bundle written field by field by a writer of our own
# (independent of relay/wire.py, following the README's layout), then one to three fields replaced
# by hostile bytes: extreme integers, lengths that lie, hostile ids, reserved flags and status bytes,
# truncations; the whole optionally compressed (or claiming to be).

_U64_EDGES = [0, 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]


def _v2_node_fields(
    prefix: str, relay: str, hosts: list[tuple[str, int, int, int, int]], children: int
) -> list[tuple[str, bytes]]:
    ids = "\0".join(host for host, *_ in hosts).encode()
    n = len(hosts)
    return [
        (f"{prefix}kind", b"\x01"),
        (f"{prefix}relay", bytes([len(relay)]) + relay.encode()),
        (f"{prefix}boot", b"\x02b1"),
        (f"{prefix}seq", (3).to_bytes(8, "little")),
        (f"{prefix}flush_ms", (1000).to_bytes(4, "little")),
        (f"{prefix}sent_ms", (5000).to_bytes(8, "little")),
        (f"{prefix}age_ms", (9 if prefix else 0).to_bytes(8, "little")),
        (f"{prefix}hosts", n.to_bytes(4, "little")),
        (f"{prefix}forgot", (0).to_bytes(4, "little")),
        (f"{prefix}children", children.to_bytes(4, "little")),
        (f"{prefix}ids_bytes", len(ids).to_bytes(4, "little")),
        (f"{prefix}ids", ids),
        (f"{prefix}attributes", b"\x00"),
        (f"{prefix}seqs", b"".join(seq.to_bytes(8, "little") for _, seq, _, _, _ in hosts)),
        (f"{prefix}ages", b"".join(age.to_bytes(8, "little") for _, _, age, _, _ in hosts)),
        (f"{prefix}intervals", b"".join(iv.to_bytes(4, "little") for _, _, _, iv, _ in hosts)),
        (f"{prefix}statuses", bytes(status for *_, status in hosts)),
    ]


def v2_fields() -> list[tuple[str, bytes]]:
    """A sound version 2 bundle (relay `evil` with one host and one child), field by field."""
    return [
        ("version", b"\x02"),
        ("flags", b"\x00"),
        *_v2_node_fields("", "evil", [("h", 1, 5, 1000, 0), ("h2", 2, 6, 1000, 1)], 1),
        *_v2_node_fields("child.", "c1", [("ch", 1, 5, 1000, 0)], 0),
    ]


_WIDTHS = {"seq": 8, "sent_ms": 8, "age_ms": 8, "flush_ms": 4, "hosts": 4, "forgot": 4, "children": 4, "ids_bytes": 4}


def _hostile_field(name: str) -> st.SearchStrategy[bytes]:
    field_name = name.rsplit(".", 1)[-1]
    width = _WIDTHS.get(field_name)
    anything = st.binary(max_size=24)
    if width is not None:
        edges = st.sampled_from([n % 2 ** (8 * width) for n in _U64_EDGES]).map(lambda n: n.to_bytes(width, "little"))
        return edges | st.binary(min_size=width, max_size=width) | anything
    if field_name in ("relay", "boot"):
        return st.builds(lambda text: bytes([len(text.encode()) % 256]) + text.encode(), hostile_ids) | anything
    if field_name == "ids":
        return st.lists(hostile_ids | valid_ids, min_size=1, max_size=3).map(lambda ids: "\0".join(ids).encode())
    if field_name in ("kind", "flags", "version", "statuses", "attributes"):
        return st.binary(min_size=1, max_size=3) | anything
    return anything


@st.composite
def _hostile_v2(draw: st.DrawFn) -> bytes:
    fields = v2_fields()
    names = [name for name, _ in fields]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        fields[names.index(name)] = (name, draw(_hostile_field(name)))
    payload = b"".join(raw for _, raw in fields)
    cut = draw(st.none() | st.integers(0, len(payload)))
    if cut is not None and draw(st.integers(0, 4)) == 0:
        payload = payload[:cut]
    if draw(st.integers(0, 4)) == 0:  # compressed, or claiming to be
        body = payload[2:]
        payload = b"\x02\x01" + (zlib.compress(body) if draw(st.booleans()) else body)
    return payload


hostile_v2_bundles = _hostile_v2()


# Indexed deltas (relay/compact.py), by the README's layout, with a writer of our own: a keyframe of
# ten hosts h0..h9 (relay `evil`, boot b1, seq 3), then the delta seq 4 that refers to it.


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


INDEXED_KEYFRAME_HOSTS = [(f"h{i}", 1, 0, 1000, 0) for i in range(10)]


def indexed_keyframe() -> bytes:
    return b"".join(raw for _, raw in [("version", b"\x02"), ("flags", b"\x00"),
                                        *_v2_node_fields("", "evil", INDEXED_KEYFRAME_HOSTS, 0)])  # fmt: skip


def _indexed_head(kind: int) -> list[tuple[str, bytes]]:
    """An indexed node's envelope and header: seq 4 of relay `evil`, boot b1, referring to the
    keyframe seq 3 and its table of ten."""
    return [
        ("version", b"\x02"),
        ("flags", b"\x00"),
        ("kind", bytes([kind])),
        ("relay", b"\x04evil"),
        ("boot", b"\x02b1"),
        ("seq", _varint(4)),
        ("flush_ms", _varint(1000)),
        ("sent_ms", _varint(6000)),
        ("keyframe", _varint(3)),
        ("table", _varint(10)),
    ]


def indexed_fields(kind: int = 6) -> list[tuple[str, bytes]]:
    """The delta: h1 and h3 heard (ordinary, ages 500 and 0 ms), h5 with a seq jump to 7, n1 new
    to the table, h9 and `old` forgotten, one child node in version 2's format. Kind 6: n1 joins
    the table (index 10), what relays send; kind 2: relays before that, the table stays."""
    child = _v2_node_fields("child.", "c1", [("ch", 1, 5, 1000, 0)], 0)
    return [
        *_indexed_head(kind),
        ("heard_form", b"\x00"),
        ("heard", bytes([0b1010, 0])),
        ("ages", bytes([128, 128])),  # ceil(500 × 255 / 1000) = 128, then 0 as its difference from 128 (mod 256)
        ("changed", _varint(1)),
        ("changes", _varint(5) + _varint(8) + _varint(20) + _varint(1000) + b"\x00"),
        ("new", _varint(1)),
        ("news", b"\x02n1" + _varint(0) + _varint(7) + _varint(2000) + b"\x01"),
        ("forgot", _varint(1)),
        ("forgotten", _varint(9)),
        ("forgot_new", _varint(1)),
        ("forgotten_new", b"\x03old"),
        ("watched_bytes", _varint(0)),
        ("watched", b""),
        ("children", _varint(1)),
        *child,
    ]


_VARINT_FIELDS = {"seq", "flush_ms", "sent_ms", "keyframe", "table", "changed", "new", "forgot", "forgot_new",
                  "children", "forgotten", "watched_bytes"}  # fmt: skip
_HUGE_VARINTS = [b"\xff" * 11 + b"\x01", b"\x80", b"\xff\xff"]  # over-long, truncated


def _hostile_indexed_field(name: str) -> st.SearchStrategy[bytes]:
    if name in _VARINT_FIELDS:
        edges = [*_U64_EDGES, 9, 10, 11, 200_000, 200_001]
        return st.sampled_from(edges).map(_varint) | st.sampled_from(_HUGE_VARINTS) | st.binary(max_size=12)
    if name.startswith("child."):
        return _hostile_field(name)
    if name in ("relay", "boot", "forgotten_new"):
        return st.builds(lambda text: bytes([len(text.encode()) % 256]) + text.encode(), hostile_ids) | st.binary(
            max_size=12
        )
    return st.binary(max_size=24)


@st.composite
def _hostile_indexed(
    draw: st.DrawFn,
    sound: Callable[[], list[tuple[str, bytes]]] = indexed_fields,
    hostile: Callable[[str], st.SearchStrategy[bytes]] = _hostile_indexed_field,
) -> bytes:
    fields = sound()
    names = [name for name, _ in fields]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        fields[names.index(name)] = (name, draw(hostile(name)))
    payload = b"".join(raw for _, raw in fields)
    if draw(st.integers(0, 4)) == 0:
        payload = payload[: draw(st.integers(0, len(payload)))]
    if draw(st.integers(0, 4)) == 0:  # compressed, or claiming to be
        payload = b"\x02\x01" + (zlib.compress(payload[2:]) if draw(st.booleans()) else payload[2:])
    return payload


hostile_indexed_deltas = _hostile_indexed()


def table_keyframe_fields() -> list[tuple[str, bytes]]:
    """A keyframe by table (kind 7) after `indexed_keyframe()`, seq 4: h0 (seq 1, 1,000 ms old), h1
    (seq 2: one step, 20 ms) and h2 (seq 1, 3,000 ms) ordinary; h5 changed (interval 2,000 ms); n2
    new to the table; h3, h4 and h6 to h9 not listed: gone."""
    return [
        *_indexed_head(7),
        ("listed_form", b"\x00"),  # a bitmap (2 bytes; runs would take 3)
        ("listed", bytes([0b111, 0])),
        ("steps", b"\x02"),  # h1's seq is the table's + 1
        ("ages", _varint(510) + _varint(497) + _varint(1518)),  # codes 255, 6, 765 as zigzag differences
        ("changed", _varint(1)),
        ("changes", _varint(5) + _varint(2) + _varint(0) + _varint(2000) + b"\x00"),
        ("new", _varint(1)),
        ("news", b"\x02n2" + _varint(0) + _varint(5) + _varint(1000) + b"\x00"),
        ("watched_bytes", _varint(0)),
        ("watched", b""),
        ("children", _varint(0)),
    ]


_TABLE_KEYFRAME_VARINTS = {"seq", "flush_ms", "sent_ms", "keyframe", "table", "changed", "new", "watched_bytes",
                           "children"}  # fmt: skip


def _hostile_table_keyframe_field(name: str) -> st.SearchStrategy[bytes]:
    if name in _TABLE_KEYFRAME_VARINTS or name == "ages":
        edges = [*_U64_EDGES, 9, 10, 11, 200_000, 200_001, 2 * 366 * 86_400 * 255 + 1]
        return st.sampled_from(edges).map(_varint) | st.sampled_from(_HUGE_VARINTS) | st.binary(max_size=12)
    return _hostile_indexed_field(name)


hostile_table_keyframes = _hostile_indexed(table_keyframe_fields, _hostile_table_keyframe_field)
