"""`relaybeat up`: the whole path on embedded defaults, with a scripted outage and a planned stop.

Topology: a central embedded broker (1883 if free) with the monitor and its API (8000 if free) on a
SQLite file; two relays, each with its own embedded site broker; six simulated leaves per site.
After 20 s `web-3` stops beating (a crash: no last word); after 30 s `db-2` stops gracefully.

The API's access settings come from the deployment file's `[api]` (`relaybeat up --config FILE`) and
the RELAYBEAT_API_* variables, `[notify]` too; brokers, ports and the detector are the demo's own.
Without a write token configured the demo makes one for the run and prints it as an `export` line,
so the README's write examples work as written in another shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table

from relaybeat.api.auth import ApiSettings
from relaybeat.broker_config.embedded import EmbeddedBroker
from relaybeat.broker_config.settings import BrokerSettings
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.outbox import NotifySettings
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.states import State
from relaybeat.monitor_server import monitor_running
from relaybeat.relay.leaf import run_leaf
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import ensure_free, is_free, pick_free
from relaybeat.relay.service import RelayService, RelaySettings

HOST = "127.0.0.1"
SITES = {
    "relay-a": ["web-1", "web-2", "web-3", "web-4", "db-1", "db-2"],
    "relay-b": ["app-1", "app-2", "app-3", "app-4", "cache-1", "cache-2"],
}
LEAF_INTERVAL_S = 2.0
CRASHES = ("web-3", 20.0)
GRACEFUL_STOP = ("db-2", 30.0)
STATE_STYLE = {
    State.UP: "green",
    State.DOWN: "bold red",
    State.UNREACHABLE: "yellow",
    State.STOPPED: "dim",
    State.UNKNOWN: "dim",
}


def choose_port(requested: int | None, preferred: int) -> int:
    """An explicitly requested port must be free (clear error otherwise); the default falls back."""
    if requested is not None:
        ensure_free(HOST, requested)
        return requested
    return preferred if is_free(HOST, preferred) else pick_free(HOST)


def with_write_token(api: ApiSettings) -> tuple[ApiSettings, str | None]:
    """`api` as configured, or with a write token made for this run (returned too) when it has none."""
    if api.write_tokens:
        return api, None
    token = secrets.token_urlsafe(24)
    return dataclasses.replace(api, write_tokens=(token,)), token


def access_lines(api: ApiSettings, made: str | None) -> list[str]:
    """What the demo says about tokens: how to write (and read, if reads are protected)."""
    if made is not None:
        lines = [
            f"Writes need a token; this run made one. In the shell you run the README's examples from:\n"
            f"  export RELAYBEAT_API_WRITE_TOKENS={made}\n"
            f"(set RELAYBEAT_API_WRITE_TOKENS before `relaybeat up`, or use --config, to choose your own)"
        ]
    else:
        lines = ["Writes: use your write token (RELAYBEAT_API_WRITE_TOKENS or [api] write_tokens)."]
    if not api.read_open:
        lines.append("Reads need a token too: RELAYBEAT_API_TOKEN=<read or write token> for status/history/watch.")
    return lines


def state_table(monitor: Monitor, started: float) -> Table:
    detector = monitor.detector
    status = "[bold red]DEGRADED (blind)[/]" if detector.blind else "[green]seeing[/]"
    table = Table(title=f"relaybeat demo — {time.monotonic() - started:.0f} s — monitor {status}")
    for column in ("subject", "state", "via", "last seen", "reason of last change"):
        table.add_column(column)
    last_reason = {}
    for row in monitor.recent:
        last_reason[row.subject] = row.reason
    now = monitor.clock.now()
    for relay in sorted(detector.relays.values(), key=lambda r: r.id):
        ago = "-" if relay.last_seen is None else f"{now - relay.last_seen:.1f} s ago"
        style = STATE_STYLE[relay.state]
        table.add_row(f"[b]{relay.id}[/]", f"[{style}]{relay.state}[/]", relay.parent or "monitor", ago,
                      last_reason.get(relay.id, ""))  # fmt: skip
    for host in sorted(detector.hosts.values(), key=lambda h: (h.via or "", h.id)):
        ago = "-" if host.last_seen is None else f"{now - host.last_seen:.1f} s ago"
        style = STATE_STYLE[host.state]
        table.add_row(f"  {host.id}", f"[{style}]{host.state}[/]", host.via or "direct", ago,
                      last_reason.get(host.id, ""))  # fmt: skip
    return table


async def run_demo(
    stop: asyncio.Event,
    db_url: str,
    broker_port: int | None = None,
    api_port: int | None = None,
    duration_s: float | None = None,
    console: Console | None = None,
    api: ApiSettings | None = None,
    notify: NotifySettings | None = None,
) -> None:
    console = console or Console()
    api, made_token = with_write_token(api or ApiSettings())
    broker_port = choose_port(broker_port, 1883)
    api_port = choose_port(api_port, 8000)
    tasks: list[asyncio.Task[object]] = []

    def spawn(coro: Awaitable[object], name: str) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        task.set_name(name)
        tasks.append(task)
        return task

    async with contextlib.AsyncExitStack() as stack:
        central = await stack.enter_async_context(EmbeddedBroker(BrokerSettings(host=HOST, port=broker_port)))
        central_url = BrokerURL.parse(central.url)
        policy = Policy(misses=3, default_interval_s=LEAF_INTERVAL_S)
        settings = MonitorSettings(central_url, policy, notify=notify or NotifySettings())
        running = await stack.enter_async_context(monitor_running(settings, db_url, HOST, api_port, api))
        console.print(f"[b]relaybeat is up.[/] Broker {central.url}   API {running.url}/api/v1/hosts   "
                      f"docs {running.url}/docs   dashboard {running.url}/")  # fmt: skip
        for line in access_lines(api, made_token):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"Beat from anywhere: mosquitto_pub -h {HOST} -p {central.port} -n -t relaybeat/beat/my-host")
        console.print(f"{CRASHES[0]} will crash at {CRASHES[1]:.0f} s and {GRACEFUL_STOP[0]} stop gracefully at "
                      f"{GRACEFUL_STOP[1]:.0f} s. Ctrl-C to exit.")  # fmt: skip

        leaf_stops: dict[str, asyncio.Event] = {}
        leaf_tasks: dict[str, asyncio.Task[object]] = {}
        for relay_id, leaves in SITES.items():
            site = await stack.enter_async_context(EmbeddedBroker(BrokerSettings(host=HOST, port=0)))
            site_url = BrokerURL.parse(site.url)
            relay = RelayService(RelaySettings(relay_id, site_url, central_url, flush_s=1.0))
            running.supervisor.watch(relay_id, spawn(relay.run(), relay_id))  # a relay that dies ends the demo
            for leaf in leaves:
                leaf_stops[leaf] = asyncio.Event()
                leaf_tasks[leaf] = spawn(run_leaf(leaf, site_url, LEAF_INTERVAL_S, leaf_stops[leaf]), leaf)

        started = time.monotonic()
        script: list[tuple[float, Callable[[], object]]] = [
            (CRASHES[1], leaf_tasks[CRASHES[0]].cancel),
            (GRACEFUL_STOP[1], leaf_stops[GRACEFUL_STOP[0]].set),
        ]
        try:
            with Live(state_table(running.monitor, started), console=console, refresh_per_second=2) as live:
                while not stop.is_set():
                    elapsed = time.monotonic() - started
                    while script and script[0][0] <= elapsed:
                        script.pop(0)[1]()
                    if duration_s is not None and elapsed >= duration_s:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(running.until(stop), 0.5)  # PartFailed: a part died
                    live.update(state_table(running.monitor, started))
        finally:
            for event in leaf_stops.values():
                event.set()
            await asyncio.sleep(1.5)  # graceful leaves' stopping beats reach the monitor in the next bundle
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    console.print("relaybeat demo stopped cleanly.")
