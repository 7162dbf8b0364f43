"""The HTTP API: everything it shows comes from the read view (`monitor.view`). OpenAPI at /docs.

Routes only read and shape data; they never decide a state. Each feature is a router in its own
module; this file only assembles them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import availability, events, history, metrics, operations, state
from api.auth import READ_REFUSED, WRITE_REFUSED, ApiSettings, install, require_read_token, require_write_token
from api.bodies import NOT_FOUND, ViewDep, json_response, not_found
from monitor.service import Monitor
from monitor.view import FleetView

DASHBOARD = Path(__file__).with_name("dashboard.html")


class Health(BaseModel):
    status: str = Field(description="ok, or degraded while the monitor cannot see (then nothing turns down)")
    broker_connected: bool
    blind: bool
    in_grace: bool
    database_ok: bool
    hosts: int
    relays: int
    received: dict[str, int]
    rejected: dict[str, int]


def create_app(monitor: Monitor, api_settings: ApiSettings | None = None) -> FastAPI:
    """The app; `api_settings` default to the demo's: reads open, writes refused, no CORS."""
    api_settings = api_settings or ApiSettings()
    app = FastAPI(
        title="relaybeat",
        summary="Which servers are alive, decided from relayed MQTT heartbeats.",
        version="1",
    )
    app.state.view = view = FleetView(monitor)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code)

    install(app, api_settings)
    reads: dict[str, Any] = {} if api_settings.read_open else {
        "dependencies": [Depends(require_read_token)], "responses": READ_REFUSED
    }  # fmt: skip
    app.include_router(state.router, **reads)
    app.include_router(history.router, **reads)
    app.include_router(operations.router, **reads)  # its writes need a write token on top
    app.include_router(availability.router, **reads)
    events.install(app, view, **reads)
    metrics.install(app, view, **reads)

    @app.delete(
        "/api/v1/hosts/{host_id}",
        status_code=204,
        responses={204: {"description": "forgotten; its history stays"}} | NOT_FOUND | WRITE_REFUSED,
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
        return HTMLResponse(DASHBOARD.read_text())

    return app
