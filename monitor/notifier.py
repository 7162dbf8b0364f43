"""The monitor's notifications part: webhook messages planned in the transaction that writes their
transitions, reminders, and the outbox worker that delivers them.

What to say is decided by `monitor.notify` (pure); this part only holds what each target has been
told (`alerts`), writes the plan with the rows it is about, and runs the delivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from relaybeat.monitor.clock import Clock
from relaybeat.monitor.notify import AlertBook, Notice, Plan, follow_up, planning, remind, render
from relaybeat.monitor.outbox import NotifySettings, OutboxWorker
from relaybeat.monitor.records import Change
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.store import WRITE_STEP, Batch, NewMessage, Store

__all__ = ["Notifier"]

RECOVERIES_KEPT = 10_000  # recoveries remembered for a false-alarm follow-up proved after them

log = logging.getLogger("relaybeat.monitor")


class Notifier:
    def __init__(
        self, settings: NotifySettings, store: Store, clock: Clock, state_of: Callable[[Kind, str], State | None]
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.state_of = state_of  # a subject's state now, None if the detector no longer holds it
        self.alerts = AlertBook()  # what each webhook target has been told is down (loaded by `load`)
        self.outbox = OutboxWorker(store, settings, active=lambda: not self.paused)
        self._lock = asyncio.Lock()  # one plan at a time against `alerts`
        # Who was told of each recent recovery, by the closing transition's key (for follow-ups).
        self.recovered: OrderedDict[str, list[tuple[str, str, datetime]]] = OrderedDict()
        self.paused = False  # a hot standby: no reminders, no deliveries (the active sends them)
        everies = [t.remind_every_s for t in settings.targets if t.remind_every_s is not None]
        self.remind_tick_s = max(0.01, min([30.0, *(every / 4 for every in everies)]))  # also drops stale alerts

    async def load(self) -> None:
        self.alerts.load(await self.store.alerts())

    async def write(self, batch: Batch[Change]) -> float:
        """One transaction: the batch with the webhook messages and alert changes its changes cause
        (its false alarms followed up); how long the transaction took (seconds)."""
        async with self._lock:
            targets = self.settings.targets
            notices = await self._plan(batch.transitions) if targets else Plan()
            fresh: dict[str, list[tuple[str, str, datetime]]] = {}
            for key, target, incident, since in notices.recovered:
                fresh.setdefault(key, []).append((target, incident, since))
            follow = (
                follow_up(batch.false_alarms, lambda key: fresh.get(key) or self.recovered.get(key, []))
                if targets
                else ()
            )
            messages = self._messages(notices.notices + follow)
            started = time.perf_counter()
            await self.store.write(replace(batch, messages=messages, opened=notices.opened, closed=notices.closed))
            elapsed = time.perf_counter() - started
            self.alerts.apply(notices)
            self.recovered.update(fresh)
            while len(self.recovered) > RECOVERIES_KEPT:
                self.recovered.popitem(last=False)
        if messages:
            self.outbox.poke()
        return elapsed

    async def _plan(self, changes: Sequence[Change]) -> Plan:
        """`plan` the changes a step of WRITE_STEP at a time, the event loop free between steps (the
        caller holds the lock, so the book does not change meanwhile)."""
        steps = planning(changes, self.settings.targets, self.alerts, WRITE_STEP)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                planned: Plan = done.value
                return planned
            await asyncio.sleep(0)

    def _messages(self, notices: Sequence[Notice]) -> list[NewMessage]:
        now = self.outbox.wall()
        messages = []
        for notice in notices:
            key = uuid.uuid4().hex
            body = render(notice, key).decode()
            messages.append(
                NewMessage(
                    target=notice.target, key=key, type=notice.type, incident=notice.incident, body=body, created_at=now
                )
            )
        return messages

    async def run(self) -> None:
        """Deliver webhook messages and send reminders until cancelled; returns at once without webhooks."""
        if not self.settings.webhooks:
            return
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.outbox.run(), name="outbox")
            tasks.create_task(self._remind_loop(), name="remind")

    async def _remind_loop(self) -> None:
        while True:
            await asyncio.sleep(self.remind_tick_s)
            try:
                await self.remind()
            except Exception as exc:  # the database is down: the reminders wait for the next tick
                log.warning("reminders failed (%s); will retry", exc)

    async def remind(self) -> int:
        """Queue the reminders due now (and close alerts of forgotten subjects); how many were queued."""
        if self.paused:
            return 0
        async with self._lock:
            now = self.clock.wall(self.clock.now())
            due = remind(self.alerts, self.settings.targets, now, self.state_of)
            if not due:
                return 0
            messages = self._messages(due.notices)
            await self.store.write(Batch(messages=messages, opened=due.opened, closed=due.closed))
            self.alerts.apply(due)
        if messages:
            self.outbox.poke()
        return len(messages)
