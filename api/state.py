"""Current state of hosts and relays, as the read view shows it (no SQL on this path, except the
durable `since` of the few subjects whose transitions are still being written)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import Response

from relaybeat.api.bodies import (
    NOT_FOUND,
    HostOut,
    Page,
    RelayOut,
    ViewDep,
    host_body,
    json_response,
    not_found,
    relay_body,
)
from relaybeat.monitor.states import State

router = APIRouter(prefix="/api/v1")


@router.get("/hosts", response_model=Page[HostOut], tags=["hosts"])
async def list_hosts(
    view: ViewDep,
    state: State | None = None,
    relay: str | None = Query(None, description="only hosts heard through this relay"),
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0),
) -> Response:
    page, total = await view.hosts(state=state, relay=relay, offset=offset, limit=limit)
    return json_response({"items": [host_body(h) for h in page], "total": total})


@router.get("/hosts/{host_id}", response_model=HostOut, responses=NOT_FOUND, tags=["hosts"])
async def get_host(view: ViewDep, host_id: str) -> Response:
    host = await view.host(host_id)
    return not_found("host", host_id) if host is None else json_response(host_body(host))


@router.get("/relays", response_model=Page[RelayOut], tags=["relays"])
async def list_relays(view: ViewDep, state: State | None = None) -> Response:
    relays = [relay_body(r) for r in await view.relays(state)]
    return json_response({"items": relays, "total": len(relays)})


@router.get("/relays/{relay_id}", response_model=RelayOut, responses=NOT_FOUND, tags=["relays"])
async def get_relay(view: ViewDep, relay_id: str) -> Response:
    relay = await view.relay(relay_id)
    return not_found("relay", relay_id) if relay is None else json_response(relay_body(relay))
