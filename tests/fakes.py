"""Stand-ins the tests drive by hand. Only time is faked: brokers, databases and processes are real."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class FakeClock:
    """A `monitor.clock.Clock`, moved only by the test: `clock.t += 10.0` is ten seconds later.

    Monotonic time starts at 1000 s. Wall time is monotonic time plus a fixed whole-second offset
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
