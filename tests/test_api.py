"""The HTTP API against a real monitor (fed through its own `take`) and a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaybeat.api.app import create_app
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.store import Store
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle
from tests.fakes import FakeClock
from tests.monitors import new_monitor


def bundle(seq: int, *hosts: tuple[str, int, LeafStatus]) -> bytes:
    entries = tuple(HostEntry(h, 1, age_ms, 1000, status) for h, age_ms, status in hosts)
    return encode_bundle(Bundle("r1", "boot1", seq, 1000, entries))


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    store = await Store.open(f"sqlite:///{tmp_path / 'api.db'}")
    await store.upgrade()
    clock = FakeClock()
    running = new_monitor(store, clock)
    ok, stopping = LeafStatus.OK, LeafStatus.STOPPING
    running.take("relaybeat/bundle/r1", bundle(1, ("a", 0, ok), ("b", 0, ok), ("c", 0, stopping)))
    clock.t += 10.0  # past grace and a's timeout (1 s × 3); r1 confirms a's silence
    running.take("relaybeat/bundle/r1", bundle(2, ("a", 10_000, ok), ("b", 0, ok), ("c", 10_000, stopping)))
    running.expire()
    running.take("relaybeat/bundle/r1", b"{not json")
    running.take("relaybeat/bundle/r2", bundle(3))  # bundle for r1 on r2's topic
    await running.flush()
    yield running
    await store.close()


@pytest.fixture
async def client(monitor: Monitor) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(monitor))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def get(client: httpx.AsyncClient, path: str, status: int = 200) -> Any:
    response = await client.get(path)
    assert response.status_code == status, response.text
    return response.json()


async def test_hosts_list_filters_and_pages(client: httpx.AsyncClient) -> None:
    everyone = await get(client, "/api/v1/hosts")
    assert everyone["total"] == 3
    assert [(h["id"], h["state"]) for h in everyone["items"]] == [("a", "down"), ("b", "up"), ("c", "stopped")]
    assert (await get(client, "/api/v1/hosts?state=down"))["items"][0]["id"] == "a"
    assert (await get(client, "/api/v1/hosts?relay=r1"))["total"] == 3
    assert (await get(client, "/api/v1/hosts?relay=r9"))["total"] == 0
    page = await get(client, "/api/v1/hosts?limit=1&offset=1")
    assert [h["id"] for h in page["items"]] == ["b"]
    assert page["total"] == 3
    await get(client, "/api/v1/hosts?limit=0", 422)
    await get(client, "/api/v1/hosts?state=sleeping", 422)


async def test_one_host_has_the_documented_fields(client: httpx.AsyncClient) -> None:
    b = await get(client, "/api/v1/hosts/b")
    assert {"id", "state", "relay", "last_seen", "since", "interval_s"} <= set(b)
    assert (b["relay"], b["path"], b["interval_s"], b["timeout_s"]) == ("r1", ["r1"], 1.0, 3.0)
    assert b["last_seen"].endswith("Z")
    assert b["deadline"].endswith("Z")
    missing = await get(client, "/api/v1/hosts/nope", 404)
    assert missing == {"error": "not_found", "detail": "no host 'nope'"}


async def test_host_transitions_come_from_sql(client: httpx.AsyncClient) -> None:
    rows = (await get(client, "/api/v1/hosts/a/transitions"))["items"]
    assert [(r["from"], r["to"]) for r in rows] == [("up", "down"), ("unknown", "up")]  # newest first
    assert rows[0]["reason"] == "no beat for 3.0 s (interval 1 s × 3)"
    assert {"kind", "subject", "from", "to", "at", "reason"} <= set(rows[0])
    await get(client, "/api/v1/hosts/nope/transitions", 404)


async def test_transitions_time_range_and_resume(client: httpx.AsyncClient) -> None:
    everything = (await get(client, "/api/v1/transitions"))["items"]
    assert len(everything) == 5  # r1 up; a, b up; c stopped; a down ... and nothing twice
    first_at = min(r["at"] for r in everything)
    after = (await get(client, f"/api/v1/transitions?since={first_at}&kind=host"))["items"]
    assert all(r["kind"] == "host" for r in after)
    assert len(after) == 4
    assert (await get(client, f"/api/v1/transitions?until={first_at}"))["items"] == []
    oldest = min(r["id"] for r in everything)
    resumed = (await get(client, f"/api/v1/transitions?after_id={oldest}"))["items"]
    assert [r["id"] for r in resumed] == sorted(r["id"] for r in everything)[1:]
    naive = await get(client, "/api/v1/transitions?since=2026-01-01T00:00:00", 422)
    assert "time zone" in naive["detail"]


async def test_relays_and_health(client: httpx.AsyncClient) -> None:
    relays = await get(client, "/api/v1/relays")
    assert [(r["id"], r["state"], r["hosts"]) for r in relays["items"]] == [("r1", "up", 3)]
    assert (await get(client, "/api/v1/relays/r1"))["flush_s"] == 1.0
    await get(client, "/api/v1/relays/r9", 404)
    health = await get(client, "/healthz")
    assert health["rejected"] == {"bad_json": 1, "relay_mismatch": 1}
    assert health["received"]["bundles"] == 2
    assert health["hosts"] == 3
    assert health["status"] == "ok"
    assert health["broker_connected"] is True


async def test_openapi_and_dashboard_are_served(client: httpx.AsyncClient) -> None:
    schema = await get(client, "/openapi.json")
    assert "/api/v1/hosts/{host_id}/transitions" in schema["paths"]
    page = await client.get("/")
    assert page.status_code == 200
    assert "relaybeat" in page.text


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error", "found"),
    [
        ("GET", "/api/v1/hosts?limit=0", None, 422, "bad_request", "query.limit: Input should be greater than"),
        ("GET", "/api/v1/hosts?state=sleeping", None, 422, "bad_request", "query.state:"),
        ("GET", "/api/v1/transitions?since=yesterday", None, 422, "bad_request", "ISO 8601"),
        ("POST", "/api/v1/maintenance", b"{not json", 422, "bad_request", "JSON"),
        ("GET", "/api/v1/nothing-here", None, 404, "not_found", "Not Found"),
        ("PUT", "/api/v1/hosts", None, 405, "method_not_allowed", "Method Not Allowed"),
    ],
)
async def test_every_4xx_has_the_one_error_shape(
    client: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int, error: str, found: str
) -> None:
    """FastAPI's own refusals (validation, routing) answer like ours: {"error": ..., "detail": ...}."""
    response = await client.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "detail"}
    assert answer["error"] == error
    assert found in answer["detail"]


