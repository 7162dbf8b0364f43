"""`GET /api/v1/events`: live transitions over Server-Sent Events, resumable from SQL.

A real monitor (fed through its own `take`) and a real SQLite store, served by uvicorn on a free
port so the stream is a real HTTP stream; one test stops a real `relaybeat monitor` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.monitors import Served, until
from tests.processes import Topology, wait_until

# ------------------------------------------------------------------------------------ helpers


class EventReader:
    """Parses a text/event-stream response into one dict per event (comments under ':')."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, within_s: float = 10.0) -> dict[str, str]:
        event: dict[str, str] = {}
        async with asyncio.timeout(within_s):
            async for line in self.lines:
                if not line:
                    if event:
                        return event
                    continue
                name, _, value = line.partition(":")
                event[name] = event.get(name, "") + value.removeprefix(" ")
        msg = f"stream ended; partial event {event}"
        raise EOFError(msg)

    async def transitions(self, count: int, within_s: float = 10.0) -> list[dict[str, str]]:
        found: list[dict[str, str]] = []
        while len(found) < count:
            event = await self.next(within_s)
            if "data" in event:
                found.append(event)
        return found


@contextlib.asynccontextmanager
async def stream(url: str, **headers: str) -> AsyncIterator[tuple[httpx.Response, EventReader]]:
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        yield response, EventReader(response)


async def sql_items(url: str, after_id: int = 0) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/api/v1/transitions", params={"after_id": after_id, "limit": 10_000})
        items: list[dict[str, Any]] = response.json()["items"]
        return items


# -------------------------------------------------------------------------------------- tests


async def test_new_transitions_arrive_live_with_row_ids_and_the_transitions_json(served: Served) -> None:
    async with stream(f"{served.url}/api/v1/events") as (response, reader):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        hello = await reader.next()
        assert hello == {"": "relaybeat transitions", "retry": "2000"}
        await until(lambda: served.hub.subscribers, what="the stream to subscribe")
        await served.feed.up("web-1")
        events = await reader.transitions(2)
    items = await sql_items(served.url)
    assert [(e["event"], e["id"]) for e in events] == [("transition", str(i["id"])) for i in items]
    assert [json.loads(e["data"]) for e in events] == items
    assert {(i["subject"], i["from"], i["to"]) for i in items} == {("r1", "unknown", "up"), ("web-1", "unknown", "up")}


async def test_without_resume_the_stream_starts_with_the_next_row(served: Served) -> None:
    await served.feed.up("old")
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await until(lambda: served.hub.subscribers, what="the stream to subscribe")
        await served.feed.up("new")
        (event,) = await reader.transitions(1)
    assert json.loads(event["data"])["subject"] == "new"


async def test_last_event_id_replays_the_missed_rows_from_sql_then_goes_live(served: Served) -> None:
    await served.feed.up("a", "b", "c")
    before = await sql_items(served.url)
    assert len(before) == 4  # r1, a, b, c
    seen = before[1]["id"]
    async with stream(f"{served.url}/api/v1/events", **{"Last-Event-ID": str(seen)}) as (_, reader):
        replayed = await reader.transitions(2)
        await served.feed.up("d")
        live = await reader.transitions(1)
    ids = [int(e["id"]) for e in replayed + live]
    assert ids == [i["id"] for i in await sql_items(served.url, seen)]  # in order, none missed, none twice
    assert json.loads(live[0]["data"])["subject"] == "d"


async def test_after_id_resumes_a_first_connection_and_last_event_id_wins_over_it(served: Served) -> None:
    await served.feed.up("a", "b", "c")
    items = await sql_items(served.url)
    async with stream(f"{served.url}/api/v1/events?after_id=0") as (_, reader):
        assert [int(e["id"]) for e in await reader.transitions(4)] == [i["id"] for i in items]
    # EventSource reconnects to the same URL (still ?after_id=0) with the last id it saw: the header wins
    headers = {"Last-Event-ID": str(items[2]["id"])}
    async with stream(f"{served.url}/api/v1/events?after_id=0", **headers) as (_, reader):
        assert [int(e["id"]) for e in await reader.transitions(1)] == [items[3]["id"]]


