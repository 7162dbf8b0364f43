"""Shared fixtures: free ports, the real MQTT broker and the real databases tests talk to.

RELAYBEAT_TEST_MQTT_URL=mqtt://127.0.0.1:1883 points the end-to-end tests at an existing broker
(Mosquitto in CI; set but not answering, they fail); unset, each test starts `relaybeat broker`
(embedded amqtt) on a free port. Tests that need authentication, ACLs or TLS start their own brokers
from the shipped configs (tests/processes.py), whatever these variables say.
RELAYBEAT_TEST_DB_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test adds PostgreSQL to every
database-parametrised test (each in a fresh schema); unset, those cases skip and say how to enable
them; set but unreachable, they fail.

Helpers that are not fixtures live in tests/fakes.py (the fake clock), tests/monitors.py (a real
monitor driven in this process), tests/processes.py (real processes) and tests/wire_inputs.py.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from relaybeat.monitor.store import Store, async_url
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from tests.monitors import Served, served_monitor
from tests.processes import Service, Topology, port_open, wait_until

MQTT_ENV = "RELAYBEAT_TEST_MQTT_URL"
PG_ENV = "RELAYBEAT_TEST_DB_URL"
PG_HOW = f"PostgreSQL tests are off: set {PG_ENV}=postgresql+psycopg://postgres@127.0.0.1:5432/test to run them"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A URL whose connections use a fresh, empty schema. Fails (not skips) if the server is down."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_HOW)
    schema = f"relaybeat_test_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(async_url(base), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as connection:
            await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        await admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file always; PostgreSQL too when RELAYBEAT_TEST_DB_URL is set."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'relaybeat.db'}"
    return cast(str, request.getfixturevalue("postgres_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A store on `db_url`, migrated to the newest schema."""
    opened = await Store.open(db_url)
    await opened.upgrade()
    yield opened
    await opened.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A real monitor on a SQLite file and a FakeClock, its API served by uvicorn on a free port."""
    async with served_monitor(tmp_path) as running:
        yield running


@pytest.fixture
def free_port() -> int:
    return pick_free("127.0.0.1")


@dataclass(frozen=True)
class CentralBroker:
    url: str
    prefix: str  # unique per test, so tests sharing one Mosquitto never see each other's messages
    kind: str


@pytest.fixture
def central_broker(tmp_path: Path) -> Iterator[CentralBroker]:
    prefix = f"rbt{uuid.uuid4().hex[:8]}/"
    external = os.environ.get(MQTT_ENV)
    if external:
        url = BrokerURL.parse(external)
        if not _reachable(url.host, url.port):
            pytest.fail(f"{MQTT_ENV}={url} is set, but nothing answers on {url.host}:{url.port}")
        yield CentralBroker(external, prefix, "external")
        return
    port = pick_free("127.0.0.1")
    broker = Service("central-broker", ["broker", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"], tmp_path)
    try:
        wait_until(lambda: port_open(port), 15, "the embedded broker to listen", service=broker)
        yield CentralBroker(f"mqtt://127.0.0.1:{port}", prefix, "embedded")
    finally:
        broker.stop()


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def db_topo(tmp_path: Path, central_broker: CentralBroker, db_url: str) -> Iterator[Topology]:
    """Real processes on the test broker, the monitor on each test database (`db_url`)."""
    topology = Topology(tmp_path, central_broker.prefix, db_url)
    try:
        yield topology
    finally:
        topology.close()
