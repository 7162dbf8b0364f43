"""The outbox worker: delivers queued webhook messages, in order per target, until each one lands.

It only moves rows and bytes:
- messages are rows of the `outbox` table, written in the transaction of the transitions they are
  about, so a message exists exactly when its transitions do: a restart loses nothing;
- each target gets its messages one at a time in id order (an outage never arrives after its
  recovery); a failure (connection refused, timeout, non-2xx) is retried with jittered exponential
  backoff, the same message first, until it lands or is older than `give_up_after_s`;
- a message is done once its row says `delivered_at`: after a 2xx the worker records that before
  anything else, and never resends a message it knows was delivered, even if recording it fails
  for a while. Only a crash between the 2xx and the record can send a message twice; every
  attempt carries the same `Idempotency-Key`, so the receiver can drop the repeat.
- each attempt first claims its row (`Store.outbox_claim`, a conditional update timed by the
  database): a message another monitor is sending is left alone, so across monitors (a takeover
  included) each one is sent once, unless a monitor died between the 2xx and recording it.
- URLs may hold secrets (many webhook services put a token in the path): logs name the target,
  never the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx

from relaybeat.errors import SettingsError
from relaybeat.monitor.notify import Target, signature
from relaybeat.monitor.store import OutboxRow, Store

__all__ = ["NotifySettings", "OutboxWorker", "Webhook", "backoff_s"]

log = logging.getLogger("relaybeat.notify")

USER_AGENT = "relaybeat-webhook/1"
BATCH = 50  # rows read per target at a time
PURGE_EVERY_S = 3600.0
CLAIM_MARGIN_S = 5.0  # a claim outlasts the attempt's timeout by this much
CLAIMED_RETRY_S = 1.0  # a message another monitor holds: look again after this


@dataclass(frozen=True, slots=True)
class Webhook:
    """One webhook target: where to POST, how to sign, and what it wants (`target`)."""

    target: Target
    url: str = field(repr=False)  # may hold a token: never logged
    secret: str | None = field(default=None, repr=False)
    timeout_s: float = 10.0

    @property
    def name(self) -> str:
        return self.target.name


@dataclass(frozen=True, slots=True)
class NotifySettings:
    webhooks: tuple[Webhook, ...] = ()
    retry_min_s: float = 1.0  # the first retry waits about this long, then twice as long each time
    retry_max_s: float = 300.0  # ... up to this
    give_up_after_s: float = 7 * 86_400.0  # a message still undelivered this long after it was queued
    keep_delivered_s: float = 7 * 86_400.0  # delivered and abandoned rows are deleted after this
    targets: tuple[Target, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = [w.name for w in self.webhooks]
        if len(set(names)) != len(names):
            msg = f"webhook names must be unique, got {names}"
            raise SettingsError(msg)
        if not 0 < self.retry_min_s <= self.retry_max_s:
            msg = "need 0 < retry_min_s <= retry_max_s"
            raise SettingsError(msg)
        object.__setattr__(self, "targets", tuple(w.target for w in self.webhooks))


def backoff_s(attempts: int, settings: NotifySettings, jitter: float = 1.0) -> float:
    """The wait after `attempts` failed attempts: min_s × 2^(attempts-1), capped, scaled by
    `jitter` in [0.5, 1] so that many failing messages do not retry in step."""
    base = min(settings.retry_max_s, settings.retry_min_s * 2.0 ** min(attempts - 1, 60))
    return base * (0.5 + 0.5 * min(1.0, max(0.0, jitter)))


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


class OutboxWorker:
    """Delivers the outbox. `poke()` after queueing messages; `run()` until cancelled."""

    def __init__(
        self,
        store: Store,
        settings: NotifySettings,
        *,
        wall: Callable[[], datetime] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        jitter: Callable[[], float] = random.random,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.active = active  # False on a hot standby: it sends nothing
        self.claimer = uuid.uuid4().hex[:16]  # this process, in the rows it claims
        self.settings = settings
        self.webhooks = {w.name: w for w in settings.webhooks}
        self.wall = wall or (lambda: datetime.now(UTC))
        self.transport = transport
        self.jitter = jitter
        self.delivered = 0
        self.failed_attempts = 0
        self.abandoned = 0
        self.steps = 0  # attempts finished and deliveries recorded; `progress` is notified after each
        self.progress = asyncio.Condition()
        self._wake = asyncio.Event()
        self._unrecorded: dict[int, tuple[datetime, int]] = {}  # delivered, not yet recorded: id -> (at, attempts)
        self._last_purge: datetime | None = None

    def poke(self) -> None:
        """New messages are queued: look now rather than at the next scheduled attempt."""
        self._wake.set()

    async def run(self) -> None:
        if not self.webhooks:
            return
        # httpx logs every request with its URL at INFO; a webhook URL may hold a token.
        httpx_log = logging.getLogger("httpx")
        httpx_log.setLevel(max(httpx_log.getEffectiveLevel(), logging.WARNING))
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False) as client:
            await self._warn_about_unknown_targets()
            failures = 0
            while True:
                self._wake.clear()
                try:
                    wait_s = await self.deliver_due(client)
                    failures = 0
                except Exception as exc:  # the database is down: keep everything, look again soon
                    failures += 1
                    wait_s = backoff_s(failures, self.settings, self.jitter())
                    log.warning("notifications: outbox unavailable (%s); retrying in %.1f s", exc, wait_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()

    async def deliver_due(self, client: httpx.AsyncClient) -> float | None:
        """Send whatever is due, target by target (targets in parallel). Seconds until the next
        scheduled attempt, None when nothing is pending (or this monitor is a standby)."""
        if not self.active():
            return None
        await self._record_delivered()
        # Every target's drain ends before this returns, errors or not: never two drains of one target.
        results = await asyncio.gather(
            *(self._drain(client, h) for h in self.webhooks.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        await self._purge()
        pending = [w for w in results if isinstance(w, float)]
        return min(pending) if pending else None

    async def _drain(self, client: httpx.AsyncClient, hook: Webhook) -> float | None:
        while True:
            rows = [
                r for r in await self.store.outbox(hook.name, pending=True, limit=BATCH) if r.id not in self._unrecorded
            ]
            if not rows:
                return None
            for row in rows:
                now = self.wall()
                if row.next_attempt_at > now:
                    return (row.next_attempt_at - now).total_seconds()
                if not self.active():
                    return None
                if not await self.store.outbox_claim(row.id, self.claimer, hook.timeout_s + CLAIM_MARGIN_S):
                    return CLAIMED_RETRY_S  # another monitor is sending it; later ones wait (order per target)
                try:
                    retry_in = await self._attempt(client, hook, row)
                finally:
                    await self._step()
                if retry_in is not None:
                    return retry_in

    async def _attempt(self, client: httpx.AsyncClient, hook: Webhook, row: OutboxRow) -> float | None:
        """One delivery attempt; None when the message is done (delivered or abandoned), else the wait."""
        body = row.body.encode()
        timestamp = int(self.wall().timestamp())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Idempotency-Key": row.key,
            "X-Relaybeat-Event": row.type.value,
            "X-Relaybeat-Timestamp": str(timestamp),
        }
        if hook.secret is not None:
            headers["X-Relaybeat-Signature"] = signature(hook.secret, timestamp, body)
        attempts = row.attempts + 1
        retry_after: float | None = None
        try:
            response = await client.post(hook.url, content=body, headers=headers, timeout=hook.timeout_s)
        except httpx.TimeoutException:
            error = f"no answer within {hook.timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        else:
            if response.is_success:
                self._unrecorded[row.id] = (self.wall(), attempts)
                self.delivered += 1
                await self._record_delivered()
                return None
            error = f"HTTP {response.status_code}"
            retry_after = _retry_after_s(response)
        self.failed_attempts += 1
        now = self.wall()
        if (now - row.created_at).total_seconds() >= self.settings.give_up_after_s:
            self.abandoned += 1
            log.error(
                "notifications: gave up on message %d for %r after %d attempts: %s", row.id, hook.name, attempts, error
            )
            await self.store.outbox_abandoned(row.id, now, attempts, error)
            return None
        wait_s = backoff_s(attempts, self.settings, self.jitter())
        if retry_after is not None:
            wait_s = max(wait_s, min(retry_after, self.settings.retry_max_s))
        log.warning(
            "notifications: message %d for %r failed (%s), attempt %d; next in %.1f s",
            row.id, hook.name, error, attempts, wait_s,
        )  # fmt: skip
        await self.store.outbox_failed(row.id, attempts, now + timedelta(seconds=wait_s), error)
        return wait_s

    async def _record_delivered(self) -> None:
        for message_id, (at, attempts) in list(self._unrecorded.items()):
            await self.store.outbox_delivered(message_id, at, attempts)
            del self._unrecorded[message_id]
            await self._step()

    async def _step(self) -> None:
        self.steps += 1
        async with self.progress:
            self.progress.notify_all()

    async def _purge(self) -> None:
        now = self.wall()
        if self._last_purge is not None and (now - self._last_purge).total_seconds() < PURGE_EVERY_S:
            return
        self._last_purge = now
        removed = await self.store.outbox_purge(now - timedelta(seconds=self.settings.keep_delivered_s))
        if removed:
            log.info("notifications: deleted %d delivered or abandoned messages", removed)

    async def _warn_about_unknown_targets(self) -> None:
        with contextlib.suppress(Exception):  # only a warning: the loop reports a database that is down
            for name, count in (await self.store.outbox_targets()).items():
                if name not in self.webhooks:
                    log.warning("notifications: %d messages wait for webhook %r, which is not configured", count, name)