async def test_a_bad_resume_point_is_refused_with_a_reason(served: Served) -> None:
    async with httpx.AsyncClient() as client:
        bad = await client.get(f"{served.url}/api/v1/events", headers={"Last-Event-ID": "yesterday"})
        assert bad.status_code == 400
        assert "Last-Event-ID" in bad.json()["detail"]
        assert (await client.get(f"{served.url}/api/v1/events?after_id=-1")).status_code == 422


async def test_an_idle_stream_gets_heartbeats(served: Served) -> None:
    served.hub.ping_s = 0.2
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await reader.next()  # hello
        ping = await reader.next(within_s=5)
    assert ping[""].startswith("ping")


async def test_a_client_that_falls_a_buffer_behind_rereads_sql_and_misses_nothing(served: Served) -> None:
    served.hub.buffer = 3
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await until(lambda: served.hub.subscribers, what="the stream to subscribe")
        await served.feed.up(*(f"h{n:02}" for n in range(40)))  # 41 rows in one batch: overflows the buffer
        await served.feed.up("late")
        events = await reader.transitions(42)
    assert served.hub.overflows >= 1
    assert [int(e["id"]) for e in events] == [i["id"] for i in await sql_items(served.url)]


async def test_the_buffer_path_itself_is_lossless_under_overflow(served: Served) -> None:
    """The generator, without HTTP: rows pile up while nobody reads, then all come out in order."""
    served.hub.buffer = 2
    rows = served.hub.rows(None)
    assert isinstance(rows, AsyncGenerator)
    first = asyncio.ensure_future(anext(rows))
    await until(lambda: served.hub.subscribers, what="the generator to subscribe")
    for n in range(5):
        await served.feed.up(f"x{n}", f"y{n}", f"z{n}")
    got = [await first] + [await anext(rows) for _ in range(15)]
    await rows.aclose()
    assert served.hub.overflows >= 1
    assert not served.hub.subscribers
    assert [r.id for r in got] == [i["id"] for i in await sql_items(served.url)]


async def test_a_disconnected_client_is_unsubscribed(served: Served) -> None:
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await reader.next()
        await until(lambda: len(served.hub.subscribers) == 1, what="one subscriber")
    await until(lambda: not served.hub.subscribers, what="the subscriber to go away")


async def test_closing_the_hub_ends_open_streams_cleanly(served: Served) -> None:
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await reader.next()
        await until(lambda: served.hub.subscribers, what="the stream to subscribe")
        served.hub.close()
        with pytest.raises(EOFError):
            await reader.next(within_s=15)  # ends, rather than waiting for a ping 15 s away
    assert not served.hub.subscribers


async def test_down_transitions_stream_too(served: Served) -> None:
    await served.feed.up("a", "b")
    async with stream(f"{served.url}/api/v1/events") as (_, reader):
        await until(lambda: served.hub.subscribers, what="the stream to subscribe")
        await served.feed.down("a")
        (event,) = await reader.transitions(1)
    body = json.loads(event["data"])
    assert (body["subject"], body["from"], body["to"]) == ("a", "up", "down")
    assert body["reason"].startswith("no beat for")


@pytest.mark.e2e
def test_sigterm_with_an_open_stream_exits_0_within_seconds(central_broker: CentralBroker, tmp_path: Path) -> None:
    topology = Topology(tmp_path, central_broker.prefix)
    try:
        monitor = topology.monitor(central_broker.url, pick_free("127.0.0.1"))
        with httpx.stream("GET", f"{topology.api}/api/v1/events", timeout=httpx.Timeout(10.0)) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines) == ": relaybeat transitions"

            def clients() -> bool:
                text = httpx.get(f"{topology.api}/metrics", timeout=5).text
                return "relaybeat_event_stream_clients 1.0" in text

            wait_until(clients, 15, "the stream to be open on the server")
            started = time.monotonic()
            code = monitor.stop(timeout=15)
            elapsed = time.monotonic() - started
            rest = list(lines)  # the server ends the response properly: no error here
        assert code == 0, monitor.log()[-3000:]
        assert elapsed < 12, f"took {elapsed:.1f} s"  # loose (a busy box); uvicorn's graceful wait is 2 s, per stream
        assert all(line.startswith((": ping", "retry")) or not line for line in rest), rest
        for trouble in ("graceful shutdown exceeded", "without completing response", "Traceback"):
            assert trouble not in monitor.log(), monitor.log()[-3000:]
    finally:
        topology.close()
