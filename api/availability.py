"""Availability reports and the fleet summary, computed from the `transitions` table.

The computation is `monitor.availability` (pure); this module fetches state changes from SQL and
the subject's maintenance from the live book, and shapes the answer. A window reaching into the
future ends now: what has not happened yet is not reported.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, Field

from api.bodies import NOT_FOUND, error_response, iso, json_response, monitor_of, not_found
from api.history import BAD_QUERY
from monitor.availability import Availability, availability
from monitor.service import Monitor
from monitor.states import Kind, State

router = APIRouter(prefix="/api/v1")
MonitorDep = Annotated[Monitor, Depends(monitor_of)]
ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def iso_only(value: object) -> object:
    """Pydantic would also read "0" or "1e9" as Unix times; the schema promises ISO 8601 only."""
    if isinstance(value, str) and not ISO_DATE.match(value):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-11-29T00:00:00Z")
    return value


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
DEFAULT_WINDOW = timedelta(hours=24)
EARLIEST = datetime.min.replace(tzinfo=UTC)


class Seconds(BaseModel):
    """Every second of the window, counted once: in maintenance, or in the state the subject was in."""

    up: float
    down: float
    unreachable: float
    stopped: float
    unknown: float
    maintenance: float


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
        "seconds": seconds | {"maintenance": report.maintenance.total_seconds()},
    }


def window(monitor: Monitor, since: datetime | None, until: datetime | None) -> tuple[datetime, datetime] | str:
    """The report window `[since, until)` in UTC, cut at now (empty if it starts later), or why the
    query is wrong. Times beyond the years 1–9999 in UTC are taken as unbounded on that side."""
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            return f"{name} needs a time zone (e.g. Z)"
    now = monitor.clock.wall(monitor.clock.now())
    end = now
    if until is not None:
        try:
            end = min(until.astimezone(UTC), now)
        except OverflowError:  # e.g. 9999-12-31T23:00:00-02:00 is after 9999 in UTC; 0001-01-01T00:00+01:00 before 1
            end = now if until.year > 1 else EARLIEST
    if since is None:
        start = end - DEFAULT_WINDOW if end - EARLIEST > DEFAULT_WINDOW else EARLIEST
    else:
        try:
            start = since.astimezone(UTC)
        except OverflowError:
            start = EARLIEST if since.year == 1 else end
    return min(start, end), end


async def report(
    monitor: Monitor, kind: Kind, subject: str, since: datetime | None, until: datetime | None
) -> Response:
    bounds = window(monitor, since, until)
    if isinstance(bounds, str):
        return error_response(422, "bad_request", bounds)
    start, end = bounds
    initial, changes = await monitor.store.state_changes(kind, start, end, subject)
    spans = monitor.maintenance.intervals(kind, subject, monitor.relay_path(kind, subject))
    result = availability(
        initial.get(subject, State.UNKNOWN), [(at, state) for _, at, state in changes], spans, start, end
    )
    return json_response(report_body(kind, subject, result))


@router.get("/hosts/{host_id}/availability", response_model=AvailabilityOut, responses=NOT_FOUND, tags=["availability"])
async def host_availability(monitor: MonitorDep, host_id: str, since: Since = None, until: Until = None) -> Response:
    """Uptime, downtime, outages and recovery time of a host over `[since, until)`, with
    unreachable and maintenance time reported apart from down."""
    if host_id not in monitor.detector.hosts:
        return not_found("host", host_id)
    return await report(monitor, Kind.HOST, host_id, since, until)


@router.get(
    "/relays/{relay_id}/availability",
    response_model=AvailabilityOut,
    responses=NOT_FOUND | BAD_QUERY,
    tags=["availability"],
)
async def relay_availability(monitor: MonitorDep, relay_id: str, since: Since = None, until: Until = None) -> Response:
    """The same for a relay (its own state: `unreachable` means a relay above it was down)."""
    if relay_id not in monitor.detector.relays:
        return not_found("relay", relay_id)
    return await report(monitor, Kind.RELAY, relay_id, since, until)


@router.get("/summary", response_model=SummaryOut, responses=BAD_QUERY, tags=["availability"])
async def summary(
    monitor: MonitorDep,
    since: Since = None,
    until: Until = None,
    worst: int = Query(10, ge=0, le=1000, description="how many worst hosts to list"),
) -> Response:
    """The fleet at a glance: hosts and relays per state now, and the hosts with the most downtime."""
    bounds = window(monitor, since, until)
    if isinstance(bounds, str):
        return error_response(422, "bad_request", bounds)
    start, end = bounds
    detector = monitor.detector
    now = monitor.clock.wall(monitor.clock.now())

    def counts(kind: Kind, tracks: dict[str, Any]) -> dict[str, Any]:
        states = dict.fromkeys((s.value for s in State), 0)
        for track in tracks.values():
            states[track.state.value] += 1
        maintained = sum(1 for subject in tracks if monitor.in_maintenance(kind, subject, now))
        flapping = sum(1 for track in tracks.values() if track.flapping)
        return {"total": len(tracks), "states": states, "flapping": flapping, "in_maintenance": maintained}

    worst_hosts: list[dict[str, Any]] = []
    if worst:
        initial, changes = await monitor.store.state_changes(Kind.HOST, start, end)
        by_host: dict[str, list[tuple[datetime, State]]] = {}
        for subject, at, state in changes:
            by_host.setdefault(subject, []).append((at, state))
        # Only a host that was down at `since` or went down in the window can have downtime.
        candidates = {h for h, s in initial.items() if s == State.DOWN}
        candidates |= {h for h, hs in by_host.items() if any(s == State.DOWN for _, s in hs)}
        for host_id in sorted(candidates & detector.hosts.keys()):
            spans = monitor.maintenance.intervals(Kind.HOST, host_id, monitor.relay_path(Kind.HOST, host_id))
            result = availability(initial.get(host_id, State.UNKNOWN), by_host.get(host_id, []), spans, start, end)
            if result.down > timedelta(0):
                worst_hosts.append(
                    {
                        "id": host_id,
                        "state": detector.hosts[host_id].state.value,
                        "downtime_s": result.down.total_seconds(),
                        "outages": result.outages,
                        "uptime_ratio": result.uptime_ratio,
                    }
                )
        worst_hosts.sort(key=lambda h: (-h["downtime_s"], -h["outages"], h["id"]))
    return json_response(
        {
            "hosts": counts(Kind.HOST, detector.hosts),
            "relays": counts(Kind.RELAY, detector.relays),
            "since": iso(start),
            "until": iso(end),
            "worst_hosts": worst_hosts[:worst],
        }
    )
