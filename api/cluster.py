"""The cluster of monitors on one database: `GET /api/v1/cluster`, and writes refused by a standby.

A hot standby serves every read; a write sent to it (any POST, PUT, PATCH or DELETE under /api/)
gets `409 {"error": "not_active", "detail": ..., "active": NODE, "active_api": URL}` naming the
active monitor, so a client can retry there. A write that finds the lease gone mid-way (a takeover
just happened) gets the same answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from relaybeat.api.bodies import ViewDep, json_response
from relaybeat.monitor.store import NotActive
from relaybeat.monitor.view import FleetView, Standby, iso

router = APIRouter(prefix="/api/v1")

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class NodeOut(BaseModel):
    node: str
    role: str = Field(description="active, standby, or stopped (as the node last reported)")
    epoch: int | None = Field(description="the lease epoch it holds, while active")
    api: str | None = Field(description="where its HTTP API listens, as it reported")
    started_at: str
    last_seen: str = Field(description="its last lease tick (the database's clock)")
    holds_lease: bool = Field(description="it holds the lease now (and it has not expired)")


class ClusterOut(BaseModel):
    node: str | None = Field(description="this monitor's node id; null without a cluster (SQLite)")
    role: str = Field(description="this monitor's role: active or standby")
    epoch: int | None
    active_node: str | None = Field(description="the node holding the lease, as this monitor last read it")
    active_api: str | None
    last_renewal: str | None = Field(description="when the lease was last renewed (the database's clock)")
    failover_s: float | None
    nodes: list[NodeOut]


def _iso(moment: datetime | None) -> str | None:
    return iso(moment)


@router.get("/cluster", response_model=ClusterOut, tags=["service"])
async def cluster(view: ViewDep) -> Response:
    """Every monitor of this database with its role, lease epoch and last renewal."""
    c = await view.cluster()
    return json_response(
        {
            "node": c.node,
            "role": c.role,
            "epoch": c.epoch,
            "active_node": c.active_node,
            "active_api": c.active_api,
            "last_renewal": _iso(c.last_renewal),
            "failover_s": c.failover_s,
            "nodes": [
                {
                    "node": n.node,
                    "role": n.role,
                    "epoch": n.epoch,
                    "api": n.api,
                    "started_at": _iso(n.started_at),
                    "last_seen": _iso(n.last_seen),
                    "holds_lease": n.holds_lease,
                }
                for n in c.nodes
            ],
        }
    )


def _refusal(standby: Standby) -> Response:
    body = {"error": "not_active", "detail": standby.detail, "active": standby.active, "active_api": standby.active_api}
    return json_response(body, 409)


def install(app: FastAPI, view: FleetView) -> None:
    """The cluster route, and a standby's 409 for every write."""
    app.include_router(router)

    @app.middleware("http")
    async def standby_refuses_writes(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.method in WRITE_METHODS and request.url.path.startswith("/api/"):
            standby = view.not_active()
            if standby is not None:
                return _refusal(standby)
        return await call_next(request)

    @app.exception_handler(NotActive)
    async def lost_the_lease(_: Request, exc: NotActive) -> Response:
        return _refusal(view.not_active(str(exc)) or Standby(detail=str(exc), active=None, active_api=None))
