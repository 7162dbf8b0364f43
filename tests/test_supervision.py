"""Supervision and outages: a part of a service that dies stops the process with its name and a non-zero
status; /healthz is degraded while a part is stalled or the database is away; while it is away, SQL
reads answer 503 with Retry-After (no traceback), and nothing decided meanwhile is lost.

Real processes, a real broker, SQLite and a private PostgreSQL server that the test stops and starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import httpx
import pytest

from relaybeat.api.app import create_app
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.monitor_server import serve_monitor
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.parts import PartFailed
from relaybeat.relay.ports import pick_free
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.serve import EXIT_PART_FAILED, serve_relay
from tests.conftest import CentralBroker
from tests.processes import PrivatePostgres, Topology, api_get, wait_until

pytestmark = pytest.mark.e2e
NOWHERE = BrokerURL.parse("mqtt://127.0.0.1:1")  # the monitor keeps retrying its broker meanwhile


class LagProbeBreaks(Monitor):
    """A monitor whose event-loop lag probe raises shortly after start (one part, the others fine)."""

    async def watch_loop_lag(self, every_s: float = 0.5) -> None:
        await asyncio.sleep(0.3)
        msg = "the lag probe broke"
        raise RuntimeError(msg)


async def test_responses_are_dated_as_they_are_made_though_no_timer_refreshes_the_date(tmp_path: Path) -> None:
    stop = asyncio.Event()
    port = pick_free("127.0.0.1")
    db = f"sqlite:///{tmp_path / 'relaybeat.db'}"
    run = asyncio.create_task(serve_monitor(MonitorSettings(NOWHERE), db, "127.0.0.1", port, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http, asyncio.timeout(20):
            while True:
                try:
                    first = await http.get("/healthz")
                    break
                except httpx.TransportError:
                    assert not run.done(), run
                    await asyncio.sleep(0.05)
            await asyncio.sleep(2.2)
            second = await http.get("/healthz")
        dated = [parsedate_to_datetime(r.headers["date"]) for r in (first, second)]
        assert 2 <= (dated[1] - dated[0]).total_seconds() <= 3, dated
        assert abs((datetime.now(UTC) - dated[1]).total_seconds()) < 1.5, dated
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)


async def test_a_monitor_part_that_raises_stops_serve_monitor_with_one_error_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    db = f"sqlite:///{tmp_path / 'relaybeat.db'}"
    run = serve_monitor(MonitorSettings(NOWHERE), db, "127.0.0.1", 0, stop, make_monitor=LagProbeBreaks)
    with caplog.at_level(logging.INFO, logger="relaybeat"), pytest.raises(PartFailed) as failed:
        await asyncio.wait_for(run, 20)  # the old code waited for `stop` forever, its monitor dead
    assert failed.value.part == "loop_lag"
    assert isinstance(failed.value.cause, RuntimeError)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["monitor: part 'loop_lag' failed: RuntimeError: the lag probe broke; stopping, exit status 70"], (
        errors
    )


class LocalSideBreaks(RelayService):
    async def _local(self) -> None:
        msg = "the local side broke"
        raise RuntimeError(msg)


async def test_a_relay_part_that_raises_stops_serve_relay_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    relay = LocalSideBreaks(RelaySettings("r1", NOWHERE, NOWHERE))
    with caplog.at_level(logging.INFO, logger="relaybeat"), pytest.raises(PartFailed) as failed:
        await asyncio.wait_for(serve_relay(relay, asyncio.Event()), 20)
    assert (failed.value.service, failed.value.part) == ("relay r1", "local")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "relay r1: part 'local' failed: RuntimeError: the local side broke; stopping, exit status 70"
    ]


async def test_openapi_documents_the_503_on_routes_that_read_sql(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'relaybeat.db'}")
    try:
        schema = create_app(Monitor(MonitorSettings(NOWHERE), store)).openapi()
    finally:
        await store.close()
    assert "Retry-After" in schema["paths"]["/api/v1/transitions"]["get"]["responses"]["503"]["headers"]
    assert "503" in schema["paths"]["/api/v1/hosts/{host_id}/transitions"]["get"]["responses"]
    assert "503" not in schema["paths"]["/api/v1/hosts"]["get"]["responses"]  # read from memory


def test_a_monitor_process_whose_part_dies_exits_70_with_the_part_named(tmp_path: Path) -> None:
    """The composition root in a real process: run_until_signal -> serve_monitor, one part raising."""
    port = pick_free("127.0.0.1")
    script = textwrap.dedent(
        f"""
        import logging, sys
        from relaybeat.monitor_server import serve_monitor
        from relaybeat.serve import run_until_signal
        from relaybeat.monitor.service import MonitorSettings
        from relaybeat.relay.mqtt import BrokerURL
        from tests.test_supervision import LagProbeBreaks
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        settings = MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1"))
        db = "sqlite:///{tmp_path / "relaybeat.db"}"
        sys.exit(run_until_signal(lambda stop: serve_monitor(
            settings, db, "127.0.0.1", {port}, stop, make_monitor=LagProbeBreaks)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    log = done.stdout + done.stderr
    assert done.returncode == EXIT_PART_FAILED, log
    assert "ERROR relaybeat: monitor: part 'loop_lag' failed: RuntimeError: the lag probe broke" in log, log
    assert "Traceback" not in log, log  # the traceback is logged at debug only


@pytest.fixture
def topology(tmp_path: Path, central_broker: CentralBroker) -> Iterator[Topology]:
    world = Topology(tmp_path, central_broker.prefix)
    try:
        yield world
    finally:
        world.close()


def test_healthz_is_degraded_while_the_monitor_stalled_and_ok_again_after(
    topology: Topology, central_broker: CentralBroker
) -> None:
    monitor = topology.monitor(central_broker.url, pick_free("127.0.0.1"))
    started = time.monotonic()
    wait_until(lambda: topology.healthz()["status"] == "ok", 20, "a healthy monitor")
    print(f"healthy {time.monotonic() - started:.1f} s after the API answered")
    assert set(topology.healthz()["parts"]) == {"consume", "expire", "write", "checkpoint", "loop_lag", "db_probe"}
    monitor.process.send_signal(signal.SIGSTOP)  # the whole process frozen, as by a blocked event loop
    try:
        time.sleep(2.0)  # the fault itself: twice the stall threshold (STALL_S = 1 s)
    finally:
        monitor.process.send_signal(signal.SIGCONT)
    health = wait_until(
        lambda: (h := topology.healthz())["parts"]["loop_lag"] == "stalled" and h, 4, "the stall to show in /healthz"
    )
    assert health["status"] == "degraded", health
    resumed = time.monotonic()
    wait_until(lambda: topology.healthz()["status"] == "ok", 15, "/healthz ok again once the lag is gone")
    print(f"ok again {time.monotonic() - resumed:.1f} s after the stall showed")


def moves_in_sql(api: str, host: str) -> list[tuple[str, str]]:
    """The host's transitions as the API reads them from SQL (through the monitor's own pool, which
    reconnects after the database restarts), oldest first."""
    rows = api_get(api, f"/api/v1/hosts/{host}/transitions")["items"]
    return [(r["from"], r["to"]) for r in reversed(rows)]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


def test_database_outage_gives_degraded_health_and_503s_and_loses_nothing(
    tmp_path: Path, central_broker: CentralBroker, private_postgres: PrivatePostgres
) -> None:
    world = Topology(tmp_path, central_broker.prefix, db_url=private_postgres.url)
    try:
        host = f"db-outage-{uuid.uuid4().hex[:6]}"
        monitor = world.monitor(central_broker.url, pick_free("127.0.0.1"), misses=2)
        world.leaf(host, central_broker.url, interval=0.3)
        world.wait_state("hosts", host, "up", timeout=30)
        wait_until(lambda: world.healthz()["status"] == "ok", 20, "a healthy monitor")
        wait_until(lambda: moves_in_sql(world.api, host) == [("unknown", "up")], 15, "unknown -> up in SQL")

        private_postgres.stop()
        cut = time.monotonic()
        health = wait_until(
            lambda: h if (h := world.healthz())["database_ok"] is False else None,
            10,  # the probe reads every DB_PROBE_S = 2 s
            "/healthz to see the database gone",
        )
        print(f"/healthz said database_ok=false {time.monotonic() - cut:.2f} s after the database stopped")
        assert health["status"] == "degraded", health
        for path in ("/api/v1/transitions", f"/api/v1/hosts/{host}/transitions"):
            response = httpx.get(world.api + path, timeout=10)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"] == "database_unavailable", response.text
            assert response.json()["detail"], response.text
            assert int(response.headers["Retry-After"]) > 0

        world.services[host].kill()  # decided while the database is away: must reach SQL afterwards
        world.wait_state("hosts", host, "down")
        private_postgres.start()
        wait_until(lambda: world.healthz()["status"] == "ok", 20, "/healthz ok once the database is back")
        wait_until(
            lambda: moves_in_sql(world.api, host) == [("unknown", "up"), ("up", "down")], 15, "up -> down in SQL"
        )

        log = monitor.log()
        assert "Traceback" not in log, log
        assert log.count("API: database unavailable") == 1, log  # rate-limited: one line, not one per request
    finally:
        world.close()
