"""Indexed deltas: version 2 delta bundles by index into the relay's last keyframe, a few bits per beat.

A keyframe (version 2, as in relay/wire.py) carries every leaf's id once. Both ends of one bundle
stream remember that keyframe's id table (index = position in it) and, per index, the last seq,
interval and status sent. A delta then needs per leaf heard only one bit of a bitmap (or a varint
index gap, or a share of a run of indices: whichever form is smallest for the bundle; keyframes list
leaves in phase order, so those heard in one flush form runs) and one age byte, when its news is
*ordinary*: seq = the last one + 1 (or none then and now), same interval, same status, age at most
`flush_ms`. Anything else is an explicit exception: by index (seq jumped, interval or status
changed, an age above the flush) or by id (a leaf new to the table). Forgotten leaves go by
index, or by id if new to the table. A leaf sent by id joins the table at its end (kind bit
`GROWS`, which the encoder always sets): its id crosses once, and its next beats are ordinary.
Deltas without that bit (relays before it) leave the table as their keyframe made it.

Keyframes carry every id at least every `FULL_EVERY`-th time, when the deltas grew with the leaves'
drift out of phase order by more than the ids cost, when `send_ids()` says someone lacks the table
(a keyframe request, a reconnect), and after a gap in the stream; the others go *by table*
(kind `TABLE_KEYFRAME`): every leaf by index, ordinary ones (same interval and status, seq the same
or the next) as a step bit and an age code of any size; the rest as in a delta. A receiver without
the table reads one as `KeyframeMissing`, as it reads a delta it cannot expand.

Rules of this module:
- Pure and synchronous; no I/O, no clock. `BundleEncoder` (relay side, one per upstream stream) and
  `BundleDecoder` (the receiving side: one per process, one state per sending relay) are stateful
  mirrors of each other. Both forget everything of a stream at its next keyframe; in between,
  each delta moves both tables the same way (the decoder's only once the whole delta is read).
- An ordinary age is sent as `c = ceil(age_ms × 255 / flush_ms)` and read back as
  `floor(c × flush_ms / 255)`: never younger than it was, at most flush_ms/255 older (4 ms at a 1 s
  flush). A beat read as older than it was moves its deadline earlier, never later: the monitor can
  be early by 4 ms, but never believes evidence that did not exist.
- The decoder raises nothing but `WireError`. A delta it cannot expand (it lacks the keyframe the
  delta refers to: a new boot, a missed bundle, a restarted receiver) raises `KeyframeMissing`, whose
  `header` (the bundle without its news) lets the receiver keep the relay alive and ask for a keyframe.
- Only the top node is indexed; child relays' nodes inside it keep version 2's node format.
- `BundleDecoder(columnar=True)` (the monitor's) reads the same bytes with the same checks and the
  same errors, but returns a delta's ordinary news as columns (`Bundle.beats`, numpy arrays) and only
  the exceptions as `HostEntry` records; its tables keep their columns as numpy arrays. numpy is
  imported only there: a relay, which decodes its children's bundles entry by entry, never loads it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from relaybeat.relay.wire import (
    _COMPRESSED,
    _STATUS_CODES,
    _STATUS_OF,
    _V2,
    BINARY_VERSION,
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_MAX_BUNDLE_ENTRIES,
    MAX_AGE_MS,
    MAX_INTERVAL_MS,
    MAX_SEQ,
    MIN_INTERVAL_MS,
    Beats,
    Bundle,
    HostEntry,
    LeafStatus,
    WatchedEntry,
    WireError,
    _envelope_v2,
    _inflate,
    _node_v2,
    _Reader,
    _watched_v2,
    decode_bundle,
    encode_bundle,
    watched_json,
)

if TYPE_CHECKING:  # numpy is the monitor's (the columnar decoder imports it when made): a relay never loads it
    import numpy as np
    import numpy.typing as npt

__all__ = ["INDEXED", "BundleDecoder", "BundleEncoder", "KeyframeMissing"]

INDEXED = 2  # node kind bit 1: an indexed delta (the node layout below)
GROWS = 4  # node kind bit 2 (with bit 1): the delta's leaves new to the table join it
TABLE_KEYFRAME = INDEXED | GROWS | 1  # a keyframe by the table: every leaf by index, no ids (kind 7)
FULL_EVERY = 10  # every tenth keyframe carries its ids (in fresh phase order); the nine between go by table
BITMAP, INDEX_LIST, RUNS = 0, 1, 2  # how the ordinary leaves heard are listed
AGE_STEPS = 255  # an ordinary age byte counts flush_ms / 255
COMPRESS_FROM = 128  # bytes of an indexed node below which compression never pays
MAX_RELAYS = 100_000  # relay streams a decoder keeps state for (the least recently heard go first)
_GONE = -2  # a table index whose leaf was forgotten since the keyframe
_NONE = -1  # a seq the leaf did not send


class KeyframeMissing(WireError):
    """An indexed delta whose keyframe this decoder lacks. `header`: the bundle without its news."""

    def __init__(self, header: Bundle, detail: str) -> None:
        super().__init__("need_keyframe", detail)
        self.header = header


@dataclass(slots=True)
class _Table:
    """One stream's mirror: its last keyframe's ids (index order) and per index the last seq
    (_NONE: none; _GONE: forgotten), interval and status code sent."""

    boot: str
    keyframe: int  # the seq of the keyframe the table is of
    seq: int  # the last bundle seq applied
    ids: list[str]
    seqs: list[int]
    intervals: list[int]
    statuses: list[int]
    index: dict[str, int] = field(default_factory=dict)  # id -> index (the encoder keeps it; decoders build it at need)
    columns: _Columns | None = None  # a columnar decoder's: the columns as numpy arrays (then the lists are empty)

    def copy(self) -> _Table:
        return _Table(
            self.boot,
            self.keyframe,
            self.seq,
            list(self.ids),
            list(self.seqs),
            list(self.intervals),
            list(self.statuses),
            dict(self.index),
        )

    @classmethod
    def of(cls, keyframe: Bundle, with_index: bool) -> _Table:
        hosts = keyframe.hosts
        table = cls(
            keyframe.boot,
            keyframe.seq,
            keyframe.seq,
            [entry[0] for entry in hosts],
            [_NONE if entry[1] is None else entry[1] for entry in hosts],
            [entry[3] for entry in hosts],
            [_STATUS_CODES[LeafStatus(entry[4])] for entry in hosts],
        )
        if with_index:
            table.index = {host: i for i, host in enumerate(table.ids)}
        return table


@dataclass(slots=True)
class _Columns:
    """A columnar decoder's table columns: `ids` as one tuple (a new one only when the table grows:
    `Beats.ids` is it, and receivers key caches on its identity), per index the last seq, interval
    and status code as numpy arrays, and whether no id is in the table twice (a keyframe may list
    one twice; the checks by name then take the slow way)."""

    ids: tuple[str, ...]
    seqs: npt.NDArray[np.int64]
    intervals: npt.NDArray[np.int64]
    statuses: npt.NDArray[np.uint8]
    unique: bool

    @classmethod
    def of(cls, table: _Table) -> _Columns:
        """Moves a fresh table's list columns into numpy arrays (the lists are left empty)."""
        import numpy as np

        ids = tuple(table.ids)
        columns = cls(
            ids,
            np.array(table.seqs, np.int64),
            np.array(table.intervals, np.int64),
            np.array(table.statuses, np.uint8),
            len(set(ids)) == len(ids),
        )
        table.seqs, table.intervals, table.statuses = [], [], []
        return columns


