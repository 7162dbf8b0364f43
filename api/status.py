"""Public status pages: `/status/<name>` (one HTML file) and its data at `/api/v1/status/<name>`.

Each page is configured in the deployment file (`[[api.status_page]]`: a name, a title, host-id
globs and relays) and shows only those subjects: their state, uptime over 24 h and 30 days and
their latest state changes; never a reason, a comment or any other subject. Status pages need no
token, even when reads are protected. The read view (`FleetView.status_page`) makes what they show.

An answer is reused for up to STATUS_CACHE_S while no new history row is written, so a page
that many people keep open costs the database one query per kind every few seconds at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from relaybeat.api.bodies import NOT_FOUND, ViewDep, json_response, not_found
from relaybeat.api.pages import document
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.view import StatusEntry, StatusPage, StatusPageView, iso

STATUS_CACHE_S = 5.0


class ChangeOut(BaseModel):
    at: datetime
    to: State


class StatusEntryOut(BaseModel):
    kind: Kind
    id: str
    state: State
    since: datetime
    in_maintenance: bool
    uptime_24h: float | None = Field(description="up / (up + down) over the last 24 h; null when neither")
    uptime_30d: float | None = Field(description="the same over the last 30 days")
    changes: list[ChangeOut] = Field(description="the latest state changes in 30 days, oldest first")


class StatusPageOut(BaseModel):
    name: str
    title: str
    at: datetime = Field(description="when this answer was made")
    hosts: list[StatusEntryOut]
    relays: list[StatusEntryOut]


def entry_body(entry: StatusEntry) -> dict[str, Any]:
    return {
        "kind": entry.kind.value,
        "id": entry.id,
        "state": entry.state.value,
        "since": iso(entry.since),
        "in_maintenance": entry.in_maintenance,
        "uptime_24h": entry.uptime_24h,
        "uptime_30d": entry.uptime_30d,
        "changes": [{"at": iso(at), "to": state.value} for at, state in entry.changes],
    }


def page_body(shown: StatusPageView) -> dict[str, Any]:
    return {
        "name": shown.page.name,
        "title": shown.page.title,
        "at": iso(shown.at),
        "hosts": [entry_body(e) for e in shown.hosts],
        "relays": [entry_body(e) for e in shown.relays],
    }


@dataclass(slots=True)
class _Cached:
    written_id: int
    at: datetime
    body: bytes


def install(app: FastAPI, pages: tuple[StatusPage, ...], **route: Any) -> None:
    """The status routes, open to all (`route` adds only documented responses, e.g. a 503)."""
    by_name = {page.name: page for page in pages}
    cache: dict[str, _Cached] = {}
    router = APIRouter()

    @router.get(
        "/api/v1/status/{name}",
        response_model=StatusPageOut,
        responses=NOT_FOUND | route.get("responses", {}),
        tags=["status pages"],
    )
    async def status_data(view: ViewDep, name: str) -> Response:
        """What the public status page `name` shows. Needs no token, even when reads are protected."""
        page = by_name.get(name)
        if page is None:
            return not_found("status page", name)
        now, written = view.now(), view.last_written_id
        cached = cache.get(name)
        if cached is None or cached.written_id != written or now - cached.at > timedelta(seconds=STATUS_CACHE_S):
            body = json_response(page_body(await view.status_page(page))).body
            cached = cache[name] = _Cached(written_id=written, at=now, body=bytes(body))
        return Response(cached.body, media_type="application/json")

    @router.get("/status/{name}", response_class=HTMLResponse, include_in_schema=False)
    async def status_html(name: str) -> Response:
        return HTMLResponse(document("status.html")) if name in by_name else not_found("status page", name)

    app.include_router(router)
