"""Availability reports and the fleet summary, computed from the `transitions` table.

The computation is `monitor.availability` (pure), fed by the read view (state changes from SQL,
maintenance from the live book); this module parses the query and shapes the answer. A window
reaching into the future ends now: what has not happened yet is not reported.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, Field

from relaybeat.api.bodies import NOT_FOUND, ViewDep, error_response, iso_only, json_response, not_found
from relaybeat.api.history import BAD_QUERY
from relaybeat.monitor import view as shown
from relaybeat.monitor.availability import Availability
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.view import FleetView, iso

router = APIRouter(prefix="/api/v1")


Since = Annotated[
    datetime | None,
    BeforeValidator(iso_only),
    Query(description="inclusive, ISO 8601 with a time zone; default: until − 24 h"),
]
Until = Annotated[
    datetime | None,
    BeforeValidator(iso_only),
    Query(description="exclusive, ISO 8601 with a time zone; default and at most: now"),
]


class Seconds(BaseModel):
    """Every second of the window, counted once: in maintenance, or in the state the subject was in."""

    up: float
    down: float
    unreachable: float
    stopped: float
    unknown: float
    maintenance: float
    false_alarm: float = Field(description="held down or unreachable by a false alarm (it was up): not downtime")


class AvailabilityOut(BaseModel):
    kind: Kind
    id: str
    since: datetime
    until: datetime
    uptime_ratio: float | None = Field(description="up / (up + down); null when the window holds neither")
    downtime_s: float = Field(description="time down outside maintenance")
    outages: int = Field(description="periods down (outside maintenance) overlapping the window")
    longest_outage_s: float
    mean_time_to_recovery_s: float | None = Field(description="downtime / outages; null without outages")
    false_alarm_s: float = Field(description="time held out by outages proved false alarms, apart from downtime")
    seconds: Seconds


class StateCounts(BaseModel):
    total: int
    states: dict[State, int]
    flapping: int
    in_maintenance: int = Field(description="covered by a maintenance window right now")


class WorstHost(BaseModel):
    id: str
    state: State
    downtime_s: float
    outages: int
    uptime_ratio: float | None


class SummaryOut(BaseModel):
    hosts: StateCounts
    relays: StateCounts
    since: datetime
    until: datetime
    worst_hosts: list[WorstHost] = Field(description="hosts with the most downtime in the window, worst first")


def report_body(kind: Kind, subject: str, report: Availability) -> dict[str, Any]:
    mttr = report.mean_time_to_recovery
    seconds = {state.value: report.time_in[state].total_seconds() for state in State}
    return {
        "kind": kind.value,
        "id": subject,
        "since": iso(report.since),
        "until": iso(report.until),
        "uptime_ratio": report.uptime_ratio,
        "downtime_s": report.down.total_seconds(),
        "outages": report.outages,
        "longest_outage_s": report.longest_outage.total_seconds(),
        "mean_time_to_recovery_s": None if mttr is None else mttr.total_seconds(),
        "false_alarm_s": report.false_alarm.total_seconds(),
        "seconds": seconds
        | {"maintenance": report.maintenance.total_seconds(), "false_alarm": report.false_alarm.total_seconds()},
    }


def worst_body(h: shown.WorstHost) -> dict[str, Any]:
    return {
        "id": h.id,
        "state": h.state.value,
        "downtime_s": h.downtime_s,
        "outages": h.outages,
        "uptime_ratio": h.uptime_ratio,
    }


def counts_body(counts: shown.StateCounts) -> dict[str, Any]:
    return {
        "total": counts.total,
        "states": {state.value: n for state, n in counts.states.items()},
        "flapping": counts.flapping,
        "in_maintenance": counts.in_maintenance,
    }


async def report(view: FleetView, kind: Kind, subject: str, since: datetime | None, until: datetime | None) -> Response:
    bounds = view.report_window(since, until)
    if isinstance(bounds, str):
        return error_response(422, "bad_request", bounds)
    return json_response(report_body(kind, subject, await view.availability(kind, subject, *bounds)))


@router.get("/hosts/{host_id}/availability", response_model=AvailabilityOut, responses=NOT_FOUND, tags=["availability"])
async def host_availability(view: ViewDep, host_id: str, since: Since = None, until: Until = None) -> Response:
    """Uptime, downtime, outages and recovery time of a host over `[since, until)`, with
    unreachable and maintenance time reported apart from down."""
    if not view.has(Kind.HOST, host_id):
        return not_found("host", host_id)
    return await report(view, Kind.HOST, host_id, since, until)


@router.get(
    "/relays/{relay_id}/availability",
    response_model=AvailabilityOut,
    responses=NOT_FOUND | BAD_QUERY,
    tags=["availability"],
)
async def relay_availability(view: ViewDep, relay_id: str, since: Since = None, until: Until = None) -> Response:
    """The same for a relay (its own state: `unreachable` means a relay above it was down)."""
    if not view.has(Kind.RELAY, relay_id):
        return not_found("relay", relay_id)
    return await report(view, Kind.RELAY, relay_id, since, until)


@router.get("/summary", response_model=SummaryOut, responses=BAD_QUERY, tags=["availability"])
async def summary(
    view: ViewDep,
    since: Since = None,
    until: Until = None,
    worst: int = Query(10, ge=0, le=1000, description="how many worst hosts to list"),
) -> Response:
    """The fleet at a glance: hosts and relays per state now, and the hosts with the most downtime."""
    bounds = view.report_window(since, until)
    if isinstance(bounds, str):
        return error_response(422, "bad_request", bounds)
    fleet = await view.summary(*bounds, worst=worst)
    return json_response(
        {
            "hosts": counts_body(fleet.hosts),
            "relays": counts_body(fleet.relays),
            "since": iso(fleet.since),
            "until": iso(fleet.until),
            "worst_hosts": [worst_body(h) for h in fleet.worst_hosts],
        }
    )
