"""Response shapes: pydantic models for the OpenAPI schema, and the fast builders that fill them.

Routes return `json_response(...)` of plain dicts built here (orjson), and declare the matching
model as `response_model` so /docs stays exact. Keep each builder next to its model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from monitor.detector import HostTrack, RelayTrack
from monitor.service import Monitor
from monitor.states import Kind, State
from monitor.store import TransitionRecord

T = TypeVar("T")


class HostOut(BaseModel):
    id: str
    state: State
    relay: str | None = Field(description="relay the freshest evidence came through; null if beating directly")
    path: list[str] = Field(description="relays from the nearest up to the monitor")
    last_seen: datetime | None
    since: datetime
    interval_s: float
    timeout_s: float
    deadline: datetime | None
    seq: int | None
    flapping: bool


class RelayOut(BaseModel):
    id: str
    state: State
    parent: str | None
    last_seen: datetime | None
    since: datetime
    flush_s: float
    timeout_s: float
    boot: str | None
    seq: int | None
    hosts: int = Field(description="hosts heard through this relay")
    children: list[str]
    flapping: bool


class TransitionOut(BaseModel):
    id: int
    kind: Kind
    subject: str
    from_: State = Field(alias="from")
    to: State
    at: datetime
    reason: str
    relay: str | None
    event: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int


class ErrorOut(BaseModel):
    error: str
    detail: str


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "unknown id"}}
RETRY_AFTER_S = 2  # what a 503 asks clients to wait: the monitor probes the database every 0.5 s
DATABASE_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorOut,
        "description": 'the database is unavailable (`{"error": "database_unavailable"}`); retry later',
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    }
}


def monitor_of(request: Request) -> Monitor:
    """The running monitor, for routes (a FastAPI dependency)."""
    monitor: Monitor = request.app.state.monitor
    return monitor


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(status: int, error: str, detail: str) -> Response:
    return json_response({"error": error, "detail": detail}, status)


def not_found(what: str, ident: str) -> Response:
    return error_response(404, "not_found", f"no {what} {ident!r}")


def relay_path(monitor: Monitor, relay_id: str | None) -> list[str]:
    relays = monitor.detector.relays
    path: list[str] = []
    while relay_id is not None and relay_id not in path and relay_id in relays:
        path.append(relay_id)
        relay_id = relays[relay_id].parent
    return path


def host_body(monitor: Monitor, h: HostTrack) -> dict[str, Any]:
    detector, wall = monitor.detector, monitor.clock.wall
    deadline = detector.deadline_of(h)
    return {
        "id": h.id,
        "state": h.state.value,
        "relay": h.via,
        "path": relay_path(monitor, h.via),
        "last_seen": None if h.last_seen is None else iso(wall(h.last_seen)),
        "since": iso(wall(h.since)),
        "interval_s": h.interval_s,
        "timeout_s": detector.timeout_s(h),
        "deadline": None if deadline is None else iso(wall(deadline)),
        "seq": h.seq,
        "flapping": h.flapping,
    }


def relay_body(monitor: Monitor, r: RelayTrack) -> dict[str, Any]:
    wall = monitor.clock.wall
    return {
        "id": r.id,
        "state": r.state.value,
        "parent": r.parent,
        "last_seen": None if r.last_seen is None else iso(wall(r.last_seen)),
        "since": iso(wall(r.since)),
        "flush_s": r.flush_s,
        "timeout_s": monitor.detector.timeout_s(r),
        "boot": r.boot,
        "seq": None if r.seq < 0 else r.seq,
        "hosts": len(r.hosts),
        "children": sorted(r.children),
        "flapping": r.flapping,
    }


def transition_body(t: TransitionRecord) -> dict[str, Any]:
    return {
        "id": t.id,
        "kind": t.kind.value,
        "subject": t.subject,
        "from": t.from_state.value,
        "to": t.to_state.value,
        "at": iso(t.at),
        "reason": t.reason,
        "relay": t.relay,
        "event": t.event.value,
    }
