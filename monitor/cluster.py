"""The monitor's cluster part (`lease`): hot standbys on one PostgreSQL database, exactly one active.

Rules: it decides only the role, from the lease row (`Store.lease_tick`), timed by the database's
own clock; it moves no bundles and writes no transitions.
- Every `failover_s / 4` each monitor ticks: the active renews its lease (`expires_at = now() +
  failover_s`, database time); a standby takes the lease once it has expired, under a new epoch.
- The active's writes check that epoch in their own transaction (`Store.fence`): a monitor that
  lost the lease can never write after a takeover, whatever it was doing (paused, partitioned).
- The active also steps down by itself: `failover_s` after it *sent* its last successful renewal
  (measured on its own monotonic clock, so never later than the database's expiry), it is a
  standby again, without asking anyone. After a pause (SIGSTOP, a suspended VM) it steps down at
  its first tick, before it could write.
- On promotion the monitor first writes what it decided and the old active did not (`promote`),
  then the writer runs; on demotion its writes stop at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from relaybeat.errors import Unavailable
from relaybeat.monitor.store import Fence, LeaseView, Store

__all__ = ["Cluster", "ClusterSettings", "DatabaseHeld", "Role", "lock_database"]

log = logging.getLogger("relaybeat.monitor")

TICKS_PER_LEASE = 4  # renewals per failover_s: three may fail before the lease runs out


class DatabaseHeld(Unavailable):
    """Another monitor runs on this SQLite file (hot standbys need PostgreSQL)."""


def lock_database(path: str | None) -> int | None:
    """Hold `<path>.lock` (flock) while this monitor runs on the SQLite file `path`: a second monitor
    on the same file is refused at start. Returns the lock's descriptor (None for in-memory)."""
    if not path or path == ":memory:":
        return None
    lock = f"{path}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DatabaseHeld(exc.errno, f"cannot open {lock} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise DatabaseHeld(
            exc.errno,
            f"another monitor already runs on the SQLite database {path}: run one monitor per SQLite file "
            "(hot standbys need PostgreSQL)",
        ) from None
    return fd


class Role(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    node_id: str
    failover_s: float  # a standby takes over within this (the config's default: relaybeat.config)
    api: str | None = None  # where this monitor's HTTP API listens (named in a standby's 409s)


class Cluster:
    """Runs the lease (`run`); `role`, `epoch` and who is active for /healthz, the API and the writer."""

    def __init__(
        self,
        settings: ClusterSettings,
        store: Store,
        promote: Callable[[LeaseView], Awaitable[None]],
        demote: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.promote = promote  # called with the new lease before any write of the new epoch
        self.demote = demote  # called when this monitor stops being active (writes already refused)
        self.token = uuid.uuid4().hex  # this process: a restarted node never inherits its old lease
        self.started_at = datetime.now(UTC)
        self.role = Role.STANDBY
        self.epoch: int | None = None
        self.active_node: str | None = None
        self.active_api: str | None = None
        self.last_renewal: datetime | None = None  # database time of the lease's last renewal
        self.takeovers = 0
        self._valid_until = 0.0  # monotonic: when this active must consider its lease gone
        self._store_fence(None)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def tick_s(self) -> float:
        return self.settings.failover_s / TICKS_PER_LEASE

    def _store_fence(self, epoch: int | None) -> None:
        self.store.fence = Fence(self.node_id, self.token, epoch, self.settings.failover_s)

    async def run(self) -> None:
        while True:
            await self.tick()
            wait = self.tick_s
            if self.role is Role.ACTIVE:  # wake in time to step down if renewals keep failing
                wait = max(0.0, min(wait, self._valid_until - time.monotonic()))
            await asyncio.sleep(wait)

    async def tick(self) -> None:
        sent = time.monotonic()
        view: LeaseView | None = None
        try:
            async with asyncio.timeout(self.tick_s * 2):
                view = await self.store.lease_tick(
                    self.node_id, self.token, self.epoch, self.settings.failover_s, self.settings.api, self.started_at
                )
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("lease: the database did not answer (%s)", why)
        if self.role is Role.ACTIVE and time.monotonic() >= self._valid_until:
            self.step_down("its lease ran out before it could renew it (paused or cut off from the database?)")
        if view is None:
            return
        self.active_node, self.active_api, self.last_renewal = view.holder, view.holder_api, view.renewed_at
        if view.mine:
            self._valid_until = sent + self.settings.failover_s
            if self.role is Role.STANDBY:
                await self._take_over(view)
        elif self.role is Role.ACTIVE:
            self.step_down(f"node {view.holder} holds the lease (epoch {view.epoch})")

    async def _take_over(self, view: LeaseView) -> None:
        self._store_fence(view.epoch)
        self.epoch = view.epoch
        try:
            await self.promote(view)
        except Exception as exc:  # the database went away meanwhile: a standby again, try at the next tick
            self.step_down("taking over failed")
            log.warning("lease: taking over failed (%s: %s); a standby until the next tick", type(exc).__name__, exc)
            return
        except BaseException:
            self.step_down("stopping")
            raise
        if time.monotonic() >= self._valid_until:  # promote took longer than the lease: never act on it
            self.step_down("taking over outlasted its lease")
            return
        self.role = Role.ACTIVE
        self.takeovers += 1
        log.warning(
            "monitor %s is active (lease epoch %d%s)",
            self.node_id,
            view.epoch,
            f", after {view.previous_holder}" if view.previous_holder else "",
        )

    def step_down(self, why: str) -> None:
        """Stop writing at once (fence first), then tell the writer."""
        self._store_fence(None)
        was_active = self.role is Role.ACTIVE
        self.role, self.epoch = Role.STANDBY, None
        self.demote()
        if was_active:
            log.warning("monitor %s steps down to standby: %s", self.node_id, why)

    def lost(self, why: str) -> None:
        """A write found the lease gone (`NotActive`): step down now rather than at the next tick."""
        if self.role is Role.ACTIVE:
            self.step_down(why)

    async def release(self) -> None:
        """A clean stop: end the lease now, so a standby takes over at its next tick, not after failover_s."""
        epoch = self.epoch
        self.step_down("stopping")
        if epoch is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.store.lease_release(self.node_id, self.token, epoch)
