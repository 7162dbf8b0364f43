"""Operator writes: maintenance windows and outage acknowledgements (writes need a write token).

Routes only parse what an operator said and shape the answer; the read view (`monitor.view`)
checks it and records it: a maintenance window in SQL first, then in the live book, so what the
monitor marks and what a restart reloads agree. "Now" is the monitor's clock, like every
transition time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, Strict

from relaybeat.api.auth import WRITE_REFUSED, require_write_token
from relaybeat.api.bodies import (
    NOT_FOUND,
    Body,
    ErrorOut,
    Page,
    ViewDep,
    iso_only,
    json_response,
    not_found,
    refused,
)
from relaybeat.monitor.maintenance import TargetKind, Window
from relaybeat.monitor.states import Kind
from relaybeat.monitor.store import Acknowledgement
from relaybeat.monitor.view import AckView, FleetView, MaintenanceView, Refused

router = APIRouter(prefix="/api/v1")
WRITE = [Depends(require_write_token)]

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
GLOB_PATTERN = r"^[A-Za-z0-9._*?\[\]!-]{1,128}$"
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "nothing to act on (no outage, removed already), or not a window"}
}
BAD_BODY: dict[int | str, dict[str, Any]] = {400: {"model": ErrorOut, "description": "the body is not JSON"}}


# ------------------------------------------------------------------------------------ maintenance


class _WindowIn(BaseModel):
    """When: from `starts_at` (default now) until `ends_at` or for `duration_s`; neither: until removed."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": {"required": ["ends_at", "duration_s"]}})

    # ISO 8601 strings and JSON numbers only, as the schema says: no Unix times, no true for 1 second
    starts_at: Annotated[AwareDatetime, BeforeValidator(iso_only)] | None = Field(None, description="default: now")
    ends_at: Annotated[AwareDatetime, BeforeValidator(iso_only)] | None = Field(
        None, description="exclusive, after starts_at; not with duration_s"
    )
    duration_s: Annotated[float, Strict()] | None = Field(
        None, ge=0.001, le=366 * 86400, description="instead of ends_at"
    )
    reason: str = Field("", max_length=1000)


class HostWindowIn(_WindowIn):
    host: str = Field(pattern=ID_PATTERN, description="one host id")


class GlobWindowIn(_WindowIn):
    glob: str = Field(pattern=GLOB_PATTERN, description="every host whose id matches this glob, e.g. web-*")


class RelayWindowIn(_WindowIn):
    relay: str = Field(pattern=ID_PATTERN, description="a relay, every relay below it, and all their hosts")


MaintenanceIn = HostWindowIn | GlobWindowIn | RelayWindowIn


def target_of(window: MaintenanceIn) -> tuple[TargetKind, str]:
    if isinstance(window, HostWindowIn):
        return TargetKind.HOST, window.host
    if isinstance(window, GlobWindowIn):
        return TargetKind.GLOB, window.glob
    return TargetKind.RELAY, window.relay


class Covered(BaseModel):
    hosts: int
    relays: int


class MaintenanceOut(BaseModel):
    id: int
    target_kind: TargetKind
    target: str
    starts_at: datetime
    ends_at: datetime | None = Field(description="null: until removed")
    reason: str
    created_at: datetime
    removed_at: datetime | None
    active: bool = Field(description="covering its targets right now")
    covers: Covered = Field(description="hosts and relays its target includes right now, active or not")


_window_fields = Body(Window)


def window_body(shown: MaintenanceView) -> dict[str, Any]:
    covers = {"hosts": shown.hosts, "relays": shown.relays}
    return _window_fields(shown.window) | {"active": shown.active, "covers": covers}


@router.post(
    "/maintenance",
    status_code=201,
    response_model=MaintenanceOut,
    responses=BAD_BODY | CONFLICT | WRITE_REFUSED,
    dependencies=WRITE,
    tags=["maintenance"],
)
async def add_maintenance(view: ViewDep, window: MaintenanceIn) -> Response:
    """Put a host, a host-id glob, or a relay with its subtree into maintenance. Transitions of
    covered subjects are still recorded, marked `maintenance`; no notifications are sent for them
    and the time is reported apart in availability. Needs a write token."""
    kind, target = target_of(window)
    added = await view.add_maintenance(
        kind,
        target,
        starts_at=window.starts_at,
        ends_at=window.ends_at,
        duration_s=window.duration_s,
        reason=window.reason,
    )
    return refused(added) if isinstance(added, Refused) else json_response(window_body(added), 201)


