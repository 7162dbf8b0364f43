"""The HTTP API fuzzed with schemathesis against its own OpenAPI: no 5xx, and every response (status,
content type, headers, body) conforms to the schema the app publishes at /openapi.json.

The app runs in-process (schemathesis' ASGI transport) over a real Monitor and SQLite store, filled
as in tests/test_api.py with hosts up, down, stopped and unreachable, a relay tree and transitions.
Reads are token-protected and a write token is configured, so the auth paths are fuzzed too.

In CI the examples are derandomized, so a run fails or passes the same way every time; to hunt for
more, RELAYBEAT_FUZZ_RANDOM=1 draws fresh examples and RELAYBEAT_FUZZ_SCALE=10 draws ten times as many.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi

from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle
from tests.fakes import FakeClock

READ = "fuzz-read-token-0123456789"
WRITE = "fuzz-write-token-0123456789"
PROTECTED = ApiSettings(read_open=False, read_tokens=(READ,), write_tokens=(WRITE,))
STATES = {"up", "down", "stopped", "unreachable"}
STREAMS = "/api/v1/events"  # endless Server-Sent Events: covered by its own tests, not fuzzable by request
SCALE = float(os.environ.get("RELAYBEAT_FUZZ_SCALE", "1"))
RANDOM = bool(os.environ.get("RELAYBEAT_FUZZ_RANDOM"))


def bundle(relay: str, seq: int, *hosts: tuple[str, int, LeafStatus], children: tuple[Bundle, ...] = ()) -> Bundle:
    """Each host's beat seq follows the bundle's: every bundle brings a new beat of each host."""
    entries = tuple(HostEntry(h, seq, age_ms, 1000, status) for h, age_ms, status in hosts)
    return Bundle(relay, "boot1", seq, 1000, entries, children)


def fill(monitor: Monitor, clock: FakeClock) -> None:
    """r1 (with child relay r3) and r2; hosts up, down, stopped, then r2 dies: its hosts unreachable."""
    ok, stopping = LeafStatus.OK, LeafStatus.STOPPING
    child = bundle("r3", 1, ("edge-7", 0, ok))
    monitor.take("relaybeat/bundle/r1", encode_bundle(bundle("r1", 1, ("a", 0, ok), ("b", 0, ok), children=(child,))))
    monitor.take("relaybeat/bundle/r2", encode_bundle(bundle("r2", 1, ("db-1", 0, ok), ("c", 0, stopping))))
    monitor.take("relaybeat/beat/solo", b'{"seq": 3, "interval": 1}')
    clock.t += 10.0
    later = bundle("r3", 2, ("edge-7", 0, ok))
    monitor.take(
        "relaybeat/bundle/r1", encode_bundle(bundle("r1", 2, ("a", 10_000, ok), ("b", 0, ok), children=(later,)))
    )
    monitor.take("relaybeat/relay/r2/status", b"offline")
    monitor.expire()
    monitor.take("relaybeat/bundle/r1", b"{not json")


def build_app(db_path: Path) -> FastAPI:
    """The app, whose lifespan opens the store in the event loop that serves the requests.

    schemathesis ends an app's lifespan after each test and starts it again for the next, so the
    store is reopened each time; the monitor is filled (and its transitions written) only once.
    """
    clock = FakeClock()
    settings_ = MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1"), Policy(misses=3))
    monitor = Monitor(settings_, cast(Store, None), clock)  # the store is opened by the lifespan below
    app = create_app(monitor, PROTECTED)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = await Store.open(f"sqlite:///{db_path}")
        try:
            monitor.store = store
            if not monitor.detector.hosts:
                await store.upgrade()
                fill(monitor, clock)
                await monitor.flush()
                assert {h.state.value for h in monitor.detector.hosts.values()} == STATES
            yield
        finally:
            await store.close()

    app.router.lifespan_context = lifespan
    return app


def operations() -> list[tuple[str, str, GenerationMode, int]]:
    """Every documented operation, read from a bare app (collection opens nothing): each with valid
    input, and those that take any input (parameters or a body) also with invalid input."""
    monitor = Monitor(MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1")), cast(Store, None))
    paths: dict[str, dict[str, Any]] = create_app(monitor, PROTECTED).openapi()["paths"]
    cases = []
    for path, methods in paths.items():
        for method, spec in methods.items():
            if path == STREAMS:
                continue
            cases.append((method.upper(), path, GenerationMode.POSITIVE, 40))
            if spec.get("requestBody") or any(_constrained(p) for p in spec.get("parameters", [])):
                cases.append((method.upper(), path, GenerationMode.NEGATIVE, 20))
    return cases


def _constrained(parameter: dict[str, Any]) -> bool:
    """Whether some value of the parameter is invalid (any string is a valid plain-string id)."""
    schema = orjson.dumps(parameter.get("schema", {})).decode()
    return any(word in schema for word in ("integer", "number", "boolean", "$ref", "enum", "format", "imum", "Length"))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    app = build_app(tmp_path_factory.mktemp("fuzz") / "fuzz.db")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # The bearer token is ours to send (below), not a parameter to fuzz; unknown query parameters are
    # ignored by design (as by most HTTP APIs), so sending extra ones proves nothing.
    schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)
    yield schema
    asgi.shutdown_lifespans()  # closes the store in the loop that opened it


@pytest.mark.parametrize(("method", "path", "mode", "examples"), operations())
def test_api_conforms_to_its_openapi(
    api_schema: Any, method: str, path: str, mode: GenerationMode, examples: int
) -> None:
    """Valid input gets a documented answer, invalid input a documented 4xx; never a 5xx, and never a
    status, content type, header or body the schema does not promise."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(
        max_examples=max(1, round(examples * SCALE)),
        derandomize=not RANDOM,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {WRITE}"})

    fuzz()


