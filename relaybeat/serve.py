"""Running services in one event loop: signals, the monitor + HTTP API, the relay with its broker.

This is the composition root's async half; nothing in relay/, monitor/ or api/ imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import uvicorn

from api.app import create_app
from api.auth import ApiSettings
from api.events import close_streams
from monitor.service import Monitor, MonitorSettings
from monitor.store import Store
from relay.ports import ensure_free

log = logging.getLogger("relaybeat")


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """asyncio.run(main(stop)), where `stop` is set by the first SIGINT or SIGTERM."""

    async def wrapper() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(wrapper())


class _OwnSignalsServer(uvicorn.Server):
    """uvicorn would install its own handlers and re-raise the signal after shutdown; we own signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningMonitor:
    monitor: Monitor
    url: str


@contextlib.asynccontextmanager
async def monitor_running(
    settings: MonitorSettings, db_url: str, host: str, port: int, api: ApiSettings | None = None
) -> AsyncIterator[RunningMonitor]:
    """Migrate, restore (writing first what its journal holds and SQL lacks), then run the monitor
    and its HTTP API until the block exits."""
    ensure_free(host, port)
    store = await Store.open(db_url)
    try:
        await store.upgrade()
        monitor = Monitor(settings, store)
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
        monitor_task = asyncio.create_task(monitor.run(), name="monitor")
        server_task = asyncio.create_task(server.serve(), name="http")
        while not server.started:
            if server_task.done():
                server_task.result()
                raise RuntimeError(f"HTTP server on {host}:{port} did not start")
            await asyncio.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        try:
            yield RunningMonitor(monitor, f"http://{host}:{bound}")
        finally:
            close_streams(app)  # open event streams end now; uvicorn would wait for them
            server.should_exit = True
            with contextlib.suppress(Exception):
                await server_task
            monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor_task
            monitor.close()  # its journal: what SQL still lacks stays in it for the next start
    finally:
        await store.close()


async def serve_monitor(
    settings: MonitorSettings, db_url: str, host: str, port: int, stop: asyncio.Event, api: ApiSettings | None = None
) -> None:
    async with monitor_running(settings, db_url, host, port, api) as running:
        log.info("monitor: API on %s (docs at %s/docs), broker %s", running.url, running.url, settings.broker)
        await stop.wait()
    log.info("monitor stopped")
