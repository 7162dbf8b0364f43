"""The HTTP API: current state from the live detector, history from SQL. OpenAPI at /docs.

Routes only read and shape data; they never decide a state. Lists are encoded with orjson straight
into the response (FastAPI's default encoder is ~40x slower on a 1,000-host page).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from monitor.detector import HostTrack, RelayTrack
from monitor.service import Monitor
from monitor.states import Kind, State
from monitor.store import TransitionRecord

DASHBOARD = Path(__file__).with_name("dashboard.html")

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


class Health(BaseModel):
    status: str = Field(description="ok, or degraded while the monitor cannot see (then nothing turns down)")
    broker_connected: bool
    blind: bool
    in_grace: bool
    database_ok: bool
    hosts: int
    relays: int
    received: dict[str, int]
    rejected: dict[str, int]


class ErrorOut(BaseModel):
    error: str
    detail: str


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _not_found(what: str, ident: str) -> Response:
    return _json({"error": "not_found", "detail": f"no {what} {ident!r}"}, 404)


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "unknown id"}}


def create_app(monitor: Monitor) -> FastAPI:
    app = FastAPI(
        title="relaybeat",
        summary="Which servers are alive, decided from relayed MQTT heartbeats.",
        version="1",
    )
    detector = monitor.detector
    wall = monitor.clock.wall
    sorted_ids: tuple[int, list[str]] = (-1, [])

    def host_ids() -> list[str]:
        nonlocal sorted_ids
        if sorted_ids[0] != len(detector.hosts):
            sorted_ids = (len(detector.hosts), sorted(detector.hosts))
        return sorted_ids[1]

    def path_of(relay_id: str | None) -> list[str]:
        path: list[str] = []
        while relay_id is not None and relay_id not in path and relay_id in detector.relays:
            path.append(relay_id)
            relay_id = detector.relays[relay_id].parent
        return path

    def host_body(h: HostTrack) -> dict[str, Any]:
        deadline = detector.deadline_of(h)
        return {
            "id": h.id,
            "state": h.state.value,
            "relay": h.via,
            "path": path_of(h.via),
            "last_seen": None if h.last_seen is None else iso(wall(h.last_seen)),
            "since": iso(wall(h.since)),
            "interval_s": h.interval_s,
            "timeout_s": detector.timeout_s(h),
            "deadline": None if deadline is None else iso(wall(deadline)),
            "seq": h.seq,
            "flapping": h.flapping,
        }

    def relay_body(r: RelayTrack) -> dict[str, Any]:
        return {
            "id": r.id,
            "state": r.state.value,
            "parent": r.parent,
            "last_seen": None if r.last_seen is None else iso(wall(r.last_seen)),
            "since": iso(wall(r.since)),
            "flush_s": r.flush_s,
            "timeout_s": detector.timeout_s(r),
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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/api/v1/hosts", response_model=Page[HostOut], tags=["hosts"])
    async def list_hosts(
        state: State | None = None,
        relay: str | None = Query(None, description="only hosts heard through this relay"),
        limit: int = Query(100, ge=1, le=10_000),
        offset: int = Query(0, ge=0),
    ) -> Response:
        hosts = detector.hosts
        ids = host_ids()
        if state is not None or relay is not None:
            ids = [
                i
                for i in ids
                if (state is None or hosts[i].state == state) and (relay is None or hosts[i].via == relay)
            ]
        page = [host_body(hosts[i]) for i in ids[offset : offset + limit]]
        return _json({"items": page, "total": len(ids)})

    @app.get("/api/v1/hosts/{host_id}", response_model=HostOut, responses=NOT_FOUND, tags=["hosts"])
    async def get_host(host_id: str) -> Response:
        host = detector.hosts.get(host_id)
        return _not_found("host", host_id) if host is None else _json(host_body(host))

    @app.get(
        "/api/v1/hosts/{host_id}/transitions",
        response_model=Page[TransitionOut],
        responses=NOT_FOUND,
        tags=["hosts"],
    )
    async def host_transitions(
        host_id: str,
        since: datetime | None = Query(None, description="inclusive, ISO 8601"),
        until: datetime | None = Query(None, description="exclusive, ISO 8601"),
        limit: int = Query(100, ge=1, le=10_000),
    ) -> Response:
        if host_id not in detector.hosts:
            return _not_found("host", host_id)
        return await _history(kind=Kind.HOST, subject=host_id, since=since, until=until, limit=limit)

    @app.get("/api/v1/relays", response_model=Page[RelayOut], tags=["relays"])
    async def list_relays(state: State | None = None) -> Response:
        relays = [relay_body(r) for _, r in sorted(detector.relays.items()) if state is None or r.state == state]
        return _json({"items": relays, "total": len(relays)})

    @app.get("/api/v1/relays/{relay_id}", response_model=RelayOut, responses=NOT_FOUND, tags=["relays"])
    async def get_relay(relay_id: str) -> Response:
        relay = detector.relays.get(relay_id)
        return _not_found("relay", relay_id) if relay is None else _json(relay_body(relay))

    @app.get(
        "/api/v1/relays/{relay_id}/transitions",
        response_model=Page[TransitionOut],
        responses=NOT_FOUND,
        tags=["relays"],
    )
    async def relay_transitions(
        relay_id: str,
        since: datetime | None = Query(None),
        until: datetime | None = Query(None),
        limit: int = Query(100, ge=1, le=10_000),
    ) -> Response:
        if relay_id not in detector.relays:
            return _not_found("relay", relay_id)
        return await _history(kind=Kind.RELAY, subject=relay_id, since=since, until=until, limit=limit)

    @app.get("/api/v1/transitions", response_model=Page[TransitionOut], tags=["history"])
    async def all_transitions(
        since: datetime | None = Query(None, description="inclusive, ISO 8601"),
        until: datetime | None = Query(None, description="exclusive, ISO 8601"),
        kind: Kind | None = None,
        after_id: int | None = Query(None, ge=0, description="only rows with a larger id (resume)"),
        limit: int = Query(100, ge=1, le=10_000),
    ) -> Response:
        return await _history(kind=kind, since=since, until=until, after_id=after_id, limit=limit)

    async def _history(**filters: Any) -> Response:
        for key in ("since", "until"):
            moment = filters.get(key)
            if moment is not None and moment.tzinfo is None:
                return _json({"error": "bad_request", "detail": f"{key} needs a time zone (e.g. Z)"}, 422)
        after_id = filters.get("after_id")
        rows = await monitor.store.history(newest_first=after_id is None, **filters)
        items = [transition_body(t) for t in rows]
        return _json({"items": items, "total": len(items)})

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> Response:
        blind = detector.blind
        return _json(
            {
                "status": "degraded" if blind or not monitor.db_ok else "ok",
                "broker_connected": not detector.disconnected,
                "blind": blind,
                "in_grace": monitor.in_grace,
                "database_ok": monitor.db_ok,
                "hosts": len(detector.hosts),
                "relays": len(detector.relays),
                "received": dict(monitor.received),
                "rejected": dict(monitor.rejections.counts) | {f"detector_{k}": v for k, v in detector.ignored.items()},
            }
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text())

    return app
