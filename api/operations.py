"""Operator writes: maintenance windows and outage acknowledgements (writes need a write token).

Routes only record what an operator said; they never decide a state. A maintenance window is
written to SQL first, then added to the live `MaintenanceBook`, so what the monitor marks and
what a restart reloads agree. "Now" is the monitor's clock, like every transition time.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, Strict

from api.auth import WRITE_REFUSED, require_write_token
from api.bodies import NOT_FOUND, ErrorOut, Page, error_response, iso, json_response, monitor_of, not_found
from api.history import iso_only
from monitor.maintenance import TargetKind, Window
from monitor.service import Monitor
from monitor.states import Kind, State
from monitor.store import Acknowledgement

router = APIRouter(prefix="/api/v1")
MonitorDep = Annotated[Monitor, Depends(monitor_of)]
WRITE = [Depends(require_write_token)]

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
GLOB_PATTERN = r"^[A-Za-z0-9._*?\[\]!-]{1,128}$"
OUTAGE_STATES = (State.DOWN, State.UNREACHABLE)
ACK_WRITE_WAIT_S = 2.0
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "nothing to act on (no outage, removed already), or not a window"}
}
BAD_BODY: dict[int | str, dict[str, Any]] = {400: {"model": ErrorOut, "description": "the body is not JSON"}}


def now_of(monitor: Monitor) -> datetime:
    return monitor.clock.wall(monitor.clock.now())


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


def span_of(window: MaintenanceIn, now: datetime) -> tuple[datetime, datetime | None] | str:
    """The window's `[start, end)` in UTC, or why it is not a window."""
    try:
        start = now if window.starts_at is None else window.starts_at.astimezone(UTC)
        end = None if window.ends_at is None else window.ends_at.astimezone(UTC)
        if window.duration_s is not None:
            end = start + timedelta(seconds=window.duration_s)
    except OverflowError:
        return "the window reaches outside the years 1 to 9999 (UTC)"
    if window.ends_at is not None and window.duration_s is not None:
        return "give ends_at or duration_s, not both"
    if end is not None and end <= start:
        return f"ends_at ({iso(end)}) is not after starts_at ({iso(start)})"
    return start, end


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


def covered(monitor: Monitor, window: Window) -> dict[str, int]:
    detector = monitor.detector
    if window.target_kind is TargetKind.HOST:
        return {"hosts": int(window.target in detector.hosts), "relays": 0}
    hosts = sum(1 for h in detector.hosts if window.matches(Kind.HOST, h, monitor.relay_path(Kind.HOST, h)))
    relays = sum(1 for r in detector.relays if window.matches(Kind.RELAY, r, monitor.relay_path(Kind.RELAY, r)))
    return {"hosts": hosts, "relays": relays}


def window_body(monitor: Monitor, window: Window, now: datetime) -> dict[str, Any]:
    return {
        "id": window.id,
        "target_kind": window.target_kind.value,
        "target": window.target,
        "starts_at": iso(window.starts_at),
        "ends_at": iso(window.ends_at),
        "reason": window.reason,
        "created_at": iso(window.created_at),
        "removed_at": iso(window.removed_at),
        "active": window.active_at(now),
        "covers": covered(monitor, window),
    }


@router.post(
    "/maintenance",
    status_code=201,
    response_model=MaintenanceOut,
    responses=BAD_BODY | CONFLICT | WRITE_REFUSED,
    dependencies=WRITE,
    tags=["maintenance"],
)
async def add_maintenance(monitor: MonitorDep, window: MaintenanceIn) -> Response:
    """Put a host, a host-id glob, or a relay with its subtree into maintenance. Transitions of
    covered subjects are still recorded, marked `maintenance`; no notifications are sent for them
    and the time is reported apart in availability. Needs a write token."""
    now = now_of(monitor)
    span = span_of(window, now)
    if isinstance(span, str):  # valid JSON for the schema, but not a window
        return error_response(409, "bad_window", span)
    kind, target = target_of(window)
    stored = await monitor.store.add_maintenance(kind, target, span[0], span[1], window.reason, now)
    monitor.maintenance.add(stored)
    return json_response(window_body(monitor, stored, now), 201)


@router.get("/maintenance", response_model=Page[MaintenanceOut], tags=["maintenance"])
async def list_maintenance(
    monitor: MonitorDep,
    include_past: bool = Query(False, description="also windows that ended or were removed"),
) -> Response:
    """Windows in effect or still to come (newest first); with include_past, every window."""
    now = now_of(monitor)
    windows = monitor.maintenance.windows()
    if not include_past:
        windows = [w for w in windows if w.end is None or w.end > now]
    items = [window_body(monitor, w, now) for w in reversed(windows)]
    return json_response({"items": items, "total": len(items)})


@router.get("/maintenance/{window_id}", response_model=MaintenanceOut, responses=NOT_FOUND, tags=["maintenance"])
async def get_maintenance(monitor: MonitorDep, window_id: int) -> Response:
    window = monitor.maintenance.get(window_id)
    if window is None:
        return not_found("maintenance window", str(window_id))
    return json_response(window_body(monitor, window, now_of(monitor)))


