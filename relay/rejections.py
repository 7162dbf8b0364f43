"""Bad input is counted by reason and logged at a rate-limited warning; it never stops a service."""

from __future__ import annotations

import logging
import time
from collections import Counter


class Rejections:
    """Counts rejected inputs by reason; logs at most one warning per reason per `every_s`."""

    def __init__(self, log: logging.Logger, every_s: float = 10.0) -> None:
        self.counts: Counter[str] = Counter()
        self._log = log
        self._every_s = every_s
        self._last_logged: dict[str, float] = {}

    def add(self, reason: str, source: str, detail: str = "", *, with_traceback: bool = False) -> None:
        """`with_traceback`: the warning carries the exception being handled (for bugs, not bad input)."""
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_logged.get(reason, -self._every_s) >= self._every_s:
            self._last_logged[reason] = now
            self._log.warning(
                "rejected %s from %s: %s (%d so far)", reason, source[:120], detail[:200], self.counts[reason],
                exc_info=with_traceback,
            )  # fmt: skip
