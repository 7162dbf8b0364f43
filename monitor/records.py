"""The records the monitor keeps of each concept, in wall-clock time: one per transition, host, relay.

The detector decides on its own monotonic clock (`Transition`, `HostTrack`, `RelayTrack`); the shell
stamps each into wall time once, as one of these, and everything after that reads the same record:
the journal, the store (writes and reads), notifications, the read view (which adds what it shows
besides: `HostView`, `RelayView`) and the API's bodies (tests check that their fields match).
Records are built by keyword only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from relaybeat.monitor.detector import HostSnapshot, HostTrack, RelaySnapshot, RelayTrack
from relaybeat.monitor.states import Event, Kind, State, Transition

__all__ = [
    "Change",
    "DetectionRow",
    "FalseAlarmRow",
    "HostRow",
    "RelayRow",
    "TransitionRow",
    "Wall",
    "carried",
    "require_aware",
]

Wall = Callable[[float], datetime]  # a clock's `wall`: monotonic seconds to an aware UTC moment
Mono = Callable[[datetime], float]  # a clock's `mono`: the inverse


def require_aware(name: str, value: datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        msg = f"{name} is a naive datetime ({value.isoformat()}); pass an aware one"
        raise ValueError(msg)


def _wall_or_none(wall: Wall, t: float | None) -> datetime | None:
    return None if t is None else wall(t)


def _mono_or_none(mono: Mono, moment: datetime | None) -> float | None:
    return None if moment is None else mono(moment)


_R = TypeVar("_R")


def carried(source: object, target: type[_R], **changed: Any) -> _R:
    """A `target` with every field it shares with `source` carried over by name, some `changed`
    (fields `source` lacks keep their defaults)."""
    key = (type(source), target)
    names = _SHARED.get(key)
    if names is None:  # the names both have, found once per pair of types (it is on the hot path)
        names = _SHARED[key] = tuple(f.name for f in fields(target) if hasattr(source, f.name))  # type: ignore[arg-type]
    given = {name: getattr(source, name) for name in names if name not in changed}
    return target(**given | changed)


_SHARED: dict[tuple[type, type], tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class TransitionRow:
    """One row of history: a detector `Transition` at its wall-clock moment `at`.

    `id` is 0 until the database assigns it; ids increase in the order rows were written and are
    never reused. `key` is unique per decision: a row whose key is already stored is not written again."""

    kind: Kind
    subject: str
    from_state: State
    to_state: State
    at: datetime
    reason: str
    relay: str | None = None  # the relay heard through, or (to `unreachable`) the relay blamed
    event: Event = Event.TRANSITION
    maintenance: bool = False  # a maintenance window covered the subject at `at`
    key: str | None = None
    id: int = 0

    def __post_init__(self) -> None:
        require_aware("at", self.at)


@dataclass(frozen=True, slots=True, kw_only=True)
class Change(TransitionRow):
    """A transition as just decided: its row, and the relays between the subject and the monitor
    then, nearest first (for maintenance and notifications; not a column)."""

    path: tuple[str, ...] = ()

    @classmethod
    def decided(
        cls, transition: Transition, at: datetime, path: tuple[str, ...], maintenance: bool, key: str
    ) -> Change:
        """The detector's `transition`, stamped with its wall-clock moment `at`."""
        t = transition  # spelled out, not `carried`: every decision passes here (a fleet's onboarding, 1M)
        return cls(
            kind=t.kind,
            subject=t.subject,
            from_state=t.from_state,
            to_state=t.to_state,
            at=at,
            reason=t.reason,
            relay=t.relay,
            event=t.event,
            maintenance=maintenance,
            key=key,
            path=path,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRow:
    """A host's current state (what the store keeps for a restart)."""

    id: str
    state: State
    since: datetime
    last_seen: datetime | None
    relay: str | None  # the relay the freshest evidence came through; None: beating directly
    interval_s: float
    seq: int | None
    flapping: bool
    source: str | None = None  # the watched source its relay vouches for it from; None: it beats

    def __post_init__(self) -> None:
        require_aware("since", self.since)
        require_aware("last_seen", self.last_seen)

    @classmethod
    def of(cls, host: HostTrack, wall: Wall) -> HostRow:
        return cls(  # spelled out, not `carried`: every host decision's journal line and SQL row pass here
            id=host.id,
            state=host.state,
            since=wall(host.since),
            last_seen=_wall_or_none(wall, host.last_seen),
            relay=host.via,
            interval_s=host.interval_s,
            seq=host.seq,
            flapping=host.flapping,
            source=host.source,
        )

    def snapshot(self, mono: Mono) -> HostSnapshot:
        """Back on the detector's clock, for `Detector.restore`."""
        return carried(self, HostSnapshot, since=mono(self.since), last_seen=_mono_or_none(mono, self.last_seen))


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayRow:
    """A relay's current state (what the store keeps for a restart)."""

    id: str
    state: State
    since: datetime
    last_seen: datetime | None
    parent: str | None
    boot: str | None
    seq: int | None
    flush_s: float
    flapping: bool

    def __post_init__(self) -> None:
        require_aware("since", self.since)
        require_aware("last_seen", self.last_seen)

    @classmethod
    def of(cls, relay: RelayTrack, wall: Wall) -> RelayRow:
        return carried(
            relay,
            cls,
            since=wall(relay.since),
            last_seen=_wall_or_none(wall, relay.last_seen),
            seq=None if relay.seq < 0 else relay.seq,
        )

    def snapshot(self, mono: Mono) -> RelaySnapshot:
        """Back on the detector's clock, for `Detector.restore`."""
        return carried(self, RelaySnapshot, since=mono(self.since), last_seen=_mono_or_none(mono, self.last_seen))


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectionRow:
    """What the detector held when it opened an outage (`monitor.quality.Opening`), in wall time:
    the row of `detections`, linked to its transition (`key` until written, `transition_id` after)."""

    kind: Kind
    subject: str
    state: State
    last_seen: datetime | None  # the last evidence of life
    decided_at: datetime
    seq: int | None
    interval_s: float
    timeout_s: float
    timeout_basis: str | None = None  # how a target-driven timeout was derived; None: the fixed or adaptive rule
    key: str | None = None
    transition_id: int | None = None
    at: datetime | None = None  # the transition's time (read back with it; not a column here)

    def __post_init__(self) -> None:
        require_aware("last_seen", self.last_seen)
        require_aware("decided_at", self.decided_at)
        require_aware("at", self.at)

    @property
    def detection_s(self) -> float | None:
        return None if self.last_seen is None else max(0.0, (self.decided_at - self.last_seen).total_seconds())


@dataclass(frozen=True, slots=True, kw_only=True)
class FalseAlarmRow:
    """An outage proved wrong (`monitor.quality.FalseAlarm`), in wall time: the row of `false_alarms`,
    linked to the transitions that opened and closed it (keys until written, ids after)."""

    kind: Kind
    subject: str
    opened_at: datetime
    closed_at: datetime
    proof: str  # monitor.quality.Proof
    detail: str
    seq_before: int | None
    seq_after: int | None
    seen_before: datetime | None
    seen_after: datetime | None
    recognised_at: datetime
    opened_key: str | None = None
    closed_key: str | None = None
    opened_id: int | None = None
    closed_id: int | None = None
    id: int = 0

    def __post_init__(self) -> None:
        for name in ("opened_at", "closed_at", "seen_before", "seen_after", "recognised_at"):
            require_aware(name, getattr(self, name))

    @property
    def duration_s(self) -> float:
        return max(0.0, (self.closed_at - self.opened_at).total_seconds())
