"""Current state of hosts and relays, read from the live detector (no SQL on this path)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from api.bodies import (
    NOT_FOUND,
    HostOut,
    Page,
    RelayOut,
    host_body,
    json_response,
    monitor_of,
    not_found,
    relay_body,
)
from monitor.service import Monitor
from monitor.states import State

router = APIRouter(prefix="/api/v1")
MonitorDep = Annotated[Monitor, Depends(monitor_of)]


@router.get("/hosts", response_model=Page[HostOut], tags=["hosts"])
async def list_hosts(
    monitor: MonitorDep,
    state: State | None = None,
    relay: str | None = Query(None, description="only hosts heard through this relay"),
    limit: int = Query(100, ge=1, le=10_000),
    offset: int = Query(0, ge=0),
) -> Response:
    hosts = monitor.detector.hosts
    ids = monitor.sorted_host_ids()
    if state is not None or relay is not None:
        ids = [
            i for i in ids if (state is None or hosts[i].state == state) and (relay is None or hosts[i].via == relay)
        ]
    page = [host_body(monitor, hosts[i]) for i in ids[offset : offset + limit]]
    return json_response({"items": page, "total": len(ids)})


@router.get("/hosts/{host_id}", response_model=HostOut, responses=NOT_FOUND, tags=["hosts"])
async def get_host(monitor: MonitorDep, host_id: str) -> Response:
    host = monitor.detector.hosts.get(host_id)
    return not_found("host", host_id) if host is None else json_response(host_body(monitor, host))


@router.get("/relays", response_model=Page[RelayOut], tags=["relays"])
async def list_relays(monitor: MonitorDep, state: State | None = None) -> Response:
    relays = [
        relay_body(monitor, r) for _, r in sorted(monitor.detector.relays.items()) if state is None or r.state == state
    ]
    return json_response({"items": relays, "total": len(relays)})


@router.get("/relays/{relay_id}", response_model=RelayOut, responses=NOT_FOUND, tags=["relays"])
async def get_relay(monitor: MonitorDep, relay_id: str) -> Response:
    relay = monitor.detector.relays.get(relay_id)
    return not_found("relay", relay_id) if relay is None else json_response(relay_body(monitor, relay))