@router.delete(
    "/maintenance/{window_id}",
    response_model=MaintenanceOut,
    responses=NOT_FOUND | CONFLICT | WRITE_REFUSED,
    dependencies=WRITE,
    tags=["maintenance"],
)
async def remove_maintenance(monitor: MonitorDep, window_id: int) -> Response:
    """End a window now. It stays listed (with `include_past`) and in availability history."""
    known = monitor.maintenance.get(window_id)
    if known is None:
        return not_found("maintenance window", str(window_id))
    now = now_of(monitor)
    removed = await monitor.store.remove_maintenance(window_id, now)
    if removed is None:
        return error_response(409, "already_removed", f"maintenance window {window_id} was removed already")
    monitor.maintenance.add(removed)
    return json_response(window_body(monitor, removed, now))


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


def is_current(monitor: Monitor, ack: Acknowledgement) -> bool:
    """An acknowledgement holds while the subject stays in the outage state it was made in."""
    detector = monitor.detector
    track = detector.hosts.get(ack.subject) if ack.kind is Kind.HOST else detector.relays.get(ack.subject)
    if track is None or track.state not in OUTAGE_STATES:
        return False
    return ack.acknowledged_at >= monitor.clock.wall(track.since)


def ack_body(monitor: Monitor, ack: Acknowledgement) -> dict[str, Any]:
    return {
        "id": ack.id,
        "kind": ack.kind.value,
        "subject": ack.subject,
        "transition_id": ack.transition_id,
        "comment": ack.comment,
        "acknowledged_at": iso(ack.acknowledged_at),
        "by": ack.by,
        "current": is_current(monitor, ack),
    }


async def outage_start(monitor: Monitor, kind: Kind, subject: str, state: State) -> int | None:
    """The id of the history row that put the subject in `state`. A decision reaches SQL a few
    milliseconds after it is made, so wait for one more write if need be; None if it never comes."""
    for attempt in range(2):
        began = (await monitor.store.latest_changes(kind, [subject])).get(subject)
        if began is not None and began.to_state == state:
            return began.id
        if attempt == 0:
            async with monitor.written:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(monitor.written.wait(), ACK_WRITE_WAIT_S)
    return None


async def acknowledge(monitor: Monitor, kind: Kind, subject: str, body: AckIn) -> Response:
    detector = monitor.detector
    track = detector.hosts.get(subject) if kind is Kind.HOST else detector.relays.get(subject)
    if track is None:
        return not_found(kind.value, subject)
    if track.state not in OUTAGE_STATES:
        return error_response(
            409, "no_outage", f"{kind.value} {subject!r} is {track.state.value}: no outage to acknowledge"
        )
    transition_id = await outage_start(monitor, kind, subject, track.state)
    ack = await monitor.store.acknowledge(kind, subject, transition_id, body.comment, now_of(monitor), body.by)
    return json_response(ack_body(monitor, ack), 201)


async def acks_of(
    monitor: Monitor, kind: Kind | None, subject: str | None, current: bool | None, limit: int
) -> Response:
    acks = await monitor.store.acknowledgements(kind, subject, limit)
    items = [ack_body(monitor, ack) for ack in acks]
    if current is not None:
        items = [item for item in items if item["current"] is current]
    return json_response({"items": items, "total": len(items)})


ACK_WRITE: dict[str, Any] = {
    "status_code": 201,
    "response_model": AckOut,
    "responses": BAD_BODY | NOT_FOUND | CONFLICT | WRITE_REFUSED,
    "dependencies": WRITE,
}
Limit = Annotated[int, Query(ge=1, le=10_000)]


@router.post("/hosts/{host_id}/ack", tags=["hosts"], **ACK_WRITE)
async def acknowledge_host(monitor: MonitorDep, host_id: str, body: AckIn) -> Response:
    """Acknowledge the host's current outage (`down` or `unreachable`) with a comment. Needs a write token."""
    return await acknowledge(monitor, Kind.HOST, host_id, body)


@router.post("/relays/{relay_id}/ack", tags=["relays"], **ACK_WRITE)
async def acknowledge_relay(monitor: MonitorDep, relay_id: str, body: AckIn) -> Response:
    """Acknowledge the relay's current outage (`down` or `unreachable`) with a comment. Needs a write token."""
    return await acknowledge(monitor, Kind.RELAY, relay_id, body)


@router.get("/hosts/{host_id}/acks", response_model=Page[AckOut], responses=NOT_FOUND, tags=["hosts"])
async def host_acks(monitor: MonitorDep, host_id: str, limit: Limit = 100) -> Response:
    """The host's acknowledgements, newest first; `current` marks the one for its ongoing outage."""
    if host_id not in monitor.detector.hosts:
        return not_found("host", host_id)
    return await acks_of(monitor, Kind.HOST, host_id, None, limit)


@router.get("/relays/{relay_id}/acks", response_model=Page[AckOut], responses=NOT_FOUND, tags=["relays"])
async def relay_acks(monitor: MonitorDep, relay_id: str, limit: Limit = 100) -> Response:
    if relay_id not in monitor.detector.relays:
        return not_found("relay", relay_id)
    return await acks_of(monitor, Kind.RELAY, relay_id, None, limit)


@router.get("/acks", response_model=Page[AckOut], tags=["history"])
async def all_acks(
    monitor: MonitorDep,
    kind: Kind | None = None,
    current: bool | None = Query(None, description="true: only those for ongoing outages"),
    limit: Limit = 100,
) -> Response:
    """Acknowledgements, newest first (`limit` applies before the `current` filter)."""
    return await acks_of(monitor, kind, None, current, limit)
