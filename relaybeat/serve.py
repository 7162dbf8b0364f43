"""Running services in one event loop: signals, supervision, the relay (the monitor and its HTTP API:
relaybeat.monitor_server, kept apart so a relay or leaf never loads SQL or HTTP libraries).

This is the composition root's async half; nothing in relay/, monitor/ or api/ imports it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from relaybeat.relay.parts import PartFailed
from relaybeat.relay.service import RelayService

log = logging.getLogger("relaybeat")


EXIT_PART_FAILED = 70  # EX_SOFTWARE: a part of the service died (logged); let systemd restart the process


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """asyncio.run(main(stop)), where `stop` is set by the first SIGINT or SIGTERM; the exit status:
    0, or EXIT_PART_FAILED when a part of the service died (`PartFailed`, already logged)."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(wrapper())
    except PartFailed:
        return EXIT_PART_FAILED
    return 0


class Supervisor:
    """Watches a service's long-running tasks together (the service, its HTTP server, ...): the first
    that raises, or returns while nobody asked it to stop, is logged as one ERROR line naming it, and
    `until` raises its `PartFailed`. A cancelled task is a planned stop, never a failure."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.failure: PartFailed | None = None
        self._failed = asyncio.Event()
        self._stopping = False

    def watch(self, part: str, task: asyncio.Task[Any]) -> None:
        task.add_done_callback(lambda done: self._ended(part, done))

    def stopping(self) -> None:
        """From now on the watched tasks are being stopped on purpose."""
        self._stopping = True

    def _ended(self, part: str, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved even when stopping, so asyncio never warns about it
        if self._stopping or self.failure is not None:
            return
        self.failure = exc if isinstance(exc, PartFailed) else PartFailed(self.service, part, exc)
        log.error("%s; stopping, exit status %d", self.failure, EXIT_PART_FAILED)
        if self.failure.cause is not None:
            log.debug("the failed part's traceback", exc_info=self.failure.cause)
        self._failed.set()

    async def until(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; raises `PartFailed` as soon as a watched task has ended unexpectedly."""
        if self.failure is None and not stop.is_set():
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._failed.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
        if self.failure is not None:
            raise self.failure


async def serve_relay(service: RelayService, stop: asyncio.Event) -> None:
    """A relay until `stop`; raises `PartFailed` (logged) if one of its parts dies first."""
    supervisor = Supervisor(f"relay {service.settings.relay_id}")
    task = asyncio.create_task(service.run(), name=f"relay {service.settings.relay_id}")
    supervisor.watch("relay", task)
    try:
        await supervisor.until(stop)
    finally:
        supervisor.stopping()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
