"""Availability of one subject over a time window, from its state changes and maintenance.

Rules of this module:
- Pure: callers pass the state before the first change, the changes `(at, state)`, the subject's
  maintenance intervals and the window; nothing is read from a clock or a database.
- Exact at the edges: the window is `[since, until)`; a change at or before `since` sets the state
  at `since`, a change at or after `until` is ignored. Arithmetic is in `timedelta` (integer
  microseconds), so nothing drifts by rounding.
- Every instant of the window is counted exactly once: as `maintenance` when a maintenance
  interval covers it, whatever the state (a down period inside maintenance is maintenance, not
  downtime), otherwise as the state the subject was in (`up`, `down`, `unreachable`, `stopped`,
  `unknown`).
- Time the detector wrongly held the subject out (a false alarm: `down` or `unreachable` proved
  wrong, monitor/quality.py) is counted as `false_alarm`, not as the state (maintenance still
  comes first): the subject was up, but the operator was told otherwise.
- An outage is a maximal period in state `down` with at least some of it outside maintenance and
  false alarms; its length is that part. `uptime_ratio` is up / (up + down): unreachable, stopped, unknown and
  maintenance time say nothing about whether the subject itself was up, so they are left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from relaybeat.monitor.states import State

__all__ = ["DEFAULT_WINDOW", "Availability", "availability", "merge_intervals", "report_window"]

ZERO = timedelta(0)
DEFAULT_WINDOW = timedelta(hours=24)
EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Availability:
    since: datetime
    until: datetime
    time_in: dict[State, timedelta]  # outside maintenance, per state (every state present)
    maintenance: timedelta
    outages: int
    longest_outage: timedelta
    false_alarm: timedelta = ZERO  # time wrongly held down or unreachable, outside maintenance

    @property
    def up(self) -> timedelta:
        return self.time_in[State.UP]

    @property
    def down(self) -> timedelta:
        return self.time_in[State.DOWN]

    @property
    def uptime_ratio(self) -> float | None:
        """up / (up + down); None when the window holds neither."""
        known = self.up + self.down
        return None if known == ZERO else self.up / known

    @property
    def mean_time_to_recovery(self) -> timedelta | None:
        """Mean outage length in the window (an outage open at `until` counts up to `until`)."""
        return None if self.outages == 0 else self.down / self.outages


def merge_intervals(
    intervals: Iterable[tuple[datetime, datetime | None]], since: datetime, until: datetime
) -> list[tuple[datetime, datetime]]:
    """Intervals `[start, end)` (end None: open) clipped to `[since, until)`, merged and sorted."""
    clipped = sorted(
        (max(start, since), until if end is None else min(end, until))
        for start, end in intervals
        if start < until and (end is None or end > since)
    )
    merged: list[tuple[datetime, datetime]] = []
    for start, end in clipped:
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _overlap(start: datetime, end: datetime, intervals: Sequence[tuple[datetime, datetime]]) -> timedelta:
    total = ZERO
    for a, b in intervals:
        if b <= start:
            continue
        if a >= end:
            break
        total += min(b, end) - max(a, start)
    return total


def availability(
    initial: State,
    changes: Iterable[tuple[datetime, State]],
    maintenance: Iterable[tuple[datetime, datetime | None]],
    since: datetime,
    until: datetime,
    false_alarms: Iterable[tuple[datetime, datetime]] = (),
) -> Availability:
    """The subject's availability over `[since, until)`.

    `initial` is its state before the first of `changes`; `changes` are `(at, new state)` in the
    order they happened (equal times keep their order); `maintenance` are `[start, end)` intervals,
    and so are `false_alarms` (outages proved wrong: counted apart from the state they were in).
    """
    if until < since:
        msg = f"until ({until.isoformat()}) is before since ({since.isoformat()})"
        raise ValueError(msg)
    state = initial
    # The window's state timeline as non-empty segments [start, end) with a state.
    segments: list[tuple[datetime, datetime, State]] = []
    start = since
    for at, new in sorted(changes, key=lambda change: change[0]):
        if at >= until:
            break
        if at > start:
            segments.append((start, at, state))
            start = at
        state = new
    if until > start:
        segments.append((start, until, state))

    covered = merge_intervals(maintenance, since, until)
    mistaken = _minus(merge_intervals(false_alarms, since, until), covered)
    time_in = dict.fromkeys(State, ZERO)
    wrong = ZERO
    for a, b, state in segments:
        outside = (b - a) - _overlap(a, b, covered)
        if state in (State.DOWN, State.UNREACHABLE):
            mistake = _overlap(a, b, mistaken)
            wrong += mistake
            outside -= mistake
        time_in[state] += outside
    excluded = merge_intervals([*covered, *mistaken], since, until)

    # Outages: maximal runs of down (adjacent down segments are one run), less their maintenance.
    outages, longest = 0, ZERO
    run: tuple[datetime, datetime] | None = None
    for a, b, state in [*segments, (until, until, State.UNKNOWN)]:
        if state == State.DOWN:
            run = (a, b) if run is None else (run[0], b)
            continue
        if run is not None:
            length = (run[1] - run[0]) - _overlap(run[0], run[1], excluded)
            if length > ZERO:
                outages += 1
                longest = max(longest, length)
            run = None

    maintenance_total = sum((b - a for a, b in covered), ZERO)
    return Availability(since, until, time_in, maintenance_total, outages, longest, wrong)


def _minus(
    intervals: Sequence[tuple[datetime, datetime]], cut: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """Merged, sorted `intervals` with the merged, sorted `cut` taken out."""
    out: list[tuple[datetime, datetime]] = []
    for start, end in intervals:
        for a, b in cut:
            if b <= start or a >= end:
                continue
            if a > start:
                out.append((start, a))
            start = max(start, b)
            if start >= end:
                break
        if start < end:
            out.append((start, end))
    return out


def report_window(since: datetime | None, until: datetime | None, now: datetime) -> tuple[datetime, datetime] | str:
    """A report's window `[since, until)` in UTC, cut at `now` (empty if it starts later), or why the
    query is wrong. `since` defaults to 24 h before `until`, `until` to now. Times beyond the years
    1–9999 in UTC are taken as unbounded on that side."""
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            return f"{name} needs a time zone (e.g. Z)"
    end = now
    if until is not None:
        try:
            end = min(until.astimezone(UTC), now)
        except OverflowError:  # e.g. 9999-12-31T23:00:00-02:00 is after 9999 in UTC; 0001-01-01T00:00+01:00 before 1
            end = now if until.year > 1 else EARLIEST
    if since is None:
        start = end - DEFAULT_WINDOW if end - EARLIEST > DEFAULT_WINDOW else EARLIEST
    else:
        try:
            start = since.astimezone(UTC)
        except OverflowError:
            start = EARLIEST if since.year == 1 else end
    return min(start, end), end
