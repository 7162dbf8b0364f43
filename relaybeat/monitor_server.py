"""The monitor and its HTTP API in one event loop, supervised (relaybeat.serve has the shared parts).

This is the composition root's async half; nothing in relay/, monitor/ or api/ imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate

import uvicorn
from uvicorn.server import ServerState

from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings
from relaybeat.api.events import close_streams
from relaybeat.errors import Unavailable
from relaybeat.monitor.cluster import lock_database
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.parts import PartFailed
from relaybeat.relay.ports import ensure_free
from relaybeat.serve import Supervisor

log = logging.getLogger("relaybeat")


class _DatedState(ServerState):
    """uvicorn's state shared by its connections, whose `default_headers` carry a Date made when a
    response asks for them (once per second at most), not refreshed by a timer that wakes an idle
    monitor every second for it (~0.3 ms of CPU a wakeup, a quarter of the monitor's CPU at rest)."""

    def __init__(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._dated: list[tuple[bytes, bytes]] = []
        self._second = -1
        super().__init__()

    @property  # uvicorn's attribute, as a property
    def default_headers(self) -> list[tuple[bytes, bytes]]:
        headers = self._headers
        if not headers or headers[0][0] != b"date":  # uvicorn puts its Date first (unless it is off)
            return headers
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._dated = [(b"date", formatdate(second, usegmt=True).encode()), *headers[1:]]
        return self._dated

    @default_headers.setter
    def default_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = list(headers)
        self._second = -1


class _OwnSignalsServer(uvicorn.Server):
    """uvicorn would install its own handlers and re-raise the signal after shutdown; we own signals.

    uvicorn's own loop wakes ten times a second to see whether it should exit and to date its
    responses: the idle monitor's most frequent timer. This one does not wake until told to exit:
    responses are dated as they are made (`_DatedState`)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._exit = asyncio.Event()
        super().__init__(config)
        self.server_state = _DatedState()

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def main_loop(self) -> None:
        # uvicorn's tick sets the default headers (their Date is `_DatedState`'s own from then on) and
        # would count requests for a limit and call a notify callback: neither is configured here.
        if not await self.on_tick(0):
            await self._exit.wait()

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
