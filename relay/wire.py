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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import orjson
from typing_extensions import TypeIs

from relaybeat.errors import RelaybeatError, SettingsError

FORMAT_VERSION = 1
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


class HostEntry(NamedTuple):
    """What a relay knows of one leaf at send time. On the wire: `[id, seq, age_ms, interval_ms, status]`."""

    id: str
    seq: int | None
    age_ms: int
    interval_ms: int
    status: LeafStatus


@dataclass(frozen=True, slots=True)
class Bundle:
    """Everything one relay heard, assembled into one message.

    `children` are bundles of relays below this one, folded in as received; `age_ms` is how old a
    child bundle was when its parent sent it (0 for the outermost bundle). Ages of hosts inside a
    child count from the child's own send time, so a host's age at the top is the sum along its path.
    """

    relay: str
    boot: str
    seq: int
    flush_ms: int
    hosts: tuple[HostEntry, ...] = ()
    children: tuple[Bundle, ...] = ()
    age_ms: int = 0
    version: int = field(default=FORMAT_VERSION)

    def entry_count(self) -> int:
        return len(self.hosts) + sum(child.entry_count() for child in self.children)


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
    return body


def encode_bundle(bundle: Bundle) -> bytes:
    return orjson.dumps({"v": bundle.version} | _bundle_body(bundle))


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
    if type(hosts) is not list or type(children) is not list:
        msg = "bad_bundle"
        raise WireError(msg, "hosts and children are lists")
    budget[0] -= len(hosts) + len(children)
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
    )


def decode_bundle(
    payload: bytes,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    max_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
) -> Bundle:
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


# ---------------------------------------------------------------------------------- relay presence

ONLINE = b"online"
OFFLINE = b"offline"


def decode_relay_status(payload: bytes) -> bool:
    """True for `online`, False for `offline` (the relay's Last Will)."""
    if payload == ONLINE:
        return True
    if payload == OFFLINE:
        return False
    msg = "bad_status"
    raise WireError(msg, payload[:40].decode("utf-8", "replace"))
