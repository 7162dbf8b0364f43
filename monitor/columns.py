"""The columns of the hosts behind one relay, and the vectorised pass over a bundle's ordinary news.

A host whose freshest evidence came through a relay has a slot in that relay's columns (`join`,
`leave`). Per slot they hold its deadline (the relay's bundles are its clock: monitor/detector.py)
and a mirror of what the vectorised pass needs to know of it: its evidence time and seq through
this relay, its interval, its timeout, its own grace and whether it is `ready` for the plain path
(up, steady, scheduled, its freshest news from this relay). The detector re-mirrors a host after
every change to it (`mirror`); `faults` is the self-check its property tests run.

`plain_news` takes a bundle's ordinary news by column (`Beats`) and finds, in one pass over numpy
arrays, the rows that are exactly what the detector's per-entry fast path would take: the beat it
already heard (nothing to do) or a plain new beat of a ready host (its evidence and deadline move,
in place) or a stale plain beat of a waiting host (`unknown`; too old to make it `up`, but within
grace: its evidence and deadline move, it stays `unknown`, which is what a monitor behind its input
reads for every beat). It moves the columns and returns those rows; every other row is for the full path.

Pure and synchronous, like the detector: no clock, no I/O.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from relaybeat.relay.wire import Beats

__all__ = [
    "READY", "READY_SCHEDULED", "READY_STEADY", "READY_UP", "READY_WAITING", "SAME_BEAT_S", "WAITING",
    "Columns", "PlainNews",
]  # fmt: skip

READY_UP = 1  # up, and its freshest news came through this relay
READY_STEADY = 2  # not flapping
READY_SCHEDULED = 4  # it has a deadline
READY = READY_UP | READY_STEADY | READY_SCHEDULED
# `unknown`, its last news came through this relay, waiting (scheduled) for news fresh enough to be
# `up`: while the monitor is behind its input, every beat it reads is older than its timeout.
READY_WAITING = 8
WAITING = READY_WAITING | READY_STEADY | READY_SCHEDULED
# Two reports of a leaf through one relay within this much of each other, with the same seq, are
# the same beat (bundle transit jitter); anything else is news, even with a constant seq.
SAME_BEAT_S = 0.05
_NO_SEQ = -1


class Member(Protocol):
    """What the columns read of a host (the detector's `HostTrack`)."""

    id: str
    slot: int
    via: str | None
    via_seen: float
    seq: int | None
    interval_s: float
    misses: int
    grace_from: float


M = TypeVar("M", bound=Member)


@dataclass(frozen=True, slots=True)
class PlainNews:
    """What `plain_news` moved: the slots of the plain new beats with their new evidence time, seq
    (-1: none) and deadline, and the rows of the bundle left for the full path."""

    slots: list[int]
    seen: list[float]
    seqs: list[int]
    deadlines: list[float]
    rest: list[int]


class Columns(Generic[M]):
    """One relay's host columns, by slot."""

    __slots__ = (
        "deadlines", "floors", "free", "intervals", "layout", "map", "map_ids", "map_layout", "members", "ready",
        "seen", "seqs", "timeouts",
    )  # fmt: skip

    def __init__(self) -> None:
        self.members: list[M | None] = []
        self.deadlines = array("d")  # inf: none in the column (the heap, or no deadline)
        self.seen = array("d")  # its evidence time through this relay (`via_seen`)
        self.seqs = array("q")  # its last seq (-1: none)
        self.intervals = array("q")  # its interval, ms
        self.timeouts = array("d")  # interval × misses, s
        self.floors = array("d")  # its own grace (`grace_from`)
        self.ready = array("B")  # READY_* bits
        self.free: list[int] = []  # slots left by hosts that moved or were forgotten
        self.layout = 0  # bumped whenever a slot is left: a cached table-to-slot map is then stale
        self.map: npt.NDArray[np.int64] | None = None  # a relay id table's index -> slot (-1: none)
        self.map_ids: tuple[str, ...] | None = None
        self.map_layout = -1

    def __len__(self) -> int:
        return len(self.members)

    @property
    def held(self) -> int:
        """How many hosts hold a slot."""
        return len(self.members) - len(self.free)

    def all_up(self) -> bool:
        """Whether every host holding a slot is `up` (and heard through this relay)."""
        return int(np.count_nonzero(np.frombuffer(self.ready, dtype=np.uint8) & READY_UP)) == self.held

    def join(self, host: M, deadline: float) -> int:
        if self.free:
            slot = self.free.pop()
            self.members[slot] = host
            self.deadlines[slot] = deadline
            return slot
        self.members.append(host)
        self.deadlines.append(deadline)
        for column in (self.seen, self.timeouts, self.floors):
            column.append(-math.inf)
        self.seqs.append(_NO_SEQ)
        self.intervals.append(0)
        self.ready.append(0)
        return len(self.members) - 1

    def leave(self, slot: int) -> None:
        self.members[slot] = None
        self.deadlines[slot] = math.inf
        self.ready[slot] = 0
        self.free.append(slot)
        self.layout += 1

    def mirror(self, slot: int, host: M, ready: int) -> None:
        seen, seq, interval, timeout, floor = _mirrored(host)
        self.seen[slot], self.seqs[slot], self.intervals[slot] = seen, seq, interval
        self.timeouts[slot], self.floors[slot], self.ready[slot] = timeout, floor, ready

    def due(self, at: float) -> list[int]:
        """The slots whose deadline is at or before `at`."""
        return np.flatnonzero(np.frombuffer(self.deadlines, dtype=np.float64) <= at).tolist()

    def slots_of(self, ids: tuple[str, ...], slot_of: Callable[[str], int]) -> npt.NDArray[np.int64]:
        """Each index of a relay's id table -> its host's slot here (-1: none), cached per table and layout."""
        if self.map is None or self.map_ids is not ids or self.map_layout != self.layout:
            self.map = np.fromiter((slot_of(host) for host in ids), dtype=np.int64, count=len(ids))
            self.map_ids, self.map_layout = ids, self.layout
        return self.map

    def plain_news(
        self, beats: Beats, slots: npt.NDArray[np.int64], sent: float, grace: float, now: float | None = None
    ) -> PlainNews:
        """Move the columns for the rows the per-entry fast path would take (see the module doc); a
        waiting host's stale beat too when `now` is given (the relay is alive)."""
        known = slots >= 0
        at = np.where(known, slots, 0)
        ready = np.frombuffer(self.ready, dtype=np.uint8)[at]
        seen_then = np.frombuffer(self.seen, dtype=np.float64)[at]
        seq_then = np.frombuffer(self.seqs, dtype=np.int64)[at]
        seen = sent - beats.age_ms / 1000
        seq = beats.seq
        heard = known & (ready & READY_UP).astype(bool)
        same = heard & (seq == seq_then) & (seen - seen_then < SAME_BEAT_S)
        news = (
            known
            & (beats.status == 0)
            & (beats.interval_ms == np.frombuffer(self.intervals, dtype=np.int64)[at])
            & (seen > seen_then)
            & ((seq < 0) | (seq_then < 0) | (seq > seq_then))
        )
        plain = news & heard & ~same & (ready == READY)
        if now is not None:
            timeout = np.frombuffer(self.timeouts, dtype=np.float64)[at]
            floor_then = np.maximum(np.frombuffer(self.floors, dtype=np.float64)[at], grace)
            stale = (seen + timeout <= now) & (np.maximum(seen, floor_then) + timeout > now)
            plain |= news & (ready == WAITING) & stale
        rows = np.flatnonzero(plain)
        moved = at[rows]
        new_seen = seen[rows]
        floor = np.maximum(np.frombuffer(self.floors, dtype=np.float64)[moved], grace)
        deadline = np.maximum(new_seen, floor) + np.frombuffer(self.timeouts, dtype=np.float64)[moved]
        new_seq = seq[rows]
        np.frombuffer(self.seen, dtype=np.float64)[moved] = new_seen
        np.frombuffer(self.seqs, dtype=np.int64)[moved] = new_seq
        np.frombuffer(self.deadlines, dtype=np.float64)[moved] = deadline
        rest = np.flatnonzero(~(plain | same))
        return PlainNews(moved.tolist(), new_seen.tolist(), new_seq.tolist(), deadline.tolist(), rest.tolist())

    def faults(self, relay_id: str, ready_of: Callable[[M], int]) -> list[str]:
        """Where the columns disagree with their hosts (the property tests' self-check; [] when sound)."""
        out = []
        for slot, host in enumerate(self.members):
            if host is None:
                if self.ready[slot]:
                    out.append(f"{relay_id}[{slot}]: empty slot marked ready")
                continue
            want = (host.slot, host.via, *_mirrored(host), ready_of(host))
            have = (
                slot, relay_id, self.seen[slot], self.seqs[slot], self.intervals[slot], self.timeouts[slot],
                self.floors[slot], self.ready[slot],
            )  # fmt: skip
            if want != have:
                out.append(f"{relay_id}[{slot}] {host.id}: host {want} != columns {have}")
        return out


def _mirrored(host: Member) -> tuple[float, int, int, float, float]:
    """What the columns hold of a host: its evidence time through the relay, seq (-1: none),
    interval (ms), timeout (s) and own grace."""
    seq = _NO_SEQ if host.seq is None else host.seq
    return host.via_seen, seq, round(host.interval_s * 1000), host.interval_s * host.misses, host.grace_from
