"""History: the `transitions` table (through the read view), filtered by subject, kind and time range."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from relaybeat.api.bodies import (
    NOT_FOUND,
    ErrorOut,
    Page,
    TransitionOut,
    ViewDep,
    error_response,
    iso_only,
    json_response,
    not_found,
    transition_body,
)
from relaybeat.monitor.states import Kind
from relaybeat.monitor.view import FleetView

router = APIRouter(prefix="/api/v1")


Since = Annotated[datetime | None, BeforeValidator(iso_only), Query(description="inclusive, ISO 8601 with a time zone")]
Until = Annotated[datetime | None, BeforeValidator(iso_only), Query(description="exclusive, ISO 8601 with a time zone")]
Limit = Annotated[int, Query(ge=1, le=10_000)]
# A 422 is a request FastAPI could not validate, or ours for a time without a zone: one shape.
BAD_QUERY: dict[int | str, dict[str, Any]] = {422: {"model": ErrorOut, "description": "a query parameter is not valid"}}


async def history(view: FleetView, **filters: Any) -> Response:
    for key in ("since", "until"):
        moment = filters.get(key)
        if moment is None:
            continue
        if moment.tzinfo is None:
            return error_response(422, "bad_request", f"{key} needs a time zone (e.g. Z)")
        try:
            filters[key] = moment.astimezone(UTC)
        except OverflowError:  # before year 1 or after 9999 once in UTC, e.g. 0001-01-01T00:00:00+01:00
            if (key == "since") != (moment.year == 1):  # since after 9999 or until before year 1: nothing
                return json_response({"items": [], "total": 0})
            filters[key] = None  # since before year 1 or until after 9999: no bound on that side
    rows = await view.history(newest_first=filters.get("after_id") is None, **filters)
    items = [transition_body(t) for t in rows]
    return json_response({"items": items, "total": len(items)})


async def subject_history(
    view: FleetView, kind: Kind, subject: str, since: datetime | None, until: datetime | None, limit: int
) -> Response:
    """One host's or relay's history, newest first; 404 for an id the monitor does not know."""
    if not view.has(kind, subject):
        return not_found(kind.value, subject)
    return await history(view, kind=kind, subject=subject, since=since, until=until, limit=limit)


def _subject_transitions(kind: Kind) -> None:
    """`GET /api/v1/hosts/{host_id}/transitions`, or the relays' likewise."""
    ident = f"{kind.value}_id"

    @router.get(
        f"/{kind.value}s/{{{ident}}}/transitions",
        response_model=Page[TransitionOut],
        responses=NOT_FOUND | BAD_QUERY,
        tags=[f"{kind.value}s"],
        name=f"{kind.value}_transitions",
    )
    async def transitions(
        view: ViewDep,
        subject: str = Path(alias=ident),
        since: Since = None,
        until: Until = None,
        limit: Limit = 100,
    ) -> Response:
        return await subject_history(view, kind, subject, since, until, limit)


for _kind in Kind:
    _subject_transitions(_kind)


@router.get("/transitions", response_model=Page[TransitionOut], responses=BAD_QUERY, tags=["history"])
async def all_transitions(
    view: ViewDep,
    since: Since = None,
    until: Until = None,
    kind: Kind | None = None,
    after_id: int | None = Query(
        None, ge=0, le=2**63 - 1, description="only rows with a larger id, oldest first (resume)"
    ),
    limit: Limit = 100,
) -> Response:
    """Newest first; with `after_id`, oldest first from just after that row."""
    return await history(view, kind=kind, since=since, until=until, after_id=after_id, limit=limit)
