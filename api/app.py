"""The HTTP API: current state from the live detector, history from SQL. OpenAPI at /docs.

Routes only read and shape data; they never decide a state. Each feature is a router in its own
module; this file only assembles them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import availability, events, history, metrics, operations, state
from api.auth import READ_REFUSED, WRITE_REFUSED, ApiSettings, install, require_read_token, require_write_token
from api.bodies import NOT_FOUND, json_response, monitor_of, not_found
from monitor.service import Monitor

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
    app.state.monitor = monitor

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
    events.install(app, monitor, **reads)
    metrics.install(app, monitor, **reads)

    @app.delete(
        "/api/v1/hosts/{host_id}",
        status_code=204,
        responses={204: {"description": "forgotten; its history stays"}} | NOT_FOUND | WRITE_REFUSED,
        dependencies=[Depends(require_write_token)],
        tags=["hosts"],
    )
    async def forget_host(monitor: Annotated[Monitor, Depends(monitor_of)], host_id: str) -> Response:
        """Forget a decommissioned host (it reappears if it beats again). Needs a write token."""
        in_memory = monitor.forget_host(host_id)
        in_sql = await monitor.store.forget_host(host_id)
        return Response(status_code=204) if in_memory or in_sql else not_found("host", host_id)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(monitor: Annotated[Monitor, Depends(monitor_of)]) -> Response:
        detector = monitor.detector
        blind = detector.blind
        return json_response(
            {
                "status": "degraded" if blind or not monitor.db_ok else "ok",
                "broker_connected": not detector.disconnected,
                "blind": blind,
                "in_grace": monitor.in_grace,
                "database_ok": monitor.db_ok,
                "hosts": len(detector.hosts),
                "relays": len(detector.relays),
                "received": dict(monitor.received),
                "rejected": dict(monitor.rejections.counts) | {f"detector_{k}": v for k, v in detector.ignored.items()},
            }
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text())

    return app