async def test_the_openapi_documents_the_one_error_shape_for_every_422(client: httpx.AsyncClient) -> None:
    schema = await get(client, "/openapi.json")
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    invalid = [
        spec["responses"]["422"]["content"]["application/json"]["schema"]
        for methods in schema["paths"].values()
        for spec in methods.values()
        if "422" in spec["responses"]
    ]
    assert len(invalid) > 10
    assert all(s == {"$ref": "#/components/schemas/ErrorOut"} for s in invalid)
    assert set(schema["components"]["schemas"]["ErrorOut"]["required"]) == {"error", "detail"}


async def test_checkpoint_saves_last_seen_but_never_a_state_ahead_of_its_transition(monitor: Monitor) -> None:
    clock = monitor.clock
    assert isinstance(clock, FakeClock)
    clock.t += 1.0
    monitor.take("relaybeat/bundle/r1", bundle(3, ("b", 0, LeafStatus.OK), ("d", 0, LeafStatus.OK)))
    assert [t.subject for t in monitor.pending()] == ["d"]  # decided, not yet written
    await monitor.checkpoint(since=0.0)
    hosts, _ = await monitor.store.load()
    stored = {h.id: h for h in hosts}
    assert "d" not in stored  # its state goes to SQL only together with its transition
    assert stored["b"].last_seen == clock.wall(clock.t)  # b's news is saved for a restart
    await monitor.flush()
    hosts, _ = await monitor.store.load()
    assert {h.id: h.state.value for h in hosts}["d"] == "up"
