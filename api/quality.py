"""`GET /api/v1/quality`: how good the detector's own judgement was over a window.

The figures are `monitor.quality.figures` (pure), fed by the read view from the `detections` and
`false_alarms` tables; this module parses the query and shapes the answer.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from relaybeat.api.availability import Since, Until
from relaybeat.api.bodies import Body, ViewDep, error_response, json_response
from relaybeat.api.history import BAD_QUERY
from relaybeat.monitor.quality import Figures
from relaybeat.monitor.records import FalseAlarmRow
from relaybeat.monitor.states import Kind
from relaybeat.monitor.view import iso

router = APIRouter(prefix="/api/v1")


class FiguresOut(BaseModel):
    subjects: int = Field(description="subjects watched over the window")
    window_s: float
    outages: int = Field(description="outages (down or unreachable) opened in the window")
    deaths: int = Field(description="outages not proved false alarms")
    false_alarms: int
    detection_s_mean: float | None = Field(description="T_D: last evidence of life to the decision, real deaths")
    detection_s_max: float | None
    false_alarms_per_day: float | None = Field(description="λ_M: false alarms per subject and day")
    mistake_duration_s: float | None = Field(description="T_M: how long a false alarm lasted, on average")
    mistake_recurrence_s: float | None = Field(description="E[T_MR] = 1/λ_M: time between false alarms")
    query_accuracy: float | None = Field(description="P_A = 1 − E[T_M]/E[T_MR]: share of time the answer was right")
    false_alarm_s: float = Field(description="total time wrongly held out")


class SubjectFiguresOut(FiguresOut):
    kind: Kind
    id: str


# A false alarm's body is its row as stored, the links to its transitions by id (written by now).
false_alarm_body = Body(FalseAlarmRow, unshown=frozenset({"opened_key", "closed_key"}))
FalseAlarmOut = false_alarm_body.model(
    "FalseAlarmOut",
    {
        "opened_id": "the transition that opened the outage",
        "closed_id": "the transition that closed it",
        "proof": "seq_continuity, dated_inside or relay_false_alarm",
    },
)


class QualityOut(BaseModel):
    since: datetime
    until: datetime
    hosts: FiguresOut | None
    relays: FiguresOut | None
    by_relay: dict[str, FiguresOut] = Field(description="hosts heard through each relay now")
    subjects: list[SubjectFiguresOut] = Field(description="every subject with an outage in the window")
    false_alarms: list[FalseAlarmOut]  # type: ignore[valid-type]  # a model made from FalseAlarmRow


figures_body = Body(Figures)


@router.get("/quality", response_model=QualityOut, responses=BAD_QUERY, tags=["availability"])
async def quality(
    view: ViewDep,
    since: Since = None,
    until: Until = None,
    kind: Kind | None = Query(None, description="only hosts or only relays"),
    id: str | None = Query(None, description="only this subject", max_length=128),
    relay: str | None = Query(None, description="only this relay and what is behind it now", max_length=128),
) -> Response:
    """The detector's own quality over `[since, until)`: detection time of real deaths (T_D), false
    alarms (proved by the evidence that ended them) per subject-day (λ_M), their mean length (T_M),
    and the share of time its answer was right (P_A); for the fleet, per relay and per subject."""
    bounds = view.report_window(since, until)
    if isinstance(bounds, str):
        return error_response(422, "bad_request", bounds)
    report = await view.quality(*bounds, kind=kind, subject=id, relay=relay)
    fleet = report.fleet
    return json_response(
        {
            "since": iso(report.since),
            "until": iso(report.until),
            "hosts": figures_body(fleet[Kind.HOST]) if Kind.HOST in fleet else None,
            "relays": figures_body(fleet[Kind.RELAY]) if Kind.RELAY in fleet else None,
            "by_relay": {r: figures_body(f) for r, f in report.by_relay.items()},
            "subjects": [{"kind": k.value, "id": s, **figures_body(f)} for (k, s), f in report.by_subject.items()],
            "false_alarms": [false_alarm_body(f) for f in report.false_alarms],
        }
    )
