"""Maintenance windows: which subjects are in maintenance at a given moment.

Rules of this module:
- Pure and synchronous: no clock, no I/O. Callers pass the moment (an aware UTC datetime) and the
  subject's relay path; the shell loads the windows from SQL at start and keeps the book current.
- A window targets a host (by id), hosts by an id glob (`fnmatch`, case-sensitive), or a relay:
  a relay window covers the relay itself, every relay below it and every host heard through them.
- Windows are half-open, `[starts_at, end)`, where `end` is the earliest of `ends_at` and
  `removed_at` (either may be None: "until removed", "not removed"). Removing a window keeps it,
  so past maintenance still counts in availability reports.
- Maintenance changes no decision: transitions are still recorded, only marked.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from relaybeat.monitor.states import Kind

__all__ = ["MaintenanceBook", "TargetKind", "Window"]


class TargetKind(StrEnum):
    HOST = "host"  # one host id
    GLOB = "glob"  # host ids matching an fnmatch pattern, e.g. "web-*"
    RELAY = "relay"  # a relay, its whole subtree and every host behind them


@dataclass(frozen=True, slots=True)
class Window:
    """One maintenance window as stored (the `maintenance` table)."""

    id: int
    target_kind: TargetKind
    target: str
    starts_at: datetime
    ends_at: datetime | None
    reason: str
    created_at: datetime
    removed_at: datetime | None = None

    @property
    def end(self) -> datetime | None:
        """When the window stops covering anyone (None: not yet known, i.e. until removed)."""
        ends = [moment for moment in (self.ends_at, self.removed_at) if moment is not None]
        return min(ends) if ends else None

    def active_at(self, at: datetime) -> bool:
        end = self.end
        return self.starts_at <= at and (end is None or at < end)

    def matches(self, kind: Kind, subject: str, relay_path: Sequence[str]) -> bool:
        """Whether this window's target includes the subject, wherever in time.

        `relay_path` lists the relays between the subject and the monitor, nearest first: for a
        host its relay and that relay's ancestors; for a relay its ancestors (itself may be included).
        """
        if self.target_kind is TargetKind.RELAY:
            return (kind is Kind.RELAY and subject == self.target) or self.target in relay_path
        if kind is not Kind.HOST:
            return False
        if self.target_kind is TargetKind.HOST:
            return subject == self.target
        return fnmatch.fnmatchcase(subject, self.target)


class MaintenanceBook:
    """Every maintenance window the monitor knows, removed ones included, by id."""

    def __init__(self, windows: Iterable[Window] = ()) -> None:
        self._windows: dict[int, Window] = {}
        self.load(windows)

    def load(self, windows: Iterable[Window]) -> None:
        """Replace the book's contents (at start, from SQL)."""
        self._windows = {window.id: window for window in windows}

    def add(self, window: Window) -> None:
        """Add a window, or replace the one with the same id."""
        self._windows[window.id] = window

    def remove(self, window_id: int, at: datetime) -> Window | None:
        """Mark a window removed from `at` on; None if there is no such window or it was removed already."""
        window = self._windows.get(window_id)
        if window is None or window.removed_at is not None:
            return None
        removed = replace(window, removed_at=at)
        self._windows[window_id] = removed
        return removed

    def get(self, window_id: int) -> Window | None:
        return self._windows.get(window_id)

    def windows(self) -> list[Window]:
        """Every window, removed ones included, by id."""
        return [self._windows[i] for i in sorted(self._windows)]

    def active(self, at: datetime) -> list[Window]:
        return [window for window in self.windows() if window.active_at(at)]

    def covers(self, kind: Kind, subject: str, relay_path: Sequence[str], at: datetime) -> bool:
        """Whether the subject is in maintenance at `at`."""
        return any(w.active_at(at) and w.matches(kind, subject, relay_path) for w in self._windows.values())

    def intervals(self, kind: Kind, subject: str, relay_path: Sequence[str]) -> list[tuple[datetime, datetime | None]]:
        """The subject's maintenance as `[start, end)` intervals (end None: open), in start order."""
        spans = [
            (w.starts_at, w.end)
            for w in self._windows.values()
            if w.matches(kind, subject, relay_path) and (w.end is None or w.starts_at < w.end)
        ]
        return sorted(spans, key=lambda span: span[0])
