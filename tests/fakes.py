"""Stand-ins the tests drive by hand. Only time is faked: brokers, databases and processes are real."""

from __future__ import annotations

from relaybeat.monitor.clock import HandClock

__all__ = ["FakeClock"]

FakeClock = HandClock  # a `monitor.clock.Clock` moved only by the test: `clock.t += 10.0` is ten seconds later
