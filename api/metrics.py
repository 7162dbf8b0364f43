"""Prometheus metrics at `GET /metrics`, from a registry of the app's own (never the global one).

Two sources: gauges and counters are read from the read view (`monitor.view`: states as shown,
health) at scrape time (`LiveCollector`); what only exists at the moment it happens (detection lag,
write latency) is observed through the monitor's `MonitorObserver` hook into histograms.
`docs/grafana-dashboard.json` uses these names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from relaybeat.monitor.quality import FalseAlarm, Opening
from relaybeat.monitor.states import Event, Kind, State, Transition
from relaybeat.monitor.view import FleetView

router = APIRouter()

STATES: dict[Kind, tuple[State, ...]] = {Kind.HOST: tuple(State), Kind.RELAY: tuple(State)}
# Decision lag is small when all is well (≤ one relay flush); the tail shows a loaded monitor.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# Detection time: last evidence of life to decision; about one timeout (seconds to minutes).
DETECTION_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0)
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DecisionMetrics:
    """The monitor's observer: decisions and SQL writes, as they happen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        counter = functools.partial(Counter, registry=registry)
        histogram = functools.partial(Histogram, registry=registry)
        self.transitions = counter(
            "relaybeat_transitions", "State changes decided, by kind and new state.", ["kind", "to"]
        )
        self.detection_lag = histogram(
            "relaybeat_detection_lag_seconds",
            "Decision time minus deadline, for up→down and up→unreachable transitions.",
            ["kind", "to"],
            buckets=LAG_BUCKETS,
        )
        self.write_latency = histogram(
            "relaybeat_database_write_seconds",
            "Duration of one SQL transaction writing a batch of transitions.",
            buckets=WRITE_BUCKETS,
        )
        self.false_alarms = counter(
            "relaybeat_false_alarms",
            "Outages (down or unreachable) proved false alarms by the evidence that ended them, by proof.",
            ["kind", "proof"],
        )
        self.detection_time = histogram(
            "relaybeat_detection_seconds",
            "Last evidence of life to the decision, for every outage opened (not hosts made unreachable).",
            ["kind", "to"],
            buckets=DETECTION_BUCKETS,
        )
        self.written_rows = counter("relaybeat_database_written_transitions", "Transition rows written to SQL.")

    def decided(self, transitions: Sequence[Transition], now: float) -> None:
        for t in transitions:
            if t.event is not Event.TRANSITION:
                continue
            self.transitions.labels(t.kind.value, t.to_state.value).inc()
            # Only from `up`: other ways into down (first news already old, path back with an old
            # age) date the death from evidence that arrived late, which is not detection lag.
            if t.from_state is State.UP and t.to_state in (State.DOWN, State.UNREACHABLE):
                self.detection_lag.labels(t.kind.value, t.to_state.value).observe(max(0.0, now - t.at))

    def judged(self, opened: Sequence[Opening], false_alarms: Sequence[FalseAlarm]) -> None:
        for o in opened:
            if o.detection_s is not None and not (o.kind is Kind.HOST and o.state is State.UNREACHABLE):
                self.detection_time.labels(o.kind.value, o.state.value).observe(o.detection_s)
        for f in false_alarms:
            self.false_alarms.labels(f.kind.value, f.proof.value).inc()

    def wrote(self, rows: int, seconds: float) -> None:
        self.write_latency.observe(seconds)
        self.written_rows.inc(rows)


class LiveCollector:
    """What the view shows right now, read at each scrape."""

    def __init__(self, app: FastAPI, view: FleetView) -> None:
        self.app = app
        self.view = view

    def collect(self) -> Iterable[Metric]:
        view = self.view
        health = view.health()

        subjects = GaugeMetricFamily(
            "relaybeat_subjects", "Hosts and relays by current state.", labels=["kind", "state"]
        )
        flapping = GaugeMetricFamily("relaybeat_flapping", "Subjects flagged flapping.", labels=["kind"])
        for kind in (Kind.HOST, Kind.RELAY):
            counts = view.counts(kind)
            for state in STATES[kind]:
                subjects.add_metric([kind.value, state.value], counts.states[state])
            flapping.add_metric([kind.value], counts.flapping)
        yield subjects
        yield flapping

        received = health.received
        yield CounterMetricFamily(
            "relaybeat_bundles_received", "Bundles accepted from relays.", received.get("bundles", 0)
        )
        beats = CounterMetricFamily(
            "relaybeat_beats_received", "Host entries received: inside bundles, or beats sent straight.", labels=["via"]
        )
        beats.add_metric(["bundle"], received.get("bundle_entries", 0))
        beats.add_metric(["direct"], received.get("beats", 0))
        yield beats
        yield CounterMetricFamily(
            "relaybeat_relay_wills_received",
            "Relay `offline` statuses (last wills) received.",
            received.get("relay_offline", 0),
        )
        yield CounterMetricFamily(
            "relaybeat_relay_stops_received",
            "Relay `stopped` statuses (clean stops: no page) received.",
            received.get("relay_stopped", 0),
        )
        rejected = CounterMetricFamily(
            "relaybeat_rejected_inputs", "Inputs rejected or ignored, by reason.", labels=["reason"]
        )
        for reason, count in health.rejected.items():
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "relaybeat_monitor_spare_takeovers",
            "Times the spare broker session heard in place of the lost main one.",
            health.spare_takeovers,
        )
        yield CounterMetricFamily(
            "relaybeat_database_write_failures", "Failed SQL writes (each retried).", view.write_failures
        )

        flags = {
            "relaybeat_monitor_blind": (
                "1 while the monitor cannot see (no broker, or relays all silent).",
                health.blind,
            ),
            "relaybeat_monitor_degraded": (
                "1 while /healthz says degraded (blind, database away or a part not running).",
                health.status != "ok",
            ),
            "relaybeat_broker_connected": (
                "1 while the monitor's broker session (or its spare) is up.",
                health.broker_connected,
            ),
            "relaybeat_database_ok": ("1 while the database answers and took the last write.", health.database_ok),
            "relaybeat_monitor_in_grace": ("1 during the grace after start or regaining sight.", health.in_grace),
        }
        for name, (doc, value) in flags.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield GaugeMetricFamily(
            "relaybeat_event_loop_lag_seconds", "Worst event-loop lag of the last 5 s.", value=view.loop_lag_s
        )
        yield GaugeMetricFamily(
            "relaybeat_decisions_unwritten", "Decisions made (and journaled), not yet in SQL.", value=health.unwritten
        )
        hub = getattr(self.app.state, "events", None)
        clients = 0 if hub is None else len(hub.subscribers)
        yield GaugeMetricFamily("relaybeat_event_stream_clients", "Open /api/v1/events streams.", value=clients)
        yield CounterMetricFamily(
            "relaybeat_event_stream_overflows",
            "Times a stream fell a whole buffer behind and re-read from SQL.",
            0 if hub is None else hub.overflows,
        )


def install(app: FastAPI, view: FleetView, **include: Any) -> CollectorRegistry:
    """Give `app` its own registry, fed by `view`, served at `/metrics` (`include`: router options)."""
    registry = CollectorRegistry()
    view.observe(DecisionMetrics(registry))
    registry.register(LiveCollector(app, view))
    app.state.metrics = registry
    app.include_router(router, **include)
    return registry


@router.get("/metrics", tags=["service"], response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text format: subjects per state, inputs, rejections, detection lag, SQL and loop latency."""
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
