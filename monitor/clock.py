"""The monitor's clock: monotonic seconds for decisions, wall-clock UTC only for what is stored and shown.

Everything that reads time takes a `Clock`; tests pass a hand-driven one (any class with these
three methods will do)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


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
