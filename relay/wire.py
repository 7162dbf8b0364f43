"""The wire contract: topics, beats and bundles. The README's table is generated from these rules.

Rules of this module:
- It does no I/O and reads no clock. Encoders return bytes; decoders take bytes.
- A decoder returns a value or raises `WireError(reason)`; never anything else. `reason` is a short
  fixed label that callers use as a counter key.
- Host and relay ids match `[A-Za-z0-9._-]{1,128}`, each one checked on its own: no NUL or other
  control character can reach a log line's id or a SQL row.
- Nothing here recurses into a decoded value of unknown shape: a beat's nesting is bounded (checked
  without recursion) before anything else looks at it, a bundle is read field by field with its relay
  tree bounded before each level, and error details describe values with `_shown` (bounded, never
  `str()` of a nested value).
- Times on the wire are durations (ages, intervals) in integer milliseconds, never wall-clock
  instants, so that no clock on a leaf or relay can make a host look alive.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from typing_extensions import TypeIs

from relaybeat.errors import RelaybeatError, SettingsError

if TYPE_CHECKING:  # numpy is the monitor's: a leaf or relay never loads it
    import numpy as np
    import numpy.typing as npt

FORMAT_VERSION = 1  # JSON: every bundle a keyframe (older relays; `relaybeat relay --format json`)
BINARY_VERSION = 2  # the compact binary encoding, with delta bundles (see "version 2" below)
DEFAULT_PREFIX = "relaybeat/"
DEFAULT_INTERVAL_S = 5.0
MIN_INTERVAL_MS = 10
MAX_INTERVAL_MS = 86_400_000  # one day
MAX_AGE_MS = 366 * 86_400_000  # a year: relays forget leaves long before that
MAX_SEQ = 2**63 - 1
MAX_BEAT_BYTES = 4096
MAX_META_BYTES = 1024
DEFAULT_MAX_BUNDLE_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_BUNDLE_ENTRIES = 200_000
MAX_TREE_DEPTH = 16
MAX_BEAT_DEPTH = 16  # objects and lists inside objects and lists, counting the beat itself

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_IDS = re.compile(r"[A-Za-z0-9._-]{1,128}(?:\x00[A-Za-z0-9._-]{1,128})*")  # ids joined by NUL
_PREFIX = re.compile(r"([A-Za-z0-9._-]+/)+\Z")


INTERNAL_ERROR = "internal_error"  # the reason a service counts a message under when handling it failed (a bug)


class WireError(RelaybeatError, ValueError):
    """Input that does not follow the wire contract. `reason` is a fixed label for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LeafStatus(StrEnum):
    OK = "ok"
    STOPPING = "stopping"


def is_valid_id(value: object) -> TypeIs[str]:
    return type(value) is str and _ID.fullmatch(value) is not None


def _all_valid_ids(ids: list[str]) -> bool:
    """Whether every one of these strings is an id, in one regex pass over them joined by NUL.

    Counting the NULs first is what makes the join safe: ids never contain NUL, so as many NULs as
    separators means no string brought its own, and the pattern then sees each string exactly."""
    joined = "\0".join(ids)
    return joined.count("\0") == len(ids) - 1 and _IDS.fullmatch(joined) is not None


def check_id(value: object, reason: str = "bad_id") -> str:
    if type(value) is not str or _ID.fullmatch(value) is None:
        raise WireError(reason, f"{_shown(value)} is not [A-Za-z0-9._-]{{1,128}}")
    return value


def _shown(value: object) -> str:
    """A short description of any decoded value for an error detail. Never `str()` or `repr()` of the
    whole value: a deeply nested one would recurse, a huge one would be slow."""
    if type(value) is str:
        return repr(value[:40]) + ("…" if len(value) > 40 else "")
    if type(value) is list:
        return f"a list of length {len(value)}"
    if type(value) is dict:
        return f"an object of {len(value)} keys"
    if type(value) is int and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit integer"
    if value is None or type(value) in (bool, int, float):
        return repr(value)
    return f"a {type(value).__name__}"


def _nesting_within(value: object, limit: int) -> bool:
    """Whether objects and lists nest at most `limit` deep in `value`; level by level, no recursion."""
    level: list[object] = [value]
    for _ in range(limit):
        inner: list[object] = []
        for item in level:
            if type(item) is dict:
                inner.extend(item.values())
            elif type(item) is list:
                inner.extend(item)
        if not inner:
            return True
        level = inner
    return not any(type(item) in (dict, list) for item in level)


