"""A real monitor in the test's own process: fed relay bundles through its own `take()`, on a
FakeClock the test moves, with a real store; its API called in-process or served by uvicorn.

`Fleet` (relays r1 and child r2, any hosts) and `Feed` (relay r1 bringing hosts up and down) drive
the monitor; `api()` and `call()` talk to it in-process; `served_monitor()` serves it on a real port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings
from relaybeat.api.events import EventHub, close_streams
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store, TransitionRow
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle
from tests.fakes import FakeClock

WRITE_TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-0123456789ab"
AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}


def new_monitor(store: Store, clock: FakeClock) -> Monitor:
    """A monitor that reaches no broker, deciding with misses = 3 on `clock`."""
    settings = MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1"), Policy(misses=3))
    return Monitor(settings, store, clock)


class Fleet:
    """A real monitor fed bundles through its own `take()`, with a hand-driven monotonic clock.

    Relay r1 talks to the monitor; relay r2 is its child. Hosts default to interval 1 s, so a host
    is down 3 s after it was last heard (misses 3), and a relay 3 s after its last bundle.
    """

    def __init__(self, monitor: Monitor, clock: FakeClock) -> None:
        self.monitor = monitor
        self.clock = clock
        self.seq: dict[str, int] = {}

    def bundle(self, relay: str, hosts: dict[str, int], children: tuple[Bundle, ...] = ()) -> Bundle:
        """`hosts` maps host id to its age in ms (how long ago the relay last heard it; 0: a new beat)."""
        self.seq[relay] = self.seq.get(relay, 0) + 1
        for host, age in hosts.items():  # a fresh entry carries the leaf's next beat; a stale one its last
            self.seq[host] = self.seq.get(host, 0) + (age == 0)
        entries = tuple(HostEntry(h, self.seq[h], age, 1000, LeafStatus.OK) for h, age in sorted(hosts.items()))
        return Bundle(relay, f"boot-{relay}", self.seq[relay], 1000, entries, children)

    def send(self, hosts: dict[str, int], child_hosts: dict[str, int] | None = None, after: float = 0.0) -> None:
        """One bundle from r1 `after` seconds from now (with r2's folded in, unless `child_hosts` is None)."""
        self.clock.t += after
        children = () if child_hosts is None else (self.bundle("r2", child_hosts),)
        self.monitor.take("relaybeat/bundle/r1", encode_bundle(self.bundle("r1", hosts, children)))
        self.monitor.expire()

    def advance(self, seconds: float) -> None:
        self.clock.t += seconds
        self.monitor.expire()

    def wall(self) -> datetime:
        return self.clock.wall(self.clock.t)

    async def history(self, subject: str) -> list[TransitionRow]:
        await self.monitor.flush()
        return await self.monitor.store.history(subject=subject, newest_first=False)


def api(monitor: Monitor, settings: ApiSettings | None = None) -> httpx.AsyncClient:
    settings = settings or ApiSettings(read_tokens=(READ_TOKEN,), write_tokens=(WRITE_TOKEN,))
    transport = httpx.ASGITransport(app=create_app(monitor, settings))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def call(client: httpx.AsyncClient, method: str, path: str, status: int, **kwargs: Any) -> Any:
    response = await client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    return response.json() if response.content else None


@dataclass
class Feed:
    """Drives a real monitor through relay r1's bundles; every call ends with the batch in SQL."""

    monitor: Monitor
    clock: FakeClock
    seq: int = 0
    known: dict[str, int] = field(default_factory=dict)  # host -> age_ms in the next bundle

    async def send(self) -> None:
        self.seq += 1
        entries = tuple(HostEntry(h, 1, age, 1000, LeafStatus.OK) for h, age in sorted(self.known.items()))
        self.monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "boot1", self.seq, 1000, entries)))
        self.monitor.expire()
        await self.monitor.flush()

    async def up(self, *hosts: str) -> None:
        """New hosts: one `unknown → up` row each (and `r1 unknown → up` the first time)."""
        self.known.update(dict.fromkeys(hosts, 0))
        await self.send()

    async def down(self, host: str) -> None:
        """Ten seconds later r1 says `host` has been quiet for 10 s: `up → down`."""
        self.clock.t += 10.0
        self.known = dict.fromkeys(self.known, 0) | {host: 10_000}
        await self.send()
        del self.known[host]


class QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its own signal handlers
        yield


@contextlib.asynccontextmanager
async def serving(app: FastAPI, port: int | None = None) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on a loopback port (default: a free one) in this loop; yields its base URL."""
    port = port or pick_free("127.0.0.1")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            timeout_graceful_shutdown=2, access_log=False)  # fmt: skip
    server = QuietServer(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(15):
        while not server.started:
            if task.done():
                task.result()
                msg = "uvicorn did not start"
                raise AssertionError(msg)
            await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        close_streams(app)
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@dataclass
class Served:
    monitor: Monitor
    feed: Feed
    app: FastAPI
    hub: EventHub
    url: str


@contextlib.asynccontextmanager
async def served_monitor(tmp_path: Path, settings: ApiSettings | None = None) -> AsyncIterator[Served]:
    store = await Store.open(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        await store.upgrade()
        clock = FakeClock()
        monitor = new_monitor(store, clock)
        app = create_app(monitor, settings)
        async with serving(app) as url:
            yield Served(monitor, Feed(monitor, clock), app, app.state.events, url)
    finally:
        await store.close()


async def until(check: Any, within_s: float = 10.0, what: str = "a condition") -> None:
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            msg = f"timed out waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0.01)
