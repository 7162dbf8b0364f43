"""The monitor's clock: monotonic seconds for decisions, wall-clock UTC only for what is stored and shown.

Everything that reads time takes a `Clock`; tests, benches and replays pass a `HandClock` (any class
with these three methods will do)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "HandClock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds: the detector's time, for every decision and deadline."""
        ...

    def wall(self, t: float) -> datetime:
        """The aware UTC moment of `t` (a `now()` reading), for rows and views."""
        ...

    def mono(self, moment: datetime) -> float:
        """The `now()` reading of a wall moment (the inverse of `wall`), for state loaded from SQL."""
        ...


class SystemClock:
    """The real clock: `time.monotonic()`, put on the wall by the offset measured at creation."""

    def __init__(self) -> None:
        self.offset = time.time() - time.monotonic()

    def now(self) -> float:
        return time.monotonic()

    def wall(self, t: float) -> datetime:
        return datetime.fromtimestamp(t + self.offset, UTC)

    def mono(self, moment: datetime) -> float:
        return moment.timestamp() - self.offset


class HandClock:
    """A clock moved only by its user: `clock.t += 10.0` is ten seconds later.

    Monotonic time starts at `start`. Wall time is monotonic time plus a fixed whole-second offset
    taken from the real clocks at creation, so stored times are near today's and both they and the
    differences between them are exact.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start
        self.offset = float(round(time.time() - time.monotonic()))

    def now(self) -> float:
        return self.t

    def wall(self, t: float) -> datetime:
        return datetime.fromtimestamp(t + self.offset, UTC)

    def mono(self, moment: datetime) -> float:
        return moment.timestamp() - self.offset