def _strings(value: object) -> list[str]:
    """Every string in `value`, object keys included; without recursion."""
    found: list[str] = []
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        if type(item) is str:
            found.append(item)
        elif type(item) is dict:
            found.extend(item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return found


# --------------------------------------------------------------------------------------------- topics


class TopicKind(StrEnum):
    BEAT = "beat"
    BUNDLE = "bundle"
    RELAY_STATUS = "relay_status"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one prefix (default `relaybeat/`)."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            msg = f"topic prefix {self.prefix!r} must be path segments ending in '/'"
            raise SettingsError(msg)

    def beat(self, host: str) -> str:
        return f"{self.prefix}beat/{host}"

    def bundle(self, relay: str) -> str:
        return f"{self.prefix}bundle/{relay}"

    def relay_status(self, relay: str) -> str:
        return f"{self.prefix}relay/{relay}/status"

    def relay_resync(self, relay: str) -> str:
        """Where the monitor asks a relay for a keyframe (it missed one of its delta bundles)."""
        return f"{self.prefix}relay/{relay}/resync"

    @property
    def all_beats(self) -> str:
        return f"{self.prefix}beat/+"

    @property
    def all_bundles(self) -> str:
        return f"{self.prefix}bundle/+"

    @property
    def all_relay_statuses(self) -> str:
        return f"{self.prefix}relay/+/status"

    def parse(self, topic: str) -> tuple[TopicKind, str]:
        """Which kind of topic this is and whose id it names; WireError('bad_topic') otherwise."""
        if not topic.startswith(self.prefix):
            msg = "bad_topic"
            raise WireError(msg, topic[:80])
        parts = topic[len(self.prefix) :].split("/")
        if len(parts) == 2 and parts[0] == "beat":
            return TopicKind.BEAT, check_id(parts[1], "bad_topic")
        if len(parts) == 2 and parts[0] == "bundle":
            return TopicKind.BUNDLE, check_id(parts[1], "bad_topic")
        if len(parts) == 3 and parts[0] == "relay" and parts[2] == "status":
            return TopicKind.RELAY_STATUS, check_id(parts[1], "bad_topic")
        msg = "bad_topic"
        raise WireError(msg, topic[:80])


# ---------------------------------------------------------------------------------------------- beats


@dataclass(frozen=True, slots=True)
class Beat:
    """One heartbeat from a leaf. Every field is optional on the wire; an empty payload is a beat."""

    seq: int | None = None
    interval_s: float | None = None
    status: LeafStatus = LeafStatus.OK
    meta: dict[str, Any] | None = None


def encode_beat(beat: Beat) -> bytes:
    body: dict[str, Any] = {}
    if beat.seq is not None:
        body["seq"] = beat.seq
    if beat.interval_s is not None:
        body["interval"] = beat.interval_s
    if beat.status is not LeafStatus.OK:
        body["status"] = beat.status.value
    if beat.meta is not None:
        body["meta"] = beat.meta
    return orjson.dumps(body) if body else b""


def _loads(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        msg = "too_large"
        raise WireError(msg, f"{len(payload)} bytes > {max_bytes}")
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        msg = "bad_json"
        raise WireError(msg, str(exc)[:80]) from None


def _seq(value: object, reason: str = "bad_seq") -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise WireError(reason, f"{_shown(value)} is not an integer in [0, 2^63)")
    return value


def _interval_s(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):  # type: ignore[arg-type]
        msg = "bad_interval"
        raise WireError(msg, f"{_shown(value)} is not a number")
    seconds = float(value)  # type: ignore[arg-type]
    if not MIN_INTERVAL_MS <= seconds * 1000 <= MAX_INTERVAL_MS:
        msg = "bad_interval"
        raise WireError(msg, f"{seconds} s is outside [0.01, 86400]")
    return seconds


# The beat `relaybeat leaf` sends (orjson's spelling, `{"seq":N,"interval":S}`), read without the JSON
# parser: the relay reads one per leaf per interval. Anything else takes the general path, which
# decides the same (tests/test_receive_path.py checks that the two agree).
_PLAIN_BEAT = re.compile(rb'\{"seq":(0|[1-9][0-9]{0,17}),"interval":((?:0|[1-9][0-9]{0,5})(?:\.[0-9]{1,17})?)\}')


def decode_beat(payload: bytes, max_bytes: int = MAX_BEAT_BYTES) -> Beat:
    """An empty payload or a JSON object with optional seq, interval, status, meta."""
    plain = _PLAIN_BEAT.fullmatch(payload) if len(payload) <= max_bytes else None
    if plain is not None:
        return Beat(seq=int(plain[1]), interval_s=_interval_s(float(plain[2])))
    if not payload.strip():
        return Beat()
    body = _loads(payload, max_bytes)
    if not isinstance(body, dict):
        msg = "bad_beat"
        raise WireError(msg, "payload is neither empty nor a JSON object")
    if not _nesting_within(body, MAX_BEAT_DEPTH):
        msg = "too_deep"
        raise WireError(msg, f"objects and lists nested deeper than {MAX_BEAT_DEPTH}")
    seq = body.get("seq")
    interval = body.get("interval")
    status = body.get("status", "ok")
    meta = body.get("meta")
    if status not in ("ok", "stopping"):
        msg = "bad_status"
        raise WireError(msg, f"{_shown(status)} is not 'ok' or 'stopping'")
    if meta is not None:
        if not isinstance(meta, dict):
            msg = "bad_meta"
            raise WireError(msg, "meta is not an object")
        if len(orjson.dumps(meta)) > MAX_META_BYTES:
            msg = "bad_meta"
            raise WireError(msg, f"meta is larger than {MAX_META_BYTES} bytes")
        if any("\0" in text for text in _strings(meta)):
            msg = "bad_meta"
            raise WireError(msg, "meta contains a NUL character")
    return Beat(
        seq=None if seq is None else _seq(seq),
        interval_s=None if interval is None else _interval_s(interval),
        status=LeafStatus(status),
        meta=meta,
    )


# -------------------------------------------------------------------------------------------- bundles


class Vouch(StrEnum):
    """What a relay says of a device it watches (an availability topic, not beats)."""

    UP = "up"
    DOWN = "down"
    UNREACHABLE = "unreachable"  # its bridge or Sparkplug node, through which it is heard, is gone


class WatchedEntry(NamedTuple):
    """A device a relay vouches for from a watched source. On the wire: `[id, state, age_ms, source, reason]`.

    `age_ms`: for `up`, the age of the evidence (0 while the device's session holds, i.e. its Last Will
    has not fired); for `down` and `unreachable`, how long ago the source said so. `reason` is what
    the source said (`tele/plug-2/LWT said Offline`), shown after the source's name."""

    id: str
    state: Vouch
    age_ms: int
    source: str
    reason: str


MAX_REASON_CHARS = 200
_REASON = re.compile(rf"[^\x00-\x1f\x7f-\x9f]{{1,{MAX_REASON_CHARS}}}")  # printable: no control character


class HostEntry(NamedTuple):
    """What a relay knows of one leaf at send time. On the wire: `[id, seq, age_ms, interval_ms, status]`."""

    id: str
    seq: int | None
    age_ms: int
    interval_ms: int
    status: LeafStatus


@dataclass(frozen=True, slots=True, eq=False)
class Beats:
    """The ordinary news of an indexed delta, by column (`BundleDecoder(columnar=True)`, the monitor's).

    Row k is the leaf `ids[index[k]]`: its new `seq` (-1: none), `age_ms`, `interval_ms` and status
    code (`status`, 0 ok, 1 stopping). `ids` is the sending relay's id table: the decoder hands out
    the same tuple object until that table changes, so a receiver may key a cache on its identity.
    `index` ascends and names no leaf twice; no leaf here is also in the bundle's `hosts`."""

    ids: tuple[str, ...]
    index: npt.NDArray[np.int64]
    seq: npt.NDArray[np.int64]
    age_ms: npt.NDArray[np.int64]
    interval_ms: npt.NDArray[np.int64]
    status: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.index)

    def entries(self) -> Iterator[HostEntry]:
        """The same news as HostEntry records (for code that reads bundles one entry at a time)."""
        ids, status_of = self.ids, _STATUS_OF
        columns = (self.index.tolist(), self.seq.tolist(), self.age_ms.tolist(), self.interval_ms.tolist())
        for i, seq, age, interval, status in zip(*columns, self.status.tolist(), strict=True):
            yield HostEntry(ids[i], None if seq < 0 else seq, age, interval, status_of[status])


@dataclass(frozen=True, slots=True)
class Bundle:
    """Everything one relay heard, assembled into one message.

    `children` are bundles of relays below this one, folded in as received; `age_ms` is how old a
    child bundle was when its parent sent it (0 for the outermost bundle). Ages of hosts inside a
    child count from the child's own send time, so a host's age at the top is the sum along its path.

    A `keyframe` lists every leaf the relay knows; a delta (`keyframe=False`, version 2 only) lists
    the leaves with news since the relay's previous bundle (`seq - 1`) and the ids (of leaves and
    child relays) it `forgot`. A host a bundle does not mention keeps the evidence it had. `sent_ms`
    is the relay's monotonic send time since its boot (version 2; None from version 1).
    """

    relay: str
    boot: str
    seq: int
    flush_ms: int
    hosts: tuple[HostEntry, ...] = ()
    children: tuple[Bundle, ...] = ()
    age_ms: int = 0
    watched: tuple[WatchedEntry, ...] = ()  # devices the relay vouches for from availability topics
    version: int = field(default=FORMAT_VERSION)
    keyframe: bool = True
    forgot: tuple[str, ...] = ()
    sent_ms: int | None = None
    beats: Beats | None = None  # ordinary news by column (the monitor's decoder); `hosts` holds the rest

    def entry_count(self) -> int:
        own = len(self.hosts) + len(self.forgot) + len(self.watched) + (len(self.beats) if self.beats else 0)
        return own + sum(child.entry_count() for child in self.children)


def _bundle_body(bundle: Bundle) -> dict[str, Any]:
    body: dict[str, Any] = {
        "relay": bundle.relay,
        "boot": bundle.boot,
        "seq": bundle.seq,
        "flush_ms": bundle.flush_ms,
        "hosts": [list(entry) for entry in bundle.hosts],
    }
    if bundle.children:
        body["children"] = [_bundle_body(child) | {"age_ms": child.age_ms} for child in bundle.children]
    if bundle.watched:
        body["watched"] = [list(entry) for entry in bundle.watched]
    return body


def encode_bundle(bundle: Bundle) -> bytes:
    """In the bundle's `version`: 1 (JSON, keyframes only) or 2 (binary)."""
    if bundle.version == BINARY_VERSION:
        return encode_bundle_v2(bundle)
    if not _all_keyframes(bundle):
        msg = "version 1 carries keyframes only"
        raise ValueError(msg)
    return orjson.dumps({"v": bundle.version} | _bundle_body(bundle))


def _all_keyframes(bundle: Bundle) -> bool:
    return bundle.keyframe and not bundle.forgot and all(_all_keyframes(child) for child in bundle.children)


def _age_ms(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_AGE_MS:
        msg = "bad_age"
        raise WireError(msg, f"{_shown(value)} is not an integer in [0, {MAX_AGE_MS}] ms")
    return value


def _interval_ms(value: object) -> int:
    if type(value) is not int or not MIN_INTERVAL_MS <= value <= MAX_INTERVAL_MS:
        msg = "bad_interval"
        raise WireError(msg, f"{_shown(value)} is not an integer in [10, 86400000] ms")
    return value


_STATUSES = {"ok": LeafStatus.OK, "stopping": LeafStatus.STOPPING}


def _host_entry(raw: object) -> HostEntry:
    if type(raw) is not list or len(raw) != 5:
        msg = "bad_entry"
        raise WireError(msg, "a host entry is [id, seq, age_ms, interval_ms, status]")
    host, seq, age, interval, status = raw
    check_id(host)
    try:
        status_value = _STATUSES[status]
    except (KeyError, TypeError):
        msg = "bad_status"
        raise WireError(msg, f"{_shown(status)} is not 'ok' or 'stopping'") from None
    return HostEntry(host, None if seq is None else _seq(seq), _age_ms(age), _interval_ms(interval), status_value)


def _host_entries(raw_hosts: list[Any]) -> tuple[HostEntry, ...]:
    """The monitor's hot loop: inline type and range checks, every id checked by one regex pass over
    them all (`_all_valid_ids`), and each entry made from the decoded list without copying. Any doubt goes to
    `_host_entry`, which raises the precise WireError. (Decoded entries carry the status as the
    plain string, equal to the LeafStatus member.)"""
    entries: list[HostEntry] = []
    append = entries.append
    statuses = _STATUSES
    make = tuple.__new__
    for raw in raw_hosts:
        if type(raw) is list and len(raw) == 5:
            host, seq, age, interval, status = raw
            if (
                type(host) is str
                and type(age) is int
                and type(interval) is int
                and type(status) is str
                and (seq is None or (type(seq) is int and 0 <= seq <= MAX_SEQ))
                and 0 <= age <= MAX_AGE_MS
                and MIN_INTERVAL_MS <= interval <= MAX_INTERVAL_MS
                and status in statuses
            ):
                append(make(HostEntry, raw))
                continue
        append(_host_entry(raw))
    if entries and not _all_valid_ids([entry[0] for entry in entries]):
        for entry in entries:
            _host_entry(list(entry))  # raises for the first bad id
    return tuple(entries)


_VOUCHES = {vouch.value: vouch for vouch in Vouch}


def _watched_entry(raw: object) -> WatchedEntry:
    if type(raw) is not list or len(raw) != 5:
        msg = "bad_entry"
        raise WireError(msg, "a watched entry is [id, state, age_ms, source, reason]")
    host, state, age, source, reason = raw
    if type(state) is not str or state not in _VOUCHES:
        msg = "bad_status"
        raise WireError(msg, f"{_shown(state)} is not 'up', 'down' or 'unreachable'")
    if type(reason) is not str or _REASON.fullmatch(reason) is None:
        msg = "bad_reason"
        raise WireError(msg, f"{_shown(reason)} is not 1 to {MAX_REASON_CHARS} printable characters")
    return WatchedEntry(check_id(host), _VOUCHES[state], _age_ms(age), check_id(source), reason)


def _bundle(body: object, depth: int, budget: list[int]) -> Bundle:
    if not isinstance(body, dict):
        msg = "bad_bundle"
        raise WireError(msg, "a bundle is a JSON object")
    if depth > MAX_TREE_DEPTH:
        msg = "too_deep"
        raise WireError(msg, f"relay tree deeper than {MAX_TREE_DEPTH}")
    try:
        relay, boot, seq, flush_ms, hosts = (body[k] for k in ("relay", "boot", "seq", "flush_ms", "hosts"))
    except KeyError as missing:
        msg = "bad_bundle"
        raise WireError(msg, f"missing field {missing}") from None
    children = body.get("children", [])
    watched = body.get("watched", [])
    if type(hosts) is not list or type(children) is not list or type(watched) is not list:
        msg = "bad_bundle"
        raise WireError(msg, "hosts, children and watched are lists")
    budget[0] -= len(hosts) + len(children) + len(watched)
    if budget[0] < 0:
        msg = "too_many_entries"
        raise WireError(msg, "bundle has more entries than the configured limit")
    return Bundle(
        relay=check_id(relay),
        boot=check_id(boot, "bad_boot"),
        seq=_seq(seq),
        flush_ms=_interval_ms(flush_ms),
        hosts=_host_entries(hosts),
        children=tuple(_bundle(child, depth + 1, budget) for child in children),
        age_ms=_age_ms(body["age_ms"]) if depth > 0 else 0,
        watched=tuple(_watched_entry(raw) for raw in watched),
    )


def decode_bundle(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
) -> Bundle:
    """Either version: a payload starting with the byte 2 is binary (JSON never does)."""
    if payload[:1] == _V2:
        return decode_bundle_v2(payload, max_bytes, max_entries)
    body = _loads(payload, max_bytes)
    if not isinstance(body, dict):
        msg = "bad_bundle"
        raise WireError(msg, "a bundle is a JSON object")
    version = body.get("v")
    if type(version) is not int or version != FORMAT_VERSION:  # by type too: `true` and `1.0` are not 1
        msg = "unknown_version"
        raise WireError(msg, f"format version {_shown(version)}, this side speaks 1")
    if "age_ms" in body:
        msg = "bad_bundle"
        raise WireError(msg, "age_ms belongs to child bundles only")
    try:
        return _bundle(body, 0, [max_entries])
    except KeyError:
        msg = "bad_bundle"
        raise WireError(msg, "child bundle without age_ms") from None


# ----------------------------------------------------------------------------- bundles, version 2
#
# Binary, little-endian, columnar (README "Wire contract" documents it byte by byte):
#
#   message := version u8 (= 2) | flags u8 (bit 0: the rest is zlib-compressed; others 0) | node
#   node    := kind u8 (bit 0: keyframe; others 0) | relay: u8 length + ASCII | boot: u8 length + ASCII
#              | seq u64 | flush_ms u32 | sent_ms u64 (2^64-1: unknown) | age_ms u64 (0 at the top)
#              | hosts u32 | forgot u32 | children u32 | ids_bytes u32 | ids: the hosts' ids then the
#              forgotten ids, joined by NUL | attributes u8 (count), each: kind u8 | length u32 | bytes
#              (kind 1: the watched devices, a JSON list as version 1's `watched`; other kinds are
#              skipped by readers) | seq u64[hosts] (2^64-1: none)
#              | age_ms u64[hosts] | interval_ms u32[hosts] | status u8[hosts] | children × node
#
# Fixed-width columns decode at C speed (`struct`), and compress to almost nothing where they
# repeat (intervals, statuses, high bytes); compression is used only when it saves a tenth.

_V2 = bytes([BINARY_VERSION])
_NONE64 = 2**64 - 1
_HEAD = struct.Struct("<QIQQIIII")  # seq, flush_ms, sent_ms, age_ms, hosts, forgot, children, ids_bytes
_ATTR = struct.Struct("<BI")
_ATTR_WATCHED = 1
_KEYFRAME = 1
_COMPRESSED = 1
_COMPRESS_FROM = 512  # bytes of body below which compression never pays
# Status bytes: 0 ok, 1 stopping; 2-255 reserved (e.g. a watched device reported down). Unknown: bad_status.
_STATUS_CODES = {LeafStatus.OK: 0, LeafStatus.STOPPING: 1}
_STATUS_OF = (LeafStatus.OK, LeafStatus.STOPPING)


def encode_bundle_v2(bundle: Bundle) -> bytes:
    body = bytearray()
    _node_v2(bundle, body)
    return _envelope_v2(body, _COMPRESS_FROM)


def _envelope_v2(body: bytearray, compress_from: int) -> bytes:
    """Version 2's envelope around a node: compressed where that saves a tenth (bodies of at least
    `compress_from` bytes; below, compression never pays)."""
    if len(body) >= compress_from:
        packed = zlib.compress(body, 1)
        if len(packed) * 10 < len(body) * 9:
            return _V2 + bytes([_COMPRESSED]) + packed
    return _V2 + b"\0" + bytes(body)


def _node_v2(bundle: Bundle, out: bytearray) -> None:
    n = len(bundle.hosts)
    ids = "\0".join([*(entry[0] for entry in bundle.hosts), *bundle.forgot]).encode("ascii")
    relay, boot = bundle.relay.encode("ascii"), bundle.boot.encode("ascii")
    out += bytes([_KEYFRAME if bundle.keyframe else 0, len(relay)]) + relay + bytes([len(boot)]) + boot
    sent = _NONE64 if bundle.sent_ms is None else bundle.sent_ms
    out += _HEAD.pack(
        bundle.seq, bundle.flush_ms, sent, bundle.age_ms, n, len(bundle.forgot), len(bundle.children), len(ids)
    )
    out += ids
    if bundle.watched:
        watched = watched_json(bundle)
        out.append(1)
        out += _ATTR.pack(_ATTR_WATCHED, len(watched)) + watched
    else:
        out.append(0)  # no attributes
    if n:
        out += struct.pack(f"<{n}Q", *(_NONE64 if entry[1] is None else entry[1] for entry in bundle.hosts))
        out += struct.pack(f"<{n}Q", *(entry[2] for entry in bundle.hosts))
        out += struct.pack(f"<{n}I", *(entry[3] for entry in bundle.hosts))
        out += bytes(_STATUS_CODES[LeafStatus(entry[4])] for entry in bundle.hosts)
    for child in bundle.children:
        _node_v2(child, out)


def decode_bundle_v2(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
) -> Bundle:
    if len(payload) > max_bytes:
        msg = "too_large"
        raise WireError(msg, f"{len(payload)} bytes > {max_bytes}")
    if payload[:1] != _V2:
        msg = "unknown_version"
        raise WireError(msg, "a binary bundle starts with the byte 2")
    if len(payload) < 2 or payload[1] & ~_COMPRESSED:
        msg = "bad_bundle"
        raise WireError(msg, "a binary bundle's flags are 0 or 1")
    body = memoryview(payload)[2:]
    if payload[1] & _COMPRESSED:
        body = memoryview(_inflate(body, max_bytes))
    reader = _Reader(body)
    bundle = reader.node(0, [max_entries])
    if reader.at != len(body):
        msg = "bad_bundle"
        raise WireError(msg, f"{len(body) - reader.at} bytes after the bundle")
    if bundle.age_ms:
        msg = "bad_bundle"
        raise WireError(msg, "age_ms belongs to child bundles only")
    return bundle


def _inflate(data: memoryview, max_bytes: int) -> bytes:
    """At most `max_bytes` out of any input (no decompression bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        msg = "bad_bundle"
        raise WireError(msg, f"compressed body: {str(exc)[:60]}") from None
    if len(out) > max_bytes:
        msg = "too_large"
        raise WireError(msg, f"more than {max_bytes} bytes once decompressed")
    if not inflater.eof or inflater.unused_data:
        msg = "bad_bundle"
        raise WireError(msg, "compressed body is truncated or followed by other bytes")
    return out


class _Reader:
    """Reads nodes from a version 2 body; every length is checked against what is left."""

    __slots__ = ("at", "data")

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0

    def take(self, size: int) -> memoryview:
        end = self.at + size
        if end > len(self.data):
            msg = "bad_bundle"
            raise WireError(msg, "truncated")
        chunk = self.data[self.at : end]
        self.at = end
        return chunk

    def short_id(self, reason: str) -> str:
        size = self.take(1)[0]
        raw = bytes(self.take(size))
        text = raw.decode("ascii", "replace")
        return check_id(text, reason)

    def node(self, depth: int, budget: list[int]) -> Bundle:
        if depth > MAX_TREE_DEPTH:
            msg = "too_deep"
            raise WireError(msg, f"relay tree deeper than {MAX_TREE_DEPTH}")
        kind = self.take(1)[0]
        if kind & ~_KEYFRAME:
            msg = "bad_bundle"
            raise WireError(msg, f"node kind {kind}: only bit 0 (keyframe) is defined")
        relay = self.short_id("bad_id")
        boot = self.short_id("bad_boot")
        seq, flush_ms, sent_ms, age_ms, n, n_forgot, n_children, ids_bytes = _HEAD.unpack(self.take(_HEAD.size))
        budget[0] -= n + n_forgot + n_children
        if budget[0] < 0:
            msg = "too_many_entries"
            raise WireError(msg, "bundle has more entries than the configured limit")
        ids = _ids_v2(self.take(ids_bytes), n + n_forgot)
        watched: tuple[WatchedEntry, ...] = ()
        for _ in range(self.take(1)[0]):  # attributes: the watched devices; other kinds skipped
            attribute, size = _ATTR.unpack(self.take(_ATTR.size))
            value = self.take(size)
            if attribute == _ATTR_WATCHED:
                if watched:
                    msg = "bad_bundle"
                    raise WireError(msg, "two watched attributes in one node")
                watched = _watched_v2(value, budget)
        hosts: tuple[HostEntry, ...] = ()
        if n:
            seqs = struct.unpack(f"<{n}Q", self.take(8 * n))
            ages = struct.unpack(f"<{n}Q", self.take(8 * n))
            intervals = struct.unpack(f"<{n}I", self.take(4 * n))
            statuses = bytes(self.take(n))
            hosts = _entries_v2(ids[:n], seqs, ages, intervals, statuses)
        children = tuple(self.node(depth + 1, budget) for _ in range(n_children))
        return Bundle(
            relay=relay,
            boot=boot,
            seq=_seq(seq),
            flush_ms=_interval_ms(flush_ms),
            hosts=hosts,
            children=children,
            age_ms=_age_ms(age_ms),
            version=BINARY_VERSION,
            keyframe=bool(kind & _KEYFRAME),
            forgot=tuple(ids[n:]),
            sent_ms=None if sent_ms == _NONE64 else _seq(sent_ms, "bad_age"),
            watched=watched,
        )


def watched_json(bundle: Bundle) -> bytes:
    """Version 2's watched devices (node attribute, indexed deltas): the JSON list version 1 carries."""
    return orjson.dumps([list(entry) for entry in bundle.watched])


def _watched_v2(raw: memoryview, budget: list[int]) -> tuple[WatchedEntry, ...]:
    """Version 2's watched attribute: the JSON list version 1 carries, read with the same checks."""
    try:
        entries = orjson.loads(raw)
    except orjson.JSONDecodeError:
        msg = "bad_json"
        raise WireError(msg, "the watched attribute is not JSON") from None
    if type(entries) is not list or not entries:
        msg = "bad_bundle"
        raise WireError(msg, "the watched attribute is a non-empty list")
    budget[0] -= len(entries)
    if budget[0] < 0:
        msg = "too_many_entries"
        raise WireError(msg, "bundle has more entries than the configured limit")
    return tuple(_watched_entry(entry) for entry in entries)


def _ids_v2(raw: memoryview, count: int) -> list[str]:
    if not count:
        if raw:
            msg = "bad_bundle"
            raise WireError(msg, "ids without entries")
        return []
    text = bytes(raw).decode("ascii", "replace")
    ids = text.split("\0")
    if len(ids) != count or not _all_valid_ids(ids):
        for host in ids:
            check_id(host)
        msg = "bad_entry"
        raise WireError(msg, f"{len(ids)} ids for {count} entries")
    return ids


def _entries_v2(
    ids: list[str], seqs: tuple[int, ...], ages: tuple[int, ...], intervals: tuple[int, ...], statuses: bytes
) -> tuple[HostEntry, ...]:
    """Range checks per column (C speed), then one tuple per entry."""
    if max(ages) > MAX_AGE_MS:
        msg = "bad_age"
        raise WireError(msg, f"an age above {MAX_AGE_MS} ms")
    if min(intervals) < MIN_INTERVAL_MS or max(intervals) > MAX_INTERVAL_MS:
        msg = "bad_interval"
        raise WireError(msg, "an interval outside [10, 86400000] ms")
    if max(statuses) >= len(_STATUS_OF):
        msg = "bad_status"
        raise WireError(msg, f"status byte {max(statuses)} is reserved")
    if max(seqs) > MAX_SEQ:
        seqs = tuple(None if seq == _NONE64 else _seq(seq) for seq in seqs)  # type: ignore[misc]
    make, status_of = tuple.__new__, _STATUS_OF
    return tuple(
        [
            make(HostEntry, (host, seq, age, interval, status_of[status]))
            for host, seq, age, interval, status in zip(ids, seqs, ages, intervals, statuses, strict=True)
        ]
    )


# ---------------------------------------------------------------------------------- relay presence

ONLINE = b"online"
OFFLINE = b"offline"  # the relay's Last Will: it went away without saying so
STOPPED = b"stopped"  # published by the relay itself on a clean stop (SIGTERM), replacing the will
MAX_SESSION = 2**53  # a presence's session number: an integer below this


class RelayStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Presence:
    """A relay presence message: `online`, `offline` (its Last Will) or `stopped` (a clean stop), and,
    from relays that say so, which of their upstream sessions it is about: `<status> <boot> <session>`,
    the session numbered from 1 at each boot (as Sparkplug B's bdSeq). A will whose session is older
    than one the same boot already said `online` for is stale: a connection the relay gave up on that
    a broker let go only later (a NATS node, once its JetStream answered)."""

    status: RelayStatus
    boot: str | None = None
    session: int | None = None

    def encode(self) -> bytes:
        if self.boot is None or self.session is None:
            return self.status.value.encode()
        return f"{self.status.value} {self.boot} {self.session}".encode()


def decode_relay_status(payload: bytes) -> Presence:
    """A presence: a status alone, or a status, a boot (an id: 1-128 of A-Z a-z 0-9 . _ -) and a session
    (an integer from 1 to 2**53 - 1), space-separated; anything else is `bad_status`."""
    try:
        fields = payload.decode("ascii").split(" ")
        status = RelayStatus(fields[0])
        if len(fields) == 1:
            return Presence(status)
        boot, session = fields[1:]
        number = int(session)
        if not (_ID.fullmatch(boot) and session.isdigit() and 0 < number < MAX_SESSION):
            raise ValueError(session)
    except (UnicodeDecodeError, ValueError):
        msg = "bad_status"
        raise WireError(msg, payload[:40].decode("utf-8", "replace")) from None
    return Presence(status, boot, number)
