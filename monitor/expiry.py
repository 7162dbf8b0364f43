"""The monitor's expiry part: it sleeps until the detector's next deadline and hands it the time.

Before each pass it reads what already waits (`catch_up`: news late because we are behind is no
silence). A stalled event loop or input that outlasts the reading starts a timeout of grace, so
nobody is judged on news we have not read; the loop-lag probe notices stalls and measures lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from relaybeat.monitor.clock import Clock
from relaybeat.monitor.detector import Detector
from relaybeat.monitor.states import Transition

__all__ = ["EXPIRE_STEP", "EXPIRY_QUANTUM_S", "LOOP_PROBE_S", "STALL_S", "Expiry", "sleep_to_tick"]

log = logging.getLogger("relaybeat.monitor")

STALL_S = 1.0  # the event loop blocked this long means unread input may be waiting: grace, not judgement
LOOP_PROBE_S = 0.5  # how often the loop probe sleeps and measures how late it woke (under STALL_S)
LAG_WINDOW_S = 5.0  # the loop lag reported is the worst of this long
EXPIRY_QUANTUM_S = 0.02  # a deadline is decided at most this late (plus the loop's own latency)
# Subjects decided per step of a pass (heap entries, or hosts a mass event owes: a dead relay's):
# 100,000 hosts going silent at once, or behind a relay that dies, are decided in steps of a
# millisecond or two each, with the event loop free in between (the API answers, input is read).
EXPIRE_STEP = 200


async def sleep_to_tick(every_s: float) -> float:
    """Sleep until the event loop's clock next reaches a multiple of `every_s`; return that time.

    The monitor's periodic probes sleep this way (the loop probe every LOOP_PROBE_S, the database
    probe every DB_PROBE_S, a multiple of it), so they wake together: an idle monitor's wakeup costs
    it more CPU than the little each probe does."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    tick = (now // every_s + 1) * every_s
    await asyncio.sleep(tick - now)
    return tick


class Expiry:
    def __init__(
        self,
        detector: Detector,
        clock: Clock,
        decide: Callable[[list[Transition]], None],
        catch_up: Callable[[], Awaitable[None]],
    ) -> None:
        self.detector = detector
        self.clock = clock
        self.decide = decide  # where decisions go (the writer)
        self.catch_up = catch_up  # reads what already waits before each pass (the ingest)
        self.stalls = 0
        self.loop_lags_s: deque[float] = deque(maxlen=round(LAG_WINDOW_S / LOOP_PROBE_S))  # event-loop lag probes
        self.armed: float | None = None  # the deadline the loop sleeps until (None: no deadline)
        self._last_tick: float | None = None  # when the loop probe last ran (None: no probe running)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Pass now, whatever the deadline (e.g. the broker connection changed)."""
        self._wake.set()

    def news(self) -> None:
        """Input changed deadlines: wake only if the loop must pass earlier than it planned, or at
        once when a mass event left its hosts' part owed."""
        deadline = self.detector.next_deadline()
        if self.detector.owed or (deadline is not None and (self.armed is None or deadline < self.armed)):
            self._wake.set()

    async def run(self) -> None:
        while True:
            deadline = self.armed = self.detector.next_deadline()
            # At most one pass per EXPIRY_QUANTUM_S: thousands of hosts' deadlines (most of them merely
            # pushed back) are handled in a few passes a second, not one wake-up each.
            timeout = None if deadline is None else max(EXPIRY_QUANTUM_S, deadline - self.clock.now())
            if self.detector.owed:
                timeout = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            await self.catch_up()
            await self._expire_in_steps()

    def expire(self) -> None:
        """Hand the detector the current time: whatever deadline has passed is decided now.

        If the event loop was blocked for longer than STALL_S (the loop probe did not run), input may
        be waiting unread: a stalled monitor is as blind as a disconnected one, so everyone first
        gets a timeout of grace instead of being judged on news we have not read yet."""
        if self._last_tick is not None:
            self._check_stall()
        while True:
            now = self.clock.now()
            self.decide(self.detector.expire(now, EXPIRE_STEP))
            if not self.detector.due(now):
                return

    async def _expire_in_steps(self) -> None:
        """`expire`, yielding to the event loop between steps of EXPIRE_STEP subjects."""
        if self._last_tick is not None:
            self._check_stall()
        while True:
            now = self.clock.now()
            self.decide(self.detector.expire(now, EXPIRE_STEP))
            if not self.detector.due(now):
                return
            await asyncio.sleep(0)

    def late_s(self) -> float:
        """How far past its deadline the loop is (0 when it has none, or is not late)."""
        armed = self.armed
        return 0.0 if armed is None else max(0.0, self.clock.now() - armed)

    def _check_stall(self) -> None:
        """Called by the loop probe and before each expiry pass, whichever runs first after a stall."""
        now = self.clock.now()
        if self._last_tick is not None and now - self._last_tick > STALL_S:
            log.warning("monitor stalled for %.1f s: a timeout of grace before new decisions", now - self._last_tick)
            self.stalls += 1
            self.detector.regain_sight(now)
        self._last_tick = now

    async def watch_loop_lag(self, every_s: float = LOOP_PROBE_S) -> None:
        """Probe how late the event loop wakes a sleeper: a blocked loop delays every decision."""
        loop = asyncio.get_running_loop()
        while True:
            self._check_stall()
            tick = await sleep_to_tick(every_s)
            self.loop_lags_s.append(max(0.0, loop.time() - tick))

    @property
    def loop_lag_s(self) -> float:
        """The worst event-loop lag of the last few seconds."""
        return max(self.loop_lags_s, default=0.0)
