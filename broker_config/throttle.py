"""Failed-login throttling for the embedded broker: `LoginThrottle` (pure: time comes in as `now`),
`FairGate` (asyncio, serves password checks to source addresses in turn) and `PasswordChecks`
(the two together, around each slow password check). No amqtt, no I/O."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)

FAILED_LOGIN_BURST: Final = 10  # failed logins a source may have at once ...
FAILED_LOGINS_PER_S: Final = 1.0  # ... and then this many per second
REFUSAL_LOG_INTERVAL_S: Final = 10.0  # one log line per source per interval while it is refused
_FORGET_INTERVAL_S: Final = 60.0


@dataclass(slots=True)
class _SourceRecord:
    tokens: float
    updated: float
    refused: int = 0  # refusals since the last log line
    logged: float | None = None


class LoginThrottle:
    """Failed logins per source address, as a token bucket: a source may fail `burst` times, then
    `per_second` times a second. While its bucket is empty, its CONNECTs are refused (CONNACK 3,
    "server unavailable": try later) before any password check, so a storm of bad logins costs no
    argon2 time. A check takes a token when it starts and gives it back if the password is right, so
    guesses waiting behind a check are refused too. (`PasswordChecks` keeps the checks that do run
    from making other sources wait.)

    Refusals are counted (`refused`) and logged at most once per source per REFUSAL_LOG_INTERVAL_S.
    Time comes in as `now` (monotonic seconds); nothing here reads a clock.
    """

    def __init__(self, burst: int = FAILED_LOGIN_BURST, per_second: float = FAILED_LOGINS_PER_S) -> None:
        if burst < 1 or per_second <= 0:
            msg = "burst must be >= 1 and per_second > 0"
            raise ValueError(msg)
        self.burst = burst
        self.per_second = per_second
        self.refused = 0
        self._records: dict[str, _SourceRecord] = {}
        self._forgot_at: float | None = None

    def _tokens(self, record: _SourceRecord, now: float) -> float:
        return min(float(self.burst), record.tokens + max(0.0, now - record.updated) * self.per_second)

    def may_try(self, source: str, now: float) -> bool:
        """Whether a login from `source` may be checked now; a refusal is counted and maybe logged."""
        record = self._records.get(source)
        if record is None or self._tokens(record, now) >= 1.0:
            return True
        self.refused += 1
        record.refused += 1
        if record.logged is None or now - record.logged >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d login(s) from %s without checking them: more than %d failed logins "
                "(then %g/s); %d refused in all",
                record.refused, source, self.burst, self.per_second, self.refused,
            )  # fmt: skip
            record.refused, record.logged = 0, now
        return False

    def take(self, source: str, now: float) -> None:
        """A password check for `source` starts: it costs one token (`give_back` if it succeeds)."""
        record = self._records.get(source)
        if record is None:
            record = self._records[source] = _SourceRecord(float(self.burst), now)
        record.tokens, record.updated = self._tokens(record, now) - 1.0, now
        self._forget_recovered(now)

    def failed_recently(self, source: str, now: float, checking: int = 0) -> bool:
        """Whether `source` has a failed login not yet earned back, not counting the tokens its
        `checking` checks still running took (they may yet succeed)."""
        record = self._records.get(source)
        return record is not None and self._tokens(record, now) + checking < self.burst

    def give_back(self, source: str, now: float) -> None:
        """The login from `source` succeeded: only failures cost."""
        record = self._records.get(source)
        if record is not None:
            record.tokens, record.updated = min(float(self.burst), self._tokens(record, now) + 1.0), now

    def _forget_recovered(self, now: float) -> None:
        """Drop sources whose bucket is full again, so the table does not grow without end."""
        if self._forgot_at is not None and now - self._forgot_at < _FORGET_INTERVAL_S:
            return
        self._forgot_at = now
        for source, record in list(self._records.items()):
            if self._tokens(record, now) >= self.burst:
                del self._records[source]


def _always_shares(source: str, holding: int) -> bool:
    return True


class FairGate:
    """At most `slots` holders at once (one per password-check thread). Waiters are served one source
    at a time, in turn: a source with 500 CONNECTs waiting delays a source with one by at most one
    turn, and a source alone may use every slot (many leaves behind one NAT address) unless
    `may_share(source, holding)` says no: then a source that holds a slot waits for it to end, and
    the other slots stay free for whoever comes next (`PasswordChecks` says no to failing sources)."""

    def __init__(self, slots: int, may_share: Callable[[str, int], bool] = _always_shares) -> None:
        if slots < 1:
            msg = "slots must be >= 1"
            raise ValueError(msg)
        self._free = slots
        self._may_share = may_share
        self._holding: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}  # in turn order

    def _may_hold(self, source: str) -> bool:
        holding = self._holding[source]
        return holding == 0 or self._may_share(source, holding)

    @contextlib.asynccontextmanager
    async def turn(self, source: str) -> AsyncIterator[None]:
        granted = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(source, collections.deque()).append(granted)
        self._pass_on()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # cancelled just after its turn came
                self._release(source)
            raise
        try:
            yield
        finally:
            self._release(source)

    def _release(self, source: str) -> None:
        self._holding[source] -= 1
        if not self._holding[source]:
            del self._holding[source]
        self._free += 1
        self._pass_on()

    def _pass_on(self) -> None:
        """Free slots go to the first waiter of the next source in turn that may hold one more (that
        source then goes last); cancelled waiters are dropped."""
        while self._free > 0:
            source = next((source for source in self._waiting if self._may_hold(source)), None)
            if source is None:
                return
            queue = self._waiting.pop(source)
            granted = queue.popleft()
            if queue:
                self._waiting[source] = queue
            if not granted.done():  # a cancelled waiter is skipped
                granted.set_result(None)
                self._free -= 1
                self._holding[source] += 1


class PasswordChecks:
    """The slow password checks (argon2) of logins, in turn per source (`FairGate`, one slot per
    check thread) and paid for from the source's failed-login budget (`LoginThrottle`). A login that
    needs no slow check (a returning client, `RecentLogins`) never queues here.

    A source with a failed login not yet earned back runs one check at a time: a storm of guesses
    keeps at most one check thread busy, so a client from elsewhere finds another one free."""

    def __init__(self, throttle: LoginThrottle, slots: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.throttle = throttle
        self._clock = clock
        self._gate = FairGate(slots, self._may_share)

    def _may_share(self, source: str, holding: int) -> bool:
        return not self.throttle.failed_recently(source, self._clock(), holding)

    async def run(self, source: str, check: Callable[[], Awaitable[bool]]) -> bool | None:
        """`await check()` in `source`'s turn and return its result, or None without checking when
        `source` ran out of failed logins while it waited. A check that fails keeps its token."""
        async with self._gate.turn(source):
            if not self.throttle.may_try(source, self._clock()):
                return None
            self.throttle.take(source, self._clock())
            ok = await check()
        if ok:
            self.throttle.give_back(source, self._clock())
        return ok
