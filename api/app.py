"""The HTTP API: everything it shows comes from the read view (`monitor.view`). OpenAPI at /docs and
/redoc, served from the assets the fastapi-offline package ships (no CDN: monitoring often runs offline).

Routes only read and shape data; they never decide a state. Each feature is a router in its own
module; this file only assembles them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from relaybeat.api import availability, cluster, events, history, metrics, operations, quality, state, status
from relaybeat.api.auth import (
    READ_REFUSED,
    WRITE_REFUSED,
    ApiSettings,
    install,
    require_read_token,
    require_write_token,
)
from relaybeat.api.bodies import (
    DATABASE_UNAVAILABLE,
    NOT_FOUND,
    RETRY_AFTER_S,
    ViewDep,
    error_response,
    install_error_shape,
    json_response,
    not_found,
)
from relaybeat.api.pages import document
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.view import FleetView
from relaybeat.relay.parts import PartState

DATABASE_WARNING_EVERY_S = 10.0  # the 503s say why; the log says so at most this often
log = logging.getLogger("relaybeat.api")


class Health(BaseModel):
    status: str = Field(
        description="ok, or degraded while the monitor cannot see (then nothing turns down), the database "
        "is away or a part is not running"
    )
    broker_connected: bool = Field(description="the main broker session is up, or the spare session hears in its place")
    blind: bool
    spare_takeovers: int = Field(
        description="times the spare broker session (with a list of broker nodes) heard in place of the lost main one"
    )
    broker: str | None = Field(
        description="the broker node the main session hears through, password redacted (null while it does not)"
    )
    spare_broker: str | None = Field(
        description="the broker node the spare session is subscribed on (null without a node list, or while it is not)"
    )
    in_grace: bool
    database_ok: bool = Field(description="the database answers the monitor's probe and took the last write")
    unwritten: int = Field(
        description="decisions made (and journaled) but not yet in SQL: a fleet's onboarding, or a database away"
    )
    hosts: int
    relays: int
    received: dict[str, int]
    rejected: dict[str, int]
    parts: dict[str, PartState] = Field(
        description="the monitor's tasks: consume, expire, write, checkpoint, loop_lag, db_probe (and notify "
        "with webhooks; lease and follow with hot standby; spare with a list of broker nodes); anything but running "
        "makes the status degraded"
    )
    role: str = Field(description="active, or standby (a hot standby on PostgreSQL: serves reads, writes nothing)")
    node: str | None = Field(description="this monitor's node id (null without a cluster)")
    active_node: str | None = Field(description="the node holding the lease, as last read (null without a cluster)")


def create_app(monitor: Monitor, api_settings: ApiSettings | None = None) -> FastAPI:
    """The app; `api_settings` default to the demo's: reads open, writes refused, no CORS."""
    api_settings = api_settings or ApiSettings()
    app = FastAPIOffline(
        title="relaybeat",
        summary="Which servers are alive, decided from relayed MQTT heartbeats.",
        version="1",
    )
    app.state.view = view = FleetView(monitor)

    install_error_shape(app)

    last_warned = -DATABASE_WARNING_EVERY_S

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(_: Request, exc: Exception) -> Response:
        """Every route that needs SQL answers 503 while the database is away: no traceback per request."""
        nonlocal last_warned
        now = time.monotonic()
        if now - last_warned >= DATABASE_WARNING_EVERY_S:
            last_warned = now
            log.warning("API: database unavailable, answering 503 (%s)", _first_line(exc))
        response = error_response(503, "database_unavailable", _first_line(exc))
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    install(app, api_settings)
    reads: dict[str, Any] = {} if api_settings.read_open else {
        "dependencies": [Depends(require_read_token)], "responses": READ_REFUSED
    }  # fmt: skip
    with_sql = reads | {"responses": reads.get("responses", {}) | DATABASE_UNAVAILABLE}
    app.include_router(state.router, **reads)
    app.include_router(history.router, **with_sql)
    app.include_router(operations.router, **with_sql)  # its writes need a write token on top
    app.include_router(availability.router, **with_sql)
    app.include_router(quality.router, **with_sql)
    events.install(app, view, **reads)
    metrics.install(app, view, **reads)
    status.install(app, api_settings.status_pages, responses=DATABASE_UNAVAILABLE)  # open: no `reads`
    cluster.install(app, view)  # GET /api/v1/cluster; a standby answers every write with 409

    @app.delete(
        "/api/v1/hosts/{host_id}",
        status_code=204,
        responses={204: {"description": "forgotten; its history stays"}}
        | NOT_FOUND
        | WRITE_REFUSED
        | DATABASE_UNAVAILABLE,
        dependencies=[Depends(require_write_token)],
        tags=["hosts"],
    )
    async def forget_host(view: ViewDep, host_id: str) -> Response:
        """Forget a decommissioned host (it reappears if it beats again). Needs a write token."""
        return Response(status_code=204) if await view.forget_host(host_id) else not_found("host", host_id)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(view: ViewDep) -> Response:
        return json_response(asdict(view.health()))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(document("dashboard.html"))

    return app


def _first_line(exc: Exception) -> str:
    """A database error in one short line (SQLAlchemy appends the SQL and a link on later lines)."""
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