class _Cells(Protocol):
    """Where `changes` and `forgotten` write a table's new values by index: a copy of a list column
    (list mode), or a dict of what moves (columnar mode: applied to the arrays once all is checked)."""

    def __setitem__(self, index: int, value: int, /) -> None: ...


# -------------------------------------------------------------------------------------------- varints


def _put(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _put_id(out: bytearray, text: str) -> None:
    raw = text.encode("ascii")
    out.append(len(raw))
    out += raw


# -------------------------------------------------------------------------------------------- encoder


class BundleEncoder:
    """Encodes one relay's bundle stream: deltas indexed against the last keyframe's id table, and
    keyframes either as version 2 does (ids and all, leaves in phase order) or, while the receiver
    holds the table, by it (`TABLE_KEYFRAME`: every leaf by index, no ids). Leaves drift out of
    phase order, and deltas grow as they do (their age bytes compress less): a keyframe carries the
    ids again, in fresh phase order, once the deltas since the last keyframe cost more than those
    after the last one with ids by more than the ids cost; and every `full_every`-th keyframe, and
    when asked (`send_ids`). Bundles of version 1 pass through unchanged."""

    def __init__(self, full_every: int = FULL_EVERY) -> None:
        self.full_every = full_every
        self._table: _Table | None = None
        self._by_table = 0  # keyframes sent by table since the last one with ids
        self._spent = [0, 0]  # payload bytes and leaf entries of the deltas since the last keyframe
        self._fresh: float | None = None  # bytes per entry of the deltas after the last keyframe with ids

    def send_ids(self) -> None:
        """Someone lacks our table (they asked for a keyframe, or we reconnected): the next
        keyframe carries every id."""
        self._by_table = self.full_every

    def encode(self, bundle: Bundle) -> bytes:
        if bundle.version != BINARY_VERSION:
            self._table = None
            return encode_bundle(bundle)
        table = self._table
        if (
            table is None
            or table.boot != bundle.boot
            or bundle.sent_ms is None
            or bundle.age_ms
            or bundle.seq != table.seq + 1
        ):
            table = None  # nothing a receiver could hold to refer to
        if bundle.keyframe:
            return self._keyframe(bundle, table)
        if table is None or bundle.sent_ms is None:
            self._table = None  # a delta without a keyframe to refer to: the plain format, and no more mirror
            return encode_bundle(bundle)
        body = bytearray()
        _indexed_node(bundle, bundle.sent_ms, table, body)
        table.seq = bundle.seq
        payload = _envelope_v2(body, COMPRESS_FROM)
        self._spent[0] += len(payload)
        self._spent[1] += len(bundle.hosts)
        return payload

    def _keyframe(self, bundle: Bundle, table: _Table | None) -> bytes:
        sent = bundle.sent_ms
        spent, entries = self._spent
        self._spent = [0, 0]
        per_entry = spent / entries if entries else None
        if self._by_table == 0:  # the deltas after a keyframe with ids: what fresh phase order costs
            self._fresh = per_entry
        phased = bundle  # in phase order (when the send time is known): the leaves heard in one flush are runs
        if sent is not None:
            phased = replace(bundle, hosts=tuple(sorted(bundle.hosts, key=lambda e: (e[3], (sent - e[2]) % e[3]))))
        full = encode_bundle(phased)
        if table is not None and sent is not None and self._by_table + 1 < self.full_every:
            body = bytearray()
            trial = table.copy()
            _indexed_node(bundle, sent, trial, body)
            by_table = _envelope_v2(body, COMPRESS_FROM)
            fresh = self._fresh
            drift = 0.0 if per_entry is None or fresh is None else (per_entry - fresh) * entries
            if drift <= len(full) - len(by_table):
                trial.seq = trial.keyframe = bundle.seq
                self._table = trial
                self._by_table += 1
                return by_table
        self._table = _Table.of(phased, with_index=True)
        self._by_table = 0
        return full


def _age_code(age_ms: int, flush_ms: int) -> int:
    return (age_ms * AGE_STEPS + flush_ms - 1) // flush_ms


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


_News = tuple[list[tuple[int, int, int]], list[tuple[int, HostEntry]], list[HostEntry], list[int], list[str]]


def _sorted_news(bundle: Bundle, table: _Table) -> _News:
    """A bundle's entries as the indexed node lists them: ordinary (index, age code, seq step),
    changed (by index), new to the table (by id), forgotten by index and by id; `table`'s
    seqs, intervals and statuses moved to what they say (its growth is left to `_grow`)."""
    keyframe = bundle.keyframe
    ordinary: list[tuple[int, int, int]] = []  # (index, age code, seq step 0 or 1)
    changed: list[tuple[int, HostEntry]] = []
    new: list[HostEntry] = []
    index, seqs, intervals, statuses = table.index, table.seqs, table.intervals, table.statuses
    flush = bundle.flush_ms
    most_ms = MAX_AGE_MS * AGE_STEPS // flush * flush // AGE_STEPS  # a keyframe's largest ordinary age
    seen: set[str] = set()
    for entry in bundle.hosts:
        host, seq, age, interval, status = entry
        if host in seen:
            msg = f"host {host!r} twice in one bundle"
            raise ValueError(msg)
        seen.add(host)
        i = index.get(host)
        code = _STATUS_CODES[LeafStatus(status)]
        if i is None:
            new.append(entry)
            continue
        sent = _NONE if seq is None else seq
        last = seqs[i]
        if (
            (age <= flush or (keyframe and age <= most_ms))
            and interval == intervals[i]
            and code == statuses[i]
            and last != _GONE
            and (
                sent == last == _NONE
                or (last >= 0 and sent == last + 1)
                or (keyframe and last >= 0 and sent == last)  # a keyframe lists leaves not heard since, too
            )
        ):
            ordinary.append((i, _age_code(age, flush), 0 if sent == last else 1))
        else:
            changed.append((i, entry))
        seqs[i], intervals[i], statuses[i] = sent, interval, code
    if keyframe:  # what a keyframe does not list, its relay no longer knows
        listed = {i for i, *_ in ordinary} | {i for i, _ in changed}
        forgot_indexed = [i for i in range(len(seqs)) if i not in listed and seqs[i] != _GONE]
        forgot_new: list[str] = []
    else:
        forgot_indexed = sorted({index[host] for host in bundle.forgot if host in index})
        forgot_new = [host for host in bundle.forgot if host not in index]
    for i in forgot_indexed:
        seqs[i] = _GONE
    ordinary.sort()
    changed.sort(key=lambda item: item[0])
    return ordinary, changed, new, forgot_indexed, forgot_new


def _indexed_node(bundle: Bundle, sent_ms: int, table: _Table, out: bytearray) -> None:
    """Writes the node (a delta, or a keyframe by table) and moves `table` to what the decoder will
    know after it."""
    keyframe, flush = bundle.keyframe, bundle.flush_ms
    ordinary, changed, new, forgot_indexed, forgot_new = _sorted_news(bundle, table)
    out.append(TABLE_KEYFRAME if keyframe else INDEXED | GROWS)
    _put_id(out, bundle.relay)
    _put_id(out, bundle.boot)
    for value in (bundle.seq, flush, sent_ms, table.keyframe, len(table.ids)):
        _put(out, value)
    _heard(out, [i for i, *_ in ordinary], len(table.ids))
    if keyframe:
        steps = 0
        for n, (*_, step) in enumerate(ordinary):
            steps |= step << n
        out += steps.to_bytes((len(ordinary) + 7) // 8, "little")
        previous = 0
        for _, code, _ in ordinary:  # ages of any size: varint differences (zigzag), small in phase order
            _put(out, _zigzag(code - previous))
            previous = code
    else:
        previous = 0
        for _, code, _ in ordinary:  # each age code as the difference from the one before (mod 256): in phase order
            out.append((code - previous) & 0xFF)  # those are small, and compress
            previous = code
    _put(out, len(changed))
    previous = -1
    for i, entry in changed:
        _put(out, i - previous - 1)
        previous = i
        _entry_fields(out, entry)
    _put(out, len(new))
    for entry in new:
        _put_id(out, entry[0])
        _entry_fields(out, entry)
    if not keyframe:
        _put(out, len(forgot_indexed))
        previous = -1
        for i in forgot_indexed:
            _put(out, i - previous - 1)
            previous = i
        _put(out, len(forgot_new))
        for host in forgot_new:
            _put_id(out, host)
    watched = watched_json(bundle) if bundle.watched else b""
    _put(out, len(watched))  # the watched devices, as version 2's attribute holds them (0: none)
    out += watched
    _put(out, len(bundle.children))
    for child in bundle.children:
        _node_v2(child, out)
    _grow(table, new, forgot_new, table.seqs, table.intervals, table.statuses)


def _heard(out: bytearray, indices: list[int], table_size: int) -> None:
    """The ordinary leaves heard: a bitmap of the table, a varint gap list, or runs; the smallest."""
    gaps = [b - a - 1 for a, b in zip([-1, *indices], indices, strict=False)]
    runs: list[tuple[int, int]] = []  # (gap before the run, its length - 1)
    end = -1
    for i, gap in zip(indices, gaps, strict=True):
        if gap or not runs:
            runs.append((i - end - 1, 0))
        else:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        end = i
    sizes = {
        BITMAP: (table_size + 7) // 8,
        INDEX_LIST: _size(len(indices)) + sum(_size(gap) for gap in gaps),
        RUNS: _size(len(runs)) + sum(_size(gap) + _size(length) for gap, length in runs),
    }
    form = min(sizes, key=lambda f: (sizes[f], f))
    out.append(form)
    if form == BITMAP:
        bits = 0
        for i in indices:
            bits |= 1 << i
        out += bits.to_bytes((table_size + 7) // 8, "little")
        return
    pairs = runs if form == RUNS else [(gap,) for gap in gaps]
    _put(out, len(pairs))
    for pair in pairs:
        for value in pair:
            _put(out, value)


def _entry_fields(out: bytearray, entry: HostEntry) -> None:
    _put(out, 0 if entry[1] is None else entry[1] + 1)
    _put(out, entry[2])
    _put(out, entry[3])
    out.append(_STATUS_CODES[LeafStatus(entry[4])])


# -------------------------------------------------------------------------------------------- decoder

_BITS = tuple(tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256))


class BundleDecoder:
    """Decodes bundles of any version from many relays, keeping per relay the table of its last
    version 2 keyframe, so that its indexed deltas expand into the `Bundle` the relay assembled.

    `columnar=True` (the monitor's): an indexed delta or keyframe by table returns its ordinary news
    as columns in `Bundle.beats` and only the rest (changes, leaves by id) in `hosts`; same checks,
    same errors, same tables. Everything else (keyframes with ids, version 1) reads as without it."""

    def __init__(self, max_relays: int = MAX_RELAYS, columnar: bool = False) -> None:
        self.max_relays = max_relays
        self.columnar = columnar
        self._tables: OrderedDict[str, _Table] = OrderedDict()
        if columnar:
            import numpy  # noqa: F401  # once, at start-up: not in the first bundle's time

    def decode(
        self,
        payload: bytes,
        max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
        max_entries: int = DEFAULT_MAX_BUNDLE_ENTRIES,
        relay: str | None = None,
    ) -> Bundle:
        """`relay`: the relay the topic names; a bundle of another is `relay_mismatch` before any
        state moves."""
        body = _indexed_body(payload, max_bytes)
        if body is None:
            bundle = decode_bundle(payload, max_bytes, max_entries)
            if relay is not None and bundle.relay != relay:
                msg = "relay_mismatch"
                raise WireError(msg, f"bundle for {bundle.relay!r}")
            held = self._tables.get(bundle.relay)
            if held is not None and held.boot == bundle.boot and bundle.seq <= held.seq:
                return bundle  # a repeat or an older one: the table stays (the detector ignores it)
            self._tables.pop(bundle.relay, None)
            if bundle.version == BINARY_VERSION and bundle.keyframe:
                table = _Table.of(bundle, with_index=False)
                if self.columnar:
                    table.columns = _Columns.of(table)
                self._remember(table, bundle.relay)
            return bundle
        reader = _ColumnarReader if self.columnar else _IndexedReader
        return reader(body, self, relay).top(max_entries)

    def _remember(self, table: _Table, relay: str) -> None:
        self._tables[relay] = table
        self._tables.move_to_end(relay)
        while len(self._tables) > self.max_relays:
            self._tables.popitem(last=False)


def _indexed_body(payload: bytes, max_bytes: int) -> memoryview | None:
    """The node of a version 2 payload whose top node is indexed; None for anything else (left to
    relay/wire.py, which also rejects what is not a bundle)."""
    if payload[:1] != _V2 or len(payload) < 3 or len(payload) > max_bytes or payload[1] & ~_COMPRESSED:
        return None
    body = memoryview(payload)[2:]
    if payload[1] & _COMPRESSED:
        body = memoryview(_inflate(body, max_bytes))
    if not body or not body[0] & INDEXED:
        return None
    return body


class _IndexedReader(_Reader):
    """Reads an indexed top node; every count is checked against the bytes left and the table."""

    __slots__ = ("decoder", "relay")

    def __init__(self, data: memoryview, decoder: BundleDecoder, relay: str | None) -> None:
        super().__init__(data)
        self.decoder = decoder
        self.relay = relay

    def varint(self, limit: int, reason: str = "bad_bundle") -> int:
        data, at, value, shift = self.data, self.at, 0, 0
        while True:
            if at >= len(data) or shift > 63:
                msg = "bad_bundle"
                raise WireError(msg, "truncated or over-long varint")
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        self.at = at
        if value > limit:
            raise WireError(reason, f"{value} is above {limit}")
        return value

    def count(self, min_bytes: int) -> int:
        """A count of items of at least `min_bytes` each: never more than the bytes left allow."""
        return self.varint((len(self.data) - self.at) // min_bytes)

    def top(self, max_entries: int) -> Bundle:
        kind = self.take(1)[0]
        if kind not in (INDEXED, INDEXED | GROWS, TABLE_KEYFRAME):
            msg = "bad_bundle"
            raise WireError(msg, f"indexed node kind {kind}: 2, 6 (indexed deltas) or 7 (a keyframe by table)")
        relay = self.short_id("bad_id")
        if self.relay is not None and relay != self.relay:
            msg = "relay_mismatch"
            raise WireError(msg, f"bundle for {relay!r}")
        boot = self.short_id("bad_boot")
        seq = self.varint(MAX_SEQ, "bad_seq")
        flush_ms = self.varint(MAX_INTERVAL_MS, "bad_interval")
        if flush_ms < MIN_INTERVAL_MS:
            msg = "bad_interval"
            raise WireError(msg, f"flush_ms {flush_ms}")
        sent_ms = self.varint(MAX_SEQ, "bad_age")
        keyframe = self.varint(MAX_SEQ, "bad_seq")
        size = self.varint(max_entries, "too_many_entries")
        header = Bundle(relay, boot, seq, flush_ms, version=BINARY_VERSION, keyframe=False, sent_ms=sent_ms)
        tables = self.decoder._tables
        table = tables.get(relay)
        if table is not None and table.boot == boot and seq <= table.seq:
            msg = "stale_bundle"
            raise WireError(msg, f"seq {seq} is not newer than {table.seq}")
        if table is None or (table.boot, table.keyframe, len(table.ids), table.seq + 1) != (boot, keyframe, size, seq):
            raise KeyframeMissing(header, f"seq {seq} refers to keyframe {keyframe} of boot {boot}")
        if kind == TABLE_KEYFRAME:
            bundle = self.keyframe_news(header, table, max_entries)
            table.keyframe = seq
        else:
            bundle = self.news(header, table, max_entries, grows=bool(kind & GROWS))
        table.seq = seq
        self.decoder._remember(table, relay)
        return bundle

    def news(self, header: Bundle, table: _Table, max_entries: int, grows: bool) -> Bundle:
        """The rest of the node. The table moves only once all of it has been read and checked: a
        bad bundle leaves it as it was (and the next delta is then a seq gap: a keyframe is asked)."""
        seqs, intervals, statuses = list(table.seqs), list(table.intervals), list(table.statuses)
        ids, size, flush = table.ids, len(table.ids), header.flush_ms
        heard = self.heard(size)
        ages = [code & 0xFF for code in itertools.accumulate(self.take(len(heard)))]
        hosts: list[HostEntry] = []
        append, make, status_of = hosts.append, tuple.__new__, _STATUS_OF
        for i, code in zip(heard, ages, strict=True):
            last = seqs[i]
            if last == _GONE or last >= MAX_SEQ:
                _refuse_next(i, last)
            seq = None if last == _NONE else last + 1
            seqs[i] = _NONE if seq is None else seq
            append(make(HostEntry, (ids[i], seq, code * flush // AGE_STEPS, intervals[i], status_of[statuses[i]])))
        self.changes(hosts, ids, seqs, intervals, statuses)
        fresh = len(hosts)
        for _ in range(self.count(6)):
            append(self.entry(self.short_id("bad_id")))
        forgot = self.forgotten(ids, seqs)
        return self.rest(header, table, max_entries, hosts, fresh, forgot, (seqs, intervals, statuses), grows)

    def keyframe_news(self, header: Bundle, table: _Table, max_entries: int) -> Bundle:
        """A keyframe by table: every leaf the relay knows, by index (ordinary: same interval and
        status, seq the last one or the next; any age) or as a change, then those new to the table."""
        seqs, intervals, statuses = list(table.seqs), list(table.intervals), list(table.statuses)
        ids, size, flush = table.ids, len(table.ids), header.flush_ms
        listed = self.heard(size)
        raw_steps = self.take((len(listed) + 7) // 8)
        steps = int.from_bytes(raw_steps, "little")
        if steps >> len(listed):
            msg = "bad_bundle"
            raise WireError(msg, "seq step bits past the leaves listed")
        most = MAX_AGE_MS * AGE_STEPS // flush  # the largest age code that reads back within MAX_AGE_MS
        codes = self.keyframe_ages(listed, steps, seqs, most)
        hosts: list[HostEntry] = []
        append, make, status_of = hosts.append, tuple.__new__, _STATUS_OF
        for n, (i, code) in enumerate(zip(listed, codes, strict=True)):
            last = seqs[i]
            seq = None if last == _NONE else last + (steps >> n & 1)
            seqs[i] = _NONE if seq is None else seq
            append(make(HostEntry, (ids[i], seq, code * flush // AGE_STEPS, intervals[i], status_of[statuses[i]])))
        self.changes(hosts, ids, seqs, intervals, statuses)
        named = {entry[0] for entry in hosts}
        for i, host in enumerate(ids):  # a leaf the keyframe does not list: its relay no longer knows it
            if host not in named:
                seqs[i] = _GONE
        fresh = len(hosts)
        for _ in range(self.count(6)):
            append(self.entry(self.short_id("bad_id")))
        bundle = self.rest(header, table, max_entries, hosts, fresh, (), (seqs, intervals, statuses), grows=True)
        return replace(bundle, keyframe=True)

    def keyframe_ages(self, listed: Sequence[int], steps: int, seqs: Sequence[int], most: int) -> list[int]:
        """A keyframe by table's age codes (zigzag varint differences), each leaf's checked with its
        seq step (bit n of `steps`) against the table's `seqs`."""
        codes: list[int] = []
        code = 0
        for n, i in enumerate(listed):
            step = code + _unzigzag(self.varint(2 * most + 1, "bad_age"))
            if not 0 <= step <= most:
                msg = "bad_age"
                raise WireError(msg, f"age code {step} outside [0, {most}]")
            code = step
            last = seqs[i]
            if last == _GONE or (steps >> n & 1 and (last == _NONE or last >= MAX_SEQ)):
                _refuse_next(i, last)
            codes.append(code)
        return codes

    def changes(
        self, hosts: list[HostEntry], ids: Sequence[str], seqs: _Cells, intervals: _Cells, statuses: _Cells
    ) -> None:
        """The exceptions by index: each with all its fields."""
        previous, size = -1, len(ids)
        for _ in range(self.count(5)):
            i = previous + 1 + self.varint(size)
            if i >= size:
                msg = "bad_entry"
                raise WireError(msg, f"index {i} outside a table of {size}")
            previous = i
            entry = self.entry(ids[i])
            seqs[i], intervals[i], statuses[i] = _NONE if entry[1] is None else entry[1], entry[3], _code(entry[4])
            hosts.append(entry)

    def rest(
        self,
        header: Bundle,
        table: _Table,
        max_entries: int,
        hosts: list[HostEntry],
        fresh: int,
        forgot: tuple[str, ...],
        columns: tuple[list[int], list[int], list[int]],
        grows: bool,
    ) -> Bundle:
        """Limits, the watched devices and the child nodes; then the table moves (`columns`: its new
        seqs, intervals and statuses; `hosts[fresh:]`: the leaves sent by id)."""
        budget = [max_entries - len(hosts) - len(forgot)]
        _limit(budget[0], len({entry[0] for entry in hosts}) != len(hosts))
        watched, children = self.tail(budget)
        seqs, intervals, statuses = columns
        if grows and len(hosts) > fresh:
            _grow(table, hosts[fresh:], forgot, seqs, intervals, statuses)
        table.seqs, table.intervals, table.statuses = seqs, intervals, statuses
        return replace(header, hosts=tuple(hosts), forgot=forgot, children=children, watched=watched)

    def tail(self, budget: list[int]) -> tuple[tuple[WatchedEntry, ...], tuple[Bundle, ...]]:
        """The watched devices and the child nodes, which end the node."""
        size_watched = self.count(1)
        watched: tuple[WatchedEntry, ...] = _watched_v2(self.take(size_watched), budget) if size_watched else ()
        children = tuple(self.child(budget) for _ in range(self.count(40)))
        if self.at != len(self.data):
            msg = "bad_bundle"
            raise WireError(msg, f"{len(self.data) - self.at} bytes after the bundle")
        return watched, children

    def bitmap(self, size: int) -> memoryview:
        """The bitmap form's bytes: one bit per table index, none set past the table."""
        raw = self.take((size + 7) // 8)
        if size % 8 and raw[-1] >> (size % 8):
            msg = "bad_bundle"
            raise WireError(msg, "bitmap bits past the table")
        return raw

    def heard(self, size: int) -> list[int]:
        form = self.take(1)[0]
        if form == BITMAP:
            raw = self.bitmap(size)
            bits = _BITS
            return [8 * at + bit for at, byte in enumerate(raw) if byte for bit in bits[byte]]
        if form not in (INDEX_LIST, RUNS):
            msg = "bad_bundle"
            raise WireError(msg, f"heard form {form}: 0 (bitmap), 1 (index list) or 2 (runs)")
        indices: list[int] = []
        previous = -1
        for _ in range(self.varint(size)):
            previous += 1 + self.varint(size)
            if form == RUNS:
                length = 1 + self.varint(size - 1 - len(indices) if size > len(indices) else 0)
                indices.extend(range(previous, previous + length))
                previous += length - 1
            else:
                indices.append(previous)
            if previous >= size:
                msg = "bad_entry"
                raise WireError(msg, f"index {previous} outside a table of {size}")
        return indices

    def entry(self, host: str) -> HostEntry:
        seq = self.varint(MAX_SEQ + 1, "bad_seq")
        age = self.varint(MAX_AGE_MS, "bad_age")
        interval = self.varint(MAX_INTERVAL_MS, "bad_interval")
        if interval < MIN_INTERVAL_MS:
            msg = "bad_interval"
            raise WireError(msg, f"interval {interval} ms")
        status = self.take(1)[0]
        if status >= len(_STATUS_OF):
            msg = "bad_status"
            raise WireError(msg, f"status byte {status} is reserved")
        return HostEntry(host, None if seq == 0 else seq - 1, age, interval, _STATUS_OF[status])

    def forgotten(self, ids: Sequence[str], seqs: _Cells) -> tuple[str, ...]:
        forgot, previous, size = [], -1, len(ids)
        for _ in range(self.count(1)):
            previous += 1 + self.varint(size)
            if previous >= size:
                msg = "bad_entry"
                raise WireError(msg, f"forgotten index {previous} outside a table of {size}")
            seqs[previous] = _GONE
            forgot.append(ids[previous])
        forgot.extend(self.short_id("bad_id") for _ in range(self.count(2)))
        return tuple(forgot)

    def child(self, budget: list[int]) -> Bundle:
        """A child relay's node, in version 2's own format (relay/wire.py reads it; it refuses kind bit 1)."""
        return self.node(1, budget)


class _ColumnarReader(_IndexedReader):
    """A columnar decoder's reader: the ordinary news as numpy columns (`Beats`), the rest as
    `_IndexedReader` reads it. Every check is the list reader's, in its order, with its errors: the
    vectorised reads fall back to the list reader's own loops for any input they do not take in one
    go (a long or truncated varint, a value past a limit), so those say what is wrong."""

    __slots__ = ()

    def news(self, header: Bundle, table: _Table, max_entries: int, grows: bool) -> Bundle:
        import numpy as np

        columns = _columns(table)
        heard = self.heard_array(len(table.ids))
        codes = np.cumsum(np.frombuffer(self.take(len(heard)), np.uint8), dtype=np.int64) & 0xFF
        last = columns.seqs[heard]
        if len(last) and (last.min() < _NONE or last.max() >= MAX_SEQ):  # _GONE, or no next seq
            k = int(((last == _GONE) | (last >= MAX_SEQ)).argmax())  # the first, as the list reader meets it
            _refuse_next(int(heard[k]), int(last[k]))
        seqs = last + (last != _NONE)  # the next seq, or none then and now
        beats = _beats(columns, heard, seqs, codes, header.flush_ms)
        moves = _Moves()
        hosts: list[HostEntry] = []
        self.changes(hosts, table.ids, moves.seqs, moves.intervals, moves.statuses)
        changed = list(moves.seqs)
        fresh = len(hosts)
        for _ in range(self.count(6)):
            hosts.append(self.entry(self.short_id("bad_id")))
        forgot = self.forgotten(table.ids, moves.seqs)
        return self.rest_columns(header, table, max_entries, beats, hosts, changed, fresh, forgot, moves, grows)

    def keyframe_news(self, header: Bundle, table: _Table, max_entries: int) -> Bundle:
        import numpy as np

        columns = _columns(table)
        flush = header.flush_ms
        listed = self.heard_array(len(table.ids))
        raw_steps = self.take((len(listed) + 7) // 8)
        bits = np.unpackbits(np.frombuffer(raw_steps, np.uint8), bitorder="little")
        if bits[len(listed) :].any():
            msg = "bad_bundle"
            raise WireError(msg, "seq step bits past the leaves listed")
        bumps = bits[: len(listed)].astype(np.int64)
        most = MAX_AGE_MS * AGE_STEPS // flush
        last = columns.seqs[listed]
        codes = self.quick_keyframe_ages(last, bumps, most)
        if codes is None:  # the list reader's loop says what is wrong (or reads what the quick way does not)
            steps = int.from_bytes(raw_steps, "little")
            ages = self.keyframe_ages(listed.tolist(), steps, columns.seqs.tolist(), most)
            codes = np.array(ages, np.int64)
        seqs = np.where(last == _NONE, _NONE, last + bumps)
        beats = _beats(columns, listed, seqs, codes, flush)
        moves = _Moves()
        hosts: list[HostEntry] = []
        self.changes(hosts, table.ids, moves.seqs, moves.intervals, moves.statuses)
        changed = list(moves.seqs)
        if columns.unique:  # a leaf the keyframe does not list: its relay no longer knows it
            gone = np.ones(len(table.ids), np.bool_)
            gone[listed] = False
            gone[changed] = False
        else:  # by name, as the list reader decides it
            named = {table.ids[i] for i in listed.tolist()} | {entry[0] for entry in hosts}
            gone = np.array([host not in named for host in table.ids], np.bool_)
        fresh = len(hosts)
        for _ in range(self.count(6)):
            hosts.append(self.entry(self.short_id("bad_id")))
        bundle = self.rest_columns(header, table, max_entries, beats, hosts, changed, fresh, (), moves, True, gone)
        return replace(bundle, keyframe=True)

    def quick_keyframe_ages(
        self, last: npt.NDArray[np.int64], bumps: npt.NDArray[np.int64], most: int
    ) -> npt.NDArray[np.int64] | None:
        """`keyframe_ages` at once, for input it takes in one go and finds sound; None otherwise."""
        import numpy as np

        read = _varints(self.data, self.at, len(last), 2 * most + 1)
        if read is None:
            return None
        values, end = read
        codes = np.cumsum((values >> 1) ^ -(values & 1))  # the zigzag differences, undone and summed
        if len(codes) and (codes.min() < 0 or codes.max() > most):
            return None
        if ((last == _GONE) | ((bumps == 1) & ((last == _NONE) | (last >= MAX_SEQ)))).any():
            return None
        self.at = end
        return codes

    def heard_array(self, size: int) -> npt.NDArray[np.int64]:
        """`heard` as an array."""
        import numpy as np

        start = self.at
        form = self.take(1)[0]
        if form == BITMAP:
            raw = self.bitmap(size)
            bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
            return np.flatnonzero(bits).astype(np.int64, copy=False)
        if form in (INDEX_LIST, RUNS):
            pairs = self.varint(size)
            read = _varints(self.data, self.at, pairs * 2 if form == RUNS else pairs, size)
            if read is not None:
                values, end = read
                indices = _run_indices(values, size) if form == RUNS else _list_indices(values, size)
                if indices is not None:
                    self.at = end
                    return indices
        self.at = start  # the list reader's loop: what is wrong, or what the quick way does not take
        return np.array(self.heard(size), np.int64)

    def rest_columns(
        self,
        header: Bundle,
        table: _Table,
        max_entries: int,
        beats: Beats,
        hosts: list[HostEntry],
        changed: list[int],
        fresh: int,
        forgot: tuple[str, ...],
        moves: _Moves,
        grows: bool,
        gone: npt.NDArray[np.bool_] | None = None,
    ) -> Bundle:
        """`rest` for columns: the same limits (beats count), then the table moves: the beats' seqs,
        then `moves`, then what `gone` marks; the leaves sent by id join it (`hosts[fresh:]`)."""
        import numpy as np

        budget = [max_entries - len(beats) - len(hosts) - len(forgot)]
        _limit(budget[0], budget[0] >= 0 and _twice(table, beats.index, hosts, changed, fresh))
        watched, children = self.tail(budget)
        columns = _columns(table)
        seqs, intervals, statuses = columns.seqs, columns.intervals, columns.statuses
        new = hosts[fresh:] if grows else []
        if new:
            first = _join(table, new)  # the last check: nothing has moved yet
            seqs = np.concatenate([seqs, np.array([_NONE if e[1] is None else e[1] for e in new], np.int64)])
            intervals = np.concatenate([intervals, np.array([e[3] for e in new], np.int64)])
            statuses = np.concatenate([statuses, np.array([_code(e[4]) for e in new], np.uint8)])
            columns.ids = tuple(table.ids)
            for i in _forgotten_new(table, forgot, first):
                moves.seqs[i] = _GONE
        seqs[beats.index] = beats.seq
        for cells, column in ((moves.seqs, seqs), (moves.intervals, intervals), (moves.statuses, statuses)):
            if cells:
                column[list(cells)] = list(cells.values())
        if gone is not None:
            seqs[: len(gone)][gone] = _GONE
        columns.seqs, columns.intervals, columns.statuses = seqs, intervals, statuses
        return replace(header, hosts=tuple(hosts), forgot=forgot, children=children, watched=watched, beats=beats)


@dataclass(slots=True)
class _Moves:
    """What a columnar read moves in the table besides the beats' seqs, by index (applied in
    `rest_columns` once all is checked): the changes, then the leaves forgotten."""

    seqs: dict[int, int] = field(default_factory=dict)
    intervals: dict[int, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)


def _columns(table: _Table) -> _Columns:
    columns = table.columns
    if columns is None:  # a columnar decoder makes every table with its columns
        msg = "a table without columns in a columnar decoder"
        raise AssertionError(msg)
    return columns


def _beats(
    columns: _Columns,
    index: npt.NDArray[np.int64],
    seqs: npt.NDArray[np.int64],
    codes: npt.NDArray[np.int64],
    flush: int,
) -> Beats:
    return Beats(
        columns.ids, index, seqs, codes * flush // AGE_STEPS, columns.intervals[index], columns.statuses[index]
    )


def _twice(table: _Table, heard: npt.NDArray[np.int64], hosts: list[HostEntry], changed: list[int], fresh: int) -> bool:
    """A host twice among the beats (`heard`, indices) and the exceptions (`hosts`: `changed`
    indices, then by id from `fresh`), by name as the list reader checks it."""
    import numpy as np

    columns = _columns(table)
    names = {entry[0] for entry in hosts}
    if len(names) != len(hosts):
        return True
    if not columns.unique:  # the slow way: names of the beats too
        beaten = [table.ids[i] for i in heard.tolist()]
        return len(set(beaten)) != len(beaten) or not names.isdisjoint(beaten)
    if not len(heard) or not hosts:
        return False
    index = _index(table)
    at = changed + [i for entry in hosts[fresh:] if (i := index.get(entry[0])) is not None]
    if not at:
        return False
    found = np.searchsorted(heard, at)
    return bool((heard[np.minimum(found, len(heard) - 1)] == at).any())


_FEW_VARINTS = 32


def _varints(data: memoryview, at: int, count: int, limit: int) -> tuple[npt.NDArray[np.int64], int] | None:
    """`count` varints from `at`, each at most `limit`, and where they end; None if any is longer
    than 8 bytes, above `limit`, or cut off (the list reader's loop then reads them). The callers'
    limits keep the sums of what they read far from int64's end."""
    import numpy as np

    if count <= _FEW_VARINTS:  # one by one: numpy's fixed cost is more than theirs
        few, end = [], at
        for _ in range(count):
            value = shift = 0
            while True:
                if end >= len(data) or shift > 7 * 7:
                    return None
                byte = data[end]
                end += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            if value > limit:
                return None
            few.append(value)
        return np.array(few, np.int64), end
    raw = np.frombuffer(data[at : at + 8 * count], np.uint8)
    ends = np.flatnonzero(raw < 0x80)[:count]
    if len(ends) < count:
        return None
    if not count:
        return np.zeros(0, np.int64), at
    end = int(ends[-1]) + 1
    if end == count:  # one byte each (the usual)
        values = raw[:count].astype(np.int64)
    else:
        starts = np.concatenate([[0], ends[:-1] + 1])
        if int((ends - starts).max()) >= 8:
            return None
        lengths = ends - starts + 1
        shifts = (np.arange(end) - np.repeat(starts, lengths)) * 7
        parts = (raw[:end] & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
        values = np.add.reduceat(parts, starts).astype(np.int64)
    if int(values.max()) > limit:
        return None
    return values, at + end


def _list_indices(gaps: npt.NDArray[np.int64], size: int) -> npt.NDArray[np.int64] | None:
    """The index list form's indices (each gap after the one before), if all fall in the table."""
    import numpy as np

    indices = np.cumsum(gaps + 1) - 1 if len(gaps) else gaps
    return None if len(indices) and int(indices[-1]) >= size else indices


def _run_indices(pairs: npt.NDArray[np.int64], size: int) -> npt.NDArray[np.int64] | None:
    """The runs form's indices ((gap before, length - 1) per run), if all fall in the table (a run
    longer than the list reader's limit for it ends past the table too)."""
    import numpy as np

    gaps, more = pairs[0::2], pairs[1::2]
    if not len(gaps):
        return gaps
    if len(gaps) <= _FEW_VARINTS:  # one by one: numpy's fixed cost is more than theirs
        spans, end = [], -1
        for gap, extra in zip(gaps.tolist(), more.tolist(), strict=True):
            spans.append((end + 1 + gap, end + 2 + gap + extra))
            end += 1 + gap + extra
        if end >= size:
            return None
        runs = [np.arange(start, stop, dtype=np.int64) for start, stop in spans]
        return runs[0] if len(runs) == 1 else np.concatenate(runs)
    lengths = more + 1
    ends = np.cumsum(gaps + lengths) - 1  # each run's last index
    if int(ends[-1]) >= size:
        return None
    before = np.cumsum(lengths) - lengths  # indices listed before each run
    starts = ends - more
    return np.repeat(starts - before, lengths) + np.arange(int(before[-1] + lengths[-1]))


def _grow(
    table: _Table,
    new: list[HostEntry],
    forgot: Sequence[str],
    seqs: list[int],
    intervals: list[int],
    statuses: list[int],
) -> None:
    """The leaves sent by id join the table, in the order sent (their seqs, intervals and statuses
    appended to the given columns: the table's own on the sending side, the copies `news` commits on
    the receiving side); those forgotten in the same bundle are gone at once. A leaf sent by id that
    the table holds already is `bad_entry` (its index would be ambiguous), raised before anything
    moves."""
    first = _join(table, new)
    for entry in new:
        seqs.append(_NONE if entry[1] is None else entry[1])
        intervals.append(entry[3])
        statuses.append(_code(entry[4]))
    for i in _forgotten_new(table, forgot, first):
        seqs[i] = _GONE


def _join(table: _Table, new: list[HostEntry]) -> int:
    """`new`'s ids join the table's (and its index); returns the first new index. Refuses (as
    `_grow` says) before anything moves."""
    index = _index(table)
    if any(entry[0] in index for entry in new):
        msg = "bad_entry"
        raise WireError(msg, "a leaf sent by id that the table holds")
    first = len(table.ids)
    for entry in new:
        index[entry[0]] = len(table.ids)
        table.ids.append(entry[0])
    return first


def _index(table: _Table) -> dict[str, int]:
    """The table's id -> index (built once per table, at its first need)."""
    if len(table.index) != len(table.ids):
        table.index = {host: i for i, host in enumerate(table.ids)}
    return table.index


def _forgotten_new(table: _Table, forgot: Sequence[str], first: int) -> list[int]:
    """The indices of the leaves that joined the table at `first` or after and are in `forgot`."""
    index = table.index
    return [i for host in forgot if (i := index.get(host)) is not None and i >= first]


def _limit(budget: int, twice: bool) -> None:
    """The entry limit (`budget` left after the node's own entries), then no host twice."""
    if budget < 0 or twice:
        reason = "too_many_entries" if budget < 0 else "bad_entry"
        raise WireError(reason, "more entries than the limit, or one host twice")


def _refuse_next(index: int, last: int) -> None:
    """An ordinary entry whose seq cannot follow the table's: the index was forgotten, or holds no
    seq (a step of one from none), or the largest one (one more would be past MAX_SEQ)."""
    if last == _GONE:
        msg = "bad_entry"
        raise WireError(msg, f"index {index} was forgotten")
    msg = "bad_seq"
    raise WireError(msg, f"index {index} cannot follow seq {last}")


def _unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -(value >> 1) - 1


def _code(status: str) -> int:
    return _STATUS_CODES[LeafStatus(status)]
