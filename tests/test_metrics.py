"""`GET /metrics`: Prometheus text from a registry of the app's own, against a real monitor and store."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relaybeat.api.app import create_app
from tests.monitors import Served, until

DASHBOARD_JSON = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_subjects_per_state_inputs_and_rejections_are_exported(served: Served) -> None:
    await served.feed.up("a", "b", "c")
    await served.feed.down("a")
    served.monitor.take("relaybeat/bundle/r1", b"{not json")
    served.monitor.take("relaybeat/bundle/r2", b'{"v":1}')
    samples = await scrape(served.url)
    assert value(samples, "relaybeat_subjects", kind="host", state="up") == 2
    assert value(samples, "relaybeat_subjects", kind="host", state="down") == 1
    assert value(samples, "relaybeat_subjects", kind="host", state="unreachable") == 0  # every state, even empty
    assert value(samples, "relaybeat_subjects", kind="relay", state="up") == 1
    assert value(samples, "relaybeat_subjects", kind="relay", state="stopped") == 0  # relays stop cleanly too
    assert value(samples, "relaybeat_bundles_received_total") == 2
    assert value(samples, "relaybeat_beats_received_total", via="bundle") == 6  # 3 + 3 entries
    assert value(samples, "relaybeat_beats_received_total", via="direct") == 0
    assert value(samples, "relaybeat_rejected_inputs_total", reason="bad_json") == 1
    assert sum(v for (name, _), v in samples.items() if name == "relaybeat_rejected_inputs_total") == 2
    assert value(samples, "relaybeat_transitions_total", kind="host", to="down") == 1
    assert value(samples, "relaybeat_database_ok") == 1
    assert value(samples, "relaybeat_monitor_degraded") == 0


async def test_detection_lag_is_decision_time_minus_deadline(served: Served) -> None:
    await served.feed.up("a", "b")  # at t=1000: a's deadline is 1000 + 1 s × 3
    await served.feed.down("a")  # decided at t=1010, when r1's bundle says a is 10 s quiet
    samples = await scrape(served.url)
    lag = {"kind": "host", "to": "down"}
    assert value(samples, "relaybeat_detection_lag_seconds_count", **lag) == 1
    assert value(samples, "relaybeat_detection_lag_seconds_sum", **lag) == pytest.approx(7.0)
    assert value(samples, "relaybeat_detection_lag_seconds_bucket", le="5.0", **lag) == 0
    assert value(samples, "relaybeat_detection_lag_seconds_bucket", le="10.0", **lag) == 1


async def test_a_relay_will_gives_unreachable_lag_and_first_sightings_give_none(served: Served) -> None:
    await served.feed.up("a", "b")
    served.monitor.take("relaybeat/relay/r1/status", b"offline")  # decided at once: lag 0
    await served.monitor.flush()
    samples = await scrape(served.url)
    assert value(samples, "relaybeat_detection_lag_seconds_count", kind="host", to="unreachable") == 2
    assert value(samples, "relaybeat_detection_lag_seconds_sum", kind="host", to="unreachable") == 0
    assert value(samples, "relaybeat_detection_lag_seconds_count", kind="relay", to="down") == 1
    assert value(samples, "relaybeat_relay_wills_received_total") == 1
    assert ("relaybeat_detection_lag_seconds_count", frozenset({("kind", "host"), ("to", "up")})) not in samples


async def test_a_relay_stop_is_counted_and_makes_nobody_unreachable(served: Served) -> None:
    await served.feed.up("a", "b")
    served.monitor.take("relaybeat/relay/r1/status", b"stopped")
    await served.monitor.flush()
    samples = await scrape(served.url)
    assert value(samples, "relaybeat_relay_stops_received_total") == 1
    assert value(samples, "relaybeat_relay_wills_received_total") == 0
    assert value(samples, "relaybeat_subjects", kind="relay", state="stopped") == 1
    assert value(samples, "relaybeat_subjects", kind="host", state="up") == 2


async def test_database_write_latency_is_observed_per_batch(served: Served) -> None:
    for n in range(3):
        await served.feed.up(f"h{n}")
    samples = await scrape(served.url)
    assert value(samples, "relaybeat_database_write_seconds_count") == 3
    assert 0 < value(samples, "relaybeat_database_write_seconds_sum") < 30
    assert value(samples, "relaybeat_database_written_transitions_total") == 4  # r1, h0, h1, h2
    assert value(samples, "relaybeat_database_write_failures_total") == 0


async def test_blind_monitor_shows_as_blind_and_degraded(served: Served) -> None:
    await served.feed.up("a")
    served.monitor.detector.set_connected(False, served.feed.clock.now())
    samples = await scrape(served.url)
    assert value(samples, "relaybeat_monitor_blind") == 1
    assert value(samples, "relaybeat_monitor_degraded") == 1
    assert value(samples, "relaybeat_broker_connected") == 0


async def test_event_loop_lag_gauge_shows_a_blocked_loop(served: Served) -> None:
    probe = asyncio.create_task(served.monitor.watch_loop_lag(every_s=0.05))
    try:
        await asyncio.sleep(0.1)
        time.sleep(0.4)  # noqa: ASYNC251 -- on purpose: block the loop, as a slow synchronous call would
        await until(lambda: served.monitor.loop_lag_s >= 0.3, what="the probe to notice")
        samples = await scrape(served.url)
    finally:
        probe.cancel()
    assert value(samples, "relaybeat_event_loop_lag_seconds") >= 0.3


async def test_each_app_has_its_own_registry_and_the_global_one_stays_clean(served: Served) -> None:
    second = create_app(served.monitor)  # a second app on the same monitor registers without clashing
    assert second.state.metrics is not served.app.state.metrics
    await served.feed.up("a")
    transport = httpx.ASGITransport(app=second)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        text = (await client.get("/metrics")).text
    assert 'relaybeat_subjects{kind="host",state="up"} 1.0' in text
    assert "relaybeat_" not in generate_latest(REGISTRY).decode()


async def test_grafana_dashboard_uses_only_metrics_that_exist(served: Served) -> None:
    await served.feed.up("a", "b")
    await served.feed.down("a")
    served.monitor.take("relaybeat/bundle/r1", b"{not json")  # reasons appear once counted
    names = {name for name, _ in await scrape(served.url)}
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\brelaybeat_[a-z_]+", e)}
    assert len(exprs) >= 10
    assert used
    assert used <= names, f"not exported: {sorted(used - names)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"]
    assert dashboard["title"]