@router.get("/maintenance", response_model=Page[MaintenanceOut], tags=["maintenance"])
async def list_maintenance(
    view: ViewDep,
    include_past: bool = Query(False, description="also windows that ended or were removed"),
) -> Response:
    """Windows in effect or still to come (newest first); with include_past, every window."""
    items = [window_body(w) for w in view.maintenance_windows(include_past)]
    return json_response({"items": items, "total": len(items)})


@router.get("/maintenance/{window_id}", response_model=MaintenanceOut, responses=NOT_FOUND, tags=["maintenance"])
async def get_maintenance(view: ViewDep, window_id: int) -> Response:
    shown = view.maintenance_window(window_id)
    return not_found("maintenance window", str(window_id)) if shown is None else json_response(window_body(shown))


@router.delete(
    "/maintenance/{window_id}",
    response_model=MaintenanceOut,
    responses=NOT_FOUND | CONFLICT | WRITE_REFUSED,
    dependencies=WRITE,
    tags=["maintenance"],
)
async def remove_maintenance(view: ViewDep, window_id: int) -> Response:
    """End a window now. It stays listed (with `include_past`) and in availability history."""
    removed = await view.remove_maintenance(window_id)
    return refused(removed) if isinstance(removed, Refused) else json_response(window_body(removed))


# ------------------------------------------------------------------------------- acknowledgements


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    comment: str = Field(min_length=1, max_length=2000)
    by: str = Field("", max_length=200, description="who acknowledges (free text)")


class AckOut(BaseModel):
    id: int
    kind: Kind
    subject: str
    transition_id: int | None = Field(description="the history row that started the acknowledged outage")
    comment: str
    acknowledged_at: datetime
    by: str
    current: bool = Field(description="the subject is still in the outage this acknowledges")


_ack_fields = Body(Acknowledgement)


def ack_body(shown: AckView) -> dict[str, Any]:
    return _ack_fields(shown.ack) | {"current": shown.current}


async def acknowledge(view: FleetView, kind: Kind, subject: str, body: AckIn) -> Response:
    made = await view.acknowledge(kind, subject, body.comment, body.by)
    return refused(made) if isinstance(made, Refused) else json_response(ack_body(made), 201)


async def acks_of(
    view: FleetView, kind: Kind | None, subject: str | None, current: bool | None, limit: int
) -> Response:
    items = [ack_body(a) for a in await view.acknowledgements(kind, subject, current, limit)]
    return json_response({"items": items, "total": len(items)})


ACK_WRITE: dict[str, Any] = {
    "status_code": 201,
    "response_model": AckOut,
    "responses": BAD_BODY | NOT_FOUND | CONFLICT | WRITE_REFUSED,
    "dependencies": WRITE,
}
Limit = Annotated[int, Query(ge=1, le=10_000)]


@router.post("/hosts/{host_id}/ack", tags=["hosts"], **ACK_WRITE)
async def acknowledge_host(view: ViewDep, host_id: str, body: AckIn) -> Response:
    """Acknowledge the host's current outage (`down` or `unreachable`) with a comment. Needs a write token."""
    return await acknowledge(view, Kind.HOST, host_id, body)


@router.post("/relays/{relay_id}/ack", tags=["relays"], **ACK_WRITE)
async def acknowledge_relay(view: ViewDep, relay_id: str, body: AckIn) -> Response:
    """Acknowledge the relay's current outage (`down` or `unreachable`) with a comment. Needs a write token."""
    return await acknowledge(view, Kind.RELAY, relay_id, body)


@router.get("/hosts/{host_id}/acks", response_model=Page[AckOut], responses=NOT_FOUND, tags=["hosts"])
async def host_acks(view: ViewDep, host_id: str, limit: Limit = 100) -> Response:
    """The host's acknowledgements, newest first; `current` marks the one for its ongoing outage."""
    if not view.has(Kind.HOST, host_id):
        return not_found("host", host_id)
    return await acks_of(view, Kind.HOST, host_id, None, limit)


@router.get("/relays/{relay_id}/acks", response_model=Page[AckOut], responses=NOT_FOUND, tags=["relays"])
async def relay_acks(view: ViewDep, relay_id: str, limit: Limit = 100) -> Response:
    if not view.has(Kind.RELAY, relay_id):
        return not_found("relay", relay_id)
    return await acks_of(view, Kind.RELAY, relay_id, None, limit)


@router.get("/acks", response_model=Page[AckOut], tags=["history"])
async def all_acks(
    view: ViewDep,
    kind: Kind | None = None,
    current: bool | None = Query(None, description="true: only those for ongoing outages"),
    limit: Limit = 100,
) -> Response:
    """Acknowledgements, newest first (`limit` applies before the `current` filter)."""
    return await acks_of(view, kind, None, current, limit)
