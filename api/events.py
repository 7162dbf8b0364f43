"""Live events: `GET /api/v1/events`, Server-Sent Events of transitions as they reach SQL.

Rules:
- SQL is the source of truth. Each event's `id` is the row's `transitions.id` and its `data` is the
  same JSON as a `/api/v1/transitions` item. A client that resumes (`Last-Event-ID`, or `?after_id=`
  on a first connection) is served every row after that id from SQL first, then live rows: it
  misses nothing and sees nothing twice.
- One pump per app wakes when the read view says rows reached SQL and reads them once for every
  client. Each client
  has a bounded buffer; a client that falls behind loses its buffer and re-reads what it missed from
  SQL. A slow client is slow, never lossy, and never holds up the others.
- `EventHub.close()` ends every open stream at once, so a shutdown never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from relaybeat.api.bodies import error_response, transition_body
from relaybeat.monitor.records import TransitionRow
from relaybeat.monitor.view import FleetView

log = logging.getLogger("relaybeat.api.events")

router = APIRouter(prefix="/api/v1")

RETRY_MS = 2000  # how soon browsers reconnect after a dropped stream
WARN_EVERY_S = 10.0  # while the database is away, the pump says so at most this often


class Subscriber:
    """One client's buffer of live rows: bounded; on overflow it is emptied and flagged."""

    __slots__ = ("limit", "overflowed", "ready", "rows")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: deque[TransitionRow] = deque()
        self.overflowed = False
        self.ready = asyncio.Event()

    def offer(self, row: TransitionRow) -> bool:
        """Buffer `row`; False if that overflowed the buffer (the client then re-reads from SQL)."""
        if self.overflowed:
            return True
        self.ready.set()
        if len(self.rows) >= self.limit:
            self.overflowed = True
            self.rows.clear()
            return False
        self.rows.append(row)
        return True


class EventHub:
    """Fans rows out from SQL to every open stream of one app."""

    def __init__(
        self,
        view: FleetView,
        *,
        ping_s: float = 15.0,
        buffer: int = 1000,
        page: int = 500,
        poll_s: float = 5.0,
        send_timeout_s: float = 30.0,
    ) -> None:
        self.view = view
        self.ping_s = ping_s  # heartbeat comment on idle streams (keeps proxies from cutting them)
        self.buffer = buffer  # rows a client may be behind before it falls back to SQL
        self.page = page  # rows per SQL read
        self.poll_s = poll_s  # also look for new rows this often, even without a notification
        self.send_timeout_s = send_timeout_s  # a client that cannot take one event in this long is dropped
        self.subscribers: set[Subscriber] = set()
        self.position = 0  # the last row id handed to the subscribers
        self.overflows = 0  # times a client fell behind by a whole buffer
        self.closed = False
        self._warned_at = -WARN_EVERY_S  # when the pump last said the database is away
        self._pump: asyncio.Task[None] | None = None

    def subscribe(self) -> tuple[Subscriber, int]:
        """A new buffer, and the id after which the pump fills it (older rows come from SQL)."""
        if self._pump is None:
            self.position = self.view.last_written_id
            self._pump = asyncio.create_task(self._run_pump(), name="event-pump")
        subscriber = Subscriber(self.buffer)
        self.subscribers.add(subscriber)
        return subscriber, self.position

    def close(self) -> None:
        """End every open stream now (at shutdown); new ones end at once."""
        self.closed = True
        if self._pump is not None:
            self._pump.cancel()
        for subscriber in self.subscribers:
            subscriber.ready.set()

    async def _run_pump(self) -> None:
        view = self.view
        while not self.closed:
            await view.wait_written(self.poll_s, after_id=self.position)
            try:
                rows = await view.history(after_id=self.position, newest_first=False, limit=self.page)
            except Exception as exc:  # the database is away: the streams wait, nothing is skipped
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY_S:
                    self._warned_at = now
                    log.warning("event stream cannot read transitions (%s); retrying every second", exc)
                await asyncio.sleep(1.0)
                continue
            for row in rows:
                for subscriber in self.subscribers:
                    if not subscriber.offer(row):
                        self.overflows += 1
                self.position = row.id

    async def rows(self, after_id: int | None) -> AsyncIterator[TransitionRow]:
        """Every row after `after_id` (None: from now on) in id order, until `close()`."""
        subscriber, live_from = self.subscribe()
        try:
            last = live_from if after_id is None else after_id
            from_sql = last < live_from
            while not self.closed:
                if from_sql:
                    subscriber.overflowed = False  # re-armed before reading: rows from now on are buffered
                    from_sql = False
                    while not self.closed:
                        page = await self.view.history(after_id=last, newest_first=False, limit=self.page)
                        for row in page:
                            yield row
                            last = row.id
                        if len(page) < self.page:
                            break
                while subscriber.rows:
                    row = subscriber.rows.popleft()
                    if row.id > last:  # rows already read from SQL come through the buffer too
                        yield row
                        last = row.id
                if subscriber.overflowed:
                    from_sql = True
                    continue
                if self.closed:
                    break
                subscriber.ready.clear()
                await subscriber.ready.wait()
        finally:
            self.subscribers.discard(subscriber)

    async def events(self, after_id: int | None) -> AsyncIterator[ServerSentEvent]:
        yield ServerSentEvent(comment="relaybeat transitions", retry=RETRY_MS)
        async for row in self.rows(after_id):
            data = orjson.dumps(transition_body(row)).decode()
            yield ServerSentEvent(data, id=str(row.id), event="transition")


def install(app: FastAPI, view: FleetView, **include: Any) -> EventHub:
    """Serve `/api/v1/events` from `app` (`include`: router options, e.g. auth dependencies).

    `close_streams(app)` ends the open streams at shutdown.
    """
    hub = EventHub(view)
    app.state.events = hub
    app.include_router(router, **include)
    return hub


def close_streams(app: FastAPI) -> None:
    hub: EventHub | None = getattr(app.state, "events", None)
    if hub is not None:
        hub.close()


STREAM_DOC = """Server-Sent Events, one per transition row as it reaches SQL: `id` is the row id, `event` is
`transition`, `data` is the same JSON as a `/api/v1/transitions` item. Comment lines are heartbeats.

Resume: send `Last-Event-ID: N` (browsers' EventSource does it on reconnect), or `?after_id=N` on the
first connection: every row after N is replayed from SQL, then the stream goes live. Without either,
the stream starts with the next row written."""


@router.get(
    "/events",
    tags=["history"],
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "an endless stream of transitions"},
        400: {"description": "Last-Event-ID is not a row id"},
    },
    description=STREAM_DOC,
)
async def events(
    request: Request,
    after_id: Annotated[int | None, Query(ge=0, description="replay rows after this id first")] = None,
    last_event_id: Annotated[str | None, Header(description="set by EventSource on reconnect; wins")] = None,
) -> Response:
    hub: EventHub = request.app.state.events
    resume = after_id
    if last_event_id is not None and last_event_id.strip():
        try:
            resume = int(last_event_id)
        except ValueError:
            resume = -1
        if resume < 0:
            return error_response(400, "bad_request", "Last-Event-ID must be a transition id (an integer ≥ 0)")
    return EventSourceResponse(hub.events(resume), ping=hub.ping_s, send_timeout=hub.send_timeout_s)
