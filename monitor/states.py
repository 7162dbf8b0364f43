"""The vocabulary the detector speaks and the store persists: states, kinds, transitions."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    HOST = "host"
    RELAY = "relay"


class State(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"
    STOPPED = "stopped"  # hosts only: the leaf said it was stopping
    UNREACHABLE = "unreachable"  # the nearest relay on the path is down


class Event(StrEnum):
    """What a row in `transitions` records. Most rows are state changes; some are notable events."""

    TRANSITION = "transition"
    RESTART = "restart"  # the leaf's seq went back: it restarted, whether or not a deadline was missed
    FLAPPING_START = "flapping_start"
    FLAPPING_END = "flapping_end"


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of history. `at` is on the detector's clock (monotonic seconds); the shell converts."""

    kind: Kind
    subject: str
    from_state: State
    to_state: State
    at: float
    reason: str
    relay: str | None = None
    event: Event = Event.TRANSITION
