"""Response shapes: pydantic models for the OpenAPI schema, and the fast builders that fill them.

Routes return `json_response(...)` of plain dicts built here (orjson) from the read view's
snapshots (`monitor.view`), and declare the matching model as `response_model` so /docs stays
exact. Keep each builder next to its model. Routes reach the monitor only through `ViewDep`.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from relaybeat.monitor.records import TransitionRow
from relaybeat.monitor.states import Kind, State
from relaybeat.monitor.view import FleetView, HostView, Refused, RelayView, iso

T = TypeVar("T")


# The bodies have the fields of the read view's records (`HostView`, `RelayView`) and of `TransitionRow`
# (tests/test_records.py checks): a field added to a record is added here too.


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
    source: str | None = Field(
        description="the watched source its relay vouches for it from (tasmota, esphome, zigbee2mqtt, sparkplug, "
        "or a custom source's name); null if it beats"
    )
    timeout_basis: str | None = Field(
        description="how the timeout was derived from [detector] targets and whether they hold; null: misses or phi"
    )


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


# How the API names `TransitionRow`'s fields; the ones in TRANSITION_UNSHOWN are not in its bodies.
TRANSITION_RENAMED = {"from_state": "from", "to_state": "to"}
TRANSITION_UNSHOWN = frozenset({"maintenance", "key"})


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


def view_of(request: Request) -> FleetView:
    """The running monitor's read view, for routes (a FastAPI dependency)."""
    view: FleetView = request.app.state.view
    return view


ViewDep = Annotated[FleetView, Depends(view_of)]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(status: int, error: str, detail: str) -> Response:
    return json_response({"error": error, "detail": detail}, status)


HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
VALIDATION_DETAIL_CHARS = 1000


def install_error_shape(app: FastAPI) -> None:
    """Every 4xx is `{"error": ..., "detail": ...}`: FastAPI's own (unknown route, wrong method, a body
    that is not JSON, request validation) too, and the OpenAPI schema says so for every 422."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        error = HTTP_ERRORS.get(exc.status_code, "http_error")
        response = error_response(exc.status_code, error, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "bad_request", validation_detail(exc))

    schema_of = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = one_error_schema(schema_of())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def validation_detail(exc: RequestValidationError) -> str:
    """Each problem as `where: what`, e.g. `query.limit: Input should be greater than or equal to 1`."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'not valid')}" if where else str(error.get("msg", "not valid")))
    return "; ".join(problems)[:VALIDATION_DETAIL_CHARS] or "the request is not valid"


def one_error_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its 422 as `HTTPValidationError`; ours is `ErrorOut` like every other 4xx."""
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            invalid = operation.get("responses", {}).get("422")
            if invalid is not None:
                invalid["content"] = {"application/json": {"schema": error_ref}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components.setdefault("ErrorOut", ErrorOut.model_json_schema())
    return schema


def not_found(what: str, ident: str) -> Response:
    return error_response(404, "not_found", f"no {what} {ident!r}")


def refused(refusal: Refused) -> Response:
    """A write the view refused: 404 for an unknown subject or window, 409 for anything else."""
    return error_response(404 if refusal.reason == "not_found" else 409, refusal.reason, refusal.detail)


def _enum_value(value: enum.Enum | None) -> object:
    return None if value is None else value.value


def _listed(value: tuple[object, ...]) -> list[object]:
    return list(value)


def _shown_as(hint: Any) -> Callable[[Any], object] | None:
    """How a field of this type is shown in JSON: moments as ISO text, enums as their values, tuples
    as lists; None: as it is."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    kinds = {typing.get_origin(k) or k for k in (typing.get_args(hint) if union else (hint,))} - {type(None)}
    if datetime in kinds:
        return iso
    if all(isinstance(k, type) and issubclass(k, enum.Enum) for k in kinds):
        return _enum_value
    return _listed if tuple in kinds else None


class Body:
    """The API's body of one record type: every field of the record but `unshown`, named as the API
    names it (`renamed`), in the record's order. Planned once per type, so a page of records is fast."""

    def __init__(self, record: type, renamed: Mapping[str, str] | None = None, unshown: frozenset[str] = frozenset()):
        hints = typing.get_type_hints(record)
        names = [f.name for f in dataclasses.fields(record) if f.name not in unshown]
        self.shown = tuple((renamed or {}).get(name, name) for name in names)
        self.types = tuple(hints[name] for name in names)
        self.values = operator.attrgetter(*names)
        shows = (_shown_as(hint) for hint in self.types)
        self.converted = tuple((shown, show) for shown, show in zip(self.shown, shows, strict=True) if show)

    def model(self, name: str, described: Mapping[str, str]) -> type[BaseModel]:
        """The pydantic model of these bodies for the OpenAPI schema, made from the record's fields
        (so it cannot miss one): each as shown, of the record's type, with its description if any."""
        unknown = described.keys() - set(self.shown)
        if unknown:
            msg = f"{name}: no field {', '.join(sorted(unknown))} to describe"
            raise TypeError(msg)
        fields: dict[str, Any] = {
            shown: (hint, Field(description=described.get(shown)))
            for shown, hint in zip(self.shown, self.types, strict=True)
        }
        return create_model(name, **fields)

    def __call__(self, record: object) -> dict[str, Any]:
        body = dict(zip(self.shown, self.values(record), strict=True))
        for name, show in self.converted:
            body[name] = show(body[name])
        return body


host_body = Body(HostView)
relay_body = Body(RelayView)
transition_body = Body(TransitionRow, TRANSITION_RENAMED, TRANSITION_UNSHOWN)


ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def iso_only(value: object) -> object:
    """For time query parameters: pydantic would also read 1e9, "0" or true as Unix times; the
    schema promises ISO 8601 only."""
    if isinstance(value, int | float) or (isinstance(value, str) and not ISO_DATE.match(value)):
        msg = "expected an ISO 8601 date-time, e.g. 2026-11-29T00:00:00Z"
        raise ValueError(msg)
    return value
