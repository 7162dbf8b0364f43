"""Dating bundles by when their relay sent them, not by when they reached the monitor.

Rules of this module:
- Pure and synchronous: callers pass `arrival` (the monitor's monotonic seconds); nothing here
  reads a clock or does I/O.
- A version 2 bundle carries `sent_ms`, its relay's monotonic time since boot when it was sent. Per
  relay boot, `zero` puts that on our clock: sent = zero + sent_ms / 1000. Transit only ever adds
  delay, so `zero` is the smallest `arrival - sent` seen, i.e. taken from the freshest deliveries;
  it may creep up by DRIFT per second of relay time, so two monotonic clocks ticking at slightly
  different rates never make a relay's news look older and older.
- A boot's clock is *confirmed* by two bundles in a row that arrived at least half as far apart as
  they were sent (both came about as fast as they were sent: live). Until then no bundle of that
  boot can be dated: a backlog replayed from a persistent session, or delivered late by a cluster,
  arrives much faster than it was sent, and its first bundle looks as fresh as the last. `date`
  returns None for those, and they are no evidence of life; once confirmed, even a bundle delivered
  long after it was sent is dated when it was sent.
- Bundles without `sent_ms` (version 1) are dated on arrival, as before.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["DRIFT", "Dating"]

DRIFT = 0.001  # how fast `zero` may creep up: 1 ms per second of relay time (1000 ppm, beyond any NTP slew)
BOOTS_KEPT = 4  # clocks kept per relay (a late bundle of a previous boot must not reset the current one)


@dataclass(slots=True)
class _BootClock:
    zero: float  # our clock's reading at the relay's sent_ms 0
    sent_s: float  # the newest send time seen, relay seconds since boot
    arrival: float  # when that bundle arrived, our clock
    confirmed: bool = False


class Dating:
    """The send-time clocks of every relay boot heard, each kept from the bundles that name it."""

    def __init__(self, drift: float = DRIFT) -> None:
        self.drift = drift
        self._clocks: dict[str, OrderedDict[str, _BootClock]] = {}

    def date(self, relay: str, boot: str, sent_ms: int | None, arrival: float) -> float | None:
        """When a top-level bundle was sent, on our clock (never later than its `arrival`); None while
        its boot's clock is unconfirmed (the bundle proves nothing about now)."""
        if sent_ms is None:
            return arrival
        sent_s = sent_ms / 1000
        boots = self._clocks.setdefault(relay, OrderedDict())
        clock = boots.get(boot)
        if clock is None:
            boots[boot] = _BootClock(arrival - sent_s, sent_s, arrival)
            while len(boots) > BOOTS_KEPT:
                boots.popitem(last=False)
            return None
        boots.move_to_end(boot)
        offset = arrival - sent_s
        if sent_s > clock.sent_s:
            sent_gap, arrival_gap = sent_s - clock.sent_s, arrival - clock.arrival
            clock.zero = min(clock.zero + self.drift * sent_gap, offset)
            if arrival_gap >= sent_gap / 2:
                clock.confirmed = True
            clock.sent_s, clock.arrival = sent_s, arrival
        else:  # a duplicate or an older bundle: it can still show the clock runs earlier than thought
            clock.zero = min(clock.zero, offset)
        return min(clock.zero + sent_s, arrival) if clock.confirmed else None

    def sent_at(self, relay: str, boot: str, sent_ms: int) -> float | None:
        """A bundle's send time by the boot's clock as it stands now (a bundle held while it was not
        confirmed); None while it still is not."""
        clock = self._clock(relay, boot)
        if clock is None or not clock.confirmed:
            return None
        return clock.zero + sent_ms / 1000

    def confirmed(self, relay: str, boot: str) -> bool:
        clock = self._clock(relay, boot)
        return clock is not None and clock.confirmed

    def _clock(self, relay: str, boot: str) -> _BootClock | None:
        boots = self._clocks.get(relay)
        return None if boots is None else boots.get(boot)
