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
    STOPPED = "stopped"  # the leaf said it was stopping, or the relay said it stopped (a clean stop)
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


# Every state change the detector may make, with what causes it. The detector refuses any other
# (a missing entry is a bug and says which); the README's state diagrams are generated from these.
HOST_TRANSITIONS: dict[tuple[State, State], str] = {
    (State.UNKNOWN, State.UP): "fresh beat",
    (State.UNKNOWN, State.DOWN): "first news already older than its timeout",
    (State.UNKNOWN, State.STOPPED): "stopping beat",
    (State.UNKNOWN, State.UNREACHABLE): "relay on its path down",
    (State.UP, State.DOWN): "no beat for its timeout, relay alive; or its watched source said offline",
    (State.UP, State.STOPPED): "stopping beat",
    (State.UP, State.UNREACHABLE): "relay on its path down, or its watched bridge or node",
    (State.UP, State.UNKNOWN): "no beat for its timeout, a relay on its path stopped: no news is no evidence",
    (State.DOWN, State.UP): "fresh beat",
    (State.DOWN, State.STOPPED): "stopping beat",
    (State.STOPPED, State.UP): "fresh beat",
    (State.STOPPED, State.DOWN): "newer beat, already older than its timeout",
    (State.UNREACHABLE, State.UP): "path back, fresh beat",
    (State.UNREACHABLE, State.DOWN): "path back, its age says it died meanwhile",
    (State.UNREACHABLE, State.STOPPED): "path back, stopping beat",
    (State.UNREACHABLE, State.UNKNOWN): "path back, no news of it yet",
}

RELAY_TRANSITIONS: dict[tuple[State, State], str] = {
    (State.UNKNOWN, State.UP): "fresh bundle",
    (State.UNKNOWN, State.DOWN): "first bundle already older than its timeout",
    (State.UNKNOWN, State.UNREACHABLE): "relay above it down",
    (State.UNKNOWN, State.STOPPED): "it said it stopped (a clean stop)",
    (State.UP, State.DOWN): "no bundle for flush × misses, or its last will",
    (State.UP, State.UNREACHABLE): "relay above it down",
    (State.UP, State.STOPPED): "it said it stopped (a clean stop)",
    (State.UP, State.UNKNOWN): "no bundle for its timeout, a relay above it stopped",
    (State.DOWN, State.UP): "fresh bundle",
    (State.DOWN, State.STOPPED): "it said it stopped (a clean stop)",
    (State.STOPPED, State.UP): "fresh bundle",
    (State.UNREACHABLE, State.UP): "relay above it back, its own news fresh",
    (State.UNREACHABLE, State.DOWN): "relay above it back, its own news too old",
    (State.UNREACHABLE, State.UNKNOWN): "relay above it back, no news of it yet",
    (State.UNREACHABLE, State.STOPPED): "it said it stopped (a clean stop)",
}

TRANSITIONS: dict[Kind, dict[tuple[State, State], str]] = {Kind.HOST: HOST_TRANSITIONS, Kind.RELAY: RELAY_TRANSITIONS}


def state_diagram(kind: Kind) -> str:
    """A Mermaid state diagram of one kind's transition table (pasted into the README by a test)."""
    lines = ["stateDiagram-v2", "    [*] --> unknown"]
    lines += [f"    {a.value} --> {b.value}: {cause}" for (a, b), cause in TRANSITIONS[kind].items()]
    return "\n".join(lines)
