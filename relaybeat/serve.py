"""Running services in one event loop: signals, the monitor + HTTP API, the relay with its broker.

This is the composition root's async half; nothing in relay/, monitor/ or api/ imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings
from relaybeat.api.events import close_streams
from relaybeat.errors import Unavailable
from relaybeat.monitor.cluster import lock_database
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.parts import PartFailed
from relaybeat.relay.ports import ensure_free
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


class _OwnSignalsServer(uvicorn.Server):
    """uvicorn would install its own handlers and re-raise the signal after shutdown; we own signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningMonitor:
    monitor: Monitor
    url: str
    supervisor: Supervisor

    async def until(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; raises `PartFailed` if the monitor or its HTTP server dies first."""
        await self.supervisor.until(stop)


@contextlib.asynccontextmanager
async def monitor_running(
    settings: MonitorSettings,
    db_url: str,
    host: str,
    port: int,
    api: ApiSettings | None = None,
    make_monitor: Callable[[MonitorSettings, Store], Monitor] = Monitor,
) -> AsyncIterator[RunningMonitor]:
    """Migrate, restore (writing first what its journal holds and SQL lacks), then run the monitor
    and its HTTP API until the block exits. Both are supervised: await `RunningMonitor.until(stop)`
    in the block to stop when either dies."""
    ensure_free(host, port)
    store = await Store.open(db_url)
    held = None
    try:
        held = lock_database(store.sqlite_path)  # SQLite: one monitor per file (hot standbys need PostgreSQL)
        await store.upgrade()
        monitor = make_monitor(settings, store)
        await monitor.restore()
        app = create_app(monitor, api)
        server = _OwnSignalsServer(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                lifespan="off",
                log_level="warning",
                timeout_graceful_shutdown=2,
                access_log=False,
            )
        )
        supervisor = Supervisor("monitor")
        monitor_task = asyncio.create_task(monitor.run(), name="monitor")
        supervisor.watch("monitor", monitor_task)
        server_task = asyncio.create_task(server.serve(), name="monitor:http")
        try:
            while not server.started:
                if server_task.done():
                    server_task.result()
                    msg = f"HTTP server on {host}:{port} did not start"
                    raise Unavailable(msg)
                await asyncio.sleep(0.02)
            supervisor.watch("http", server_task)
            bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
            yield RunningMonitor(monitor, f"http://{host}:{bound}", supervisor)
        finally:
            supervisor.stopping()
            close_streams(app)  # open event streams end now; uvicorn would wait for them
            server.should_exit = True
            with contextlib.suppress(Exception):
                await server_task
            monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, PartFailed):
                await monitor_task
            monitor.close()  # its journal: what SQL still lacks stays in it for the next start
    finally:
        await store.close()
        if held is not None:
            os.close(held)


async def serve_monitor(
    settings: MonitorSettings,
    db_url: str,
    host: str,
    port: int,
    stop: asyncio.Event,
    api: ApiSettings | None = None,
    make_monitor: Callable[[MonitorSettings, Store], Monitor] = Monitor,
) -> None:
    """The monitor and its API until `stop`; raises `PartFailed` (logged) if a part dies first."""
    async with monitor_running(settings, db_url, host, port, api, make_monitor) as running:
        log.info("monitor: API on %s (docs at %s/docs), broker %s", running.url, running.url, settings.broker)
        await running.until(stop)
    log.info("monitor stopped")


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