@pytest.mark.parametrize(
    ("query", "status", "found"),
    [
        ({"after_id": "9223372036854775808"}, 422, "less than or equal to 9223372036854775807"),  # was a 500
        ({"since": "0001-01-01T00:00:00+01:00"}, 200, "unknown"),  # before year 1 in UTC: was a 500, is unbounded
        ({"until": "9999-12-31T23:59:59-01:00"}, 200, "unknown"),  # after year 9999 in UTC: as above
        ({"until": "0001-01-01T00:00:00+01:00"}, 200, '"total":0'),  # ends before year 1: nothing
        ({"since": "9999-12-31T23:59:59-01:00"}, 200, '"total":0'),  # starts after year 9999: nothing
        ({"since": "0.42652510146675177"}, 422, "ISO 8601"),  # was taken as a Unix time
    ],
)
def test_what_the_fuzzer_found_is_not_a_500(api_schema: Any, query: dict[str, str], status: int, found: str) -> None:
    """Regressions from schemathesis runs (500s, and answers the schema does not allow), replayed through
    the same in-process app and checks."""
    case = api_schema["/api/v1/transitions"]["GET"].Case(query=query)
    response = case.call_and_validate(headers={"Authorization": f"Bearer {READ}"})
    assert response.status_code == status
    assert found in response.text


@pytest.mark.parametrize(
    "body",
    [
        {"glob": "web-*", "duration_s": True},  # was taken as 1 second
        {"glob": "web-*", "starts_at": 2.00001, "duration_s": 60},  # was taken as a Unix time
        {"glob": "web-*", "ends_at": "1e9"},  # as above, as a string
    ],
)
def test_maintenance_windows_take_only_what_the_schema_allows(api_schema: Any, body: dict[str, Any]) -> None:
    case = api_schema["/api/v1/maintenance"]["POST"].Case(body=body, media_type="application/json")
    response = case.call_and_validate(headers={"Authorization": f"Bearer {WRITE}"})
    assert response.status_code == 422, response.text
