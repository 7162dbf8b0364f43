"""The benchmarks still run: every scenario at its `--smoke` size, reports with sane values.

These check that the load generators, the real processes and the reports work; they assert no
performance target (that is BENCHMARKS.md's job, measured on purpose, not in CI).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def bench(tmp_path: Path, scenario: str, *extra: str, timeout_s: float = 120) -> dict[str, Any]:
    out = tmp_path / scenario
    done = subprocess.run(
        [sys.executable, "-m", "bench", scenario, "--smoke", "--out", str(out), "--timeout", str(int(timeout_s)),
         *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout_s + 30,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, f"bench {scenario} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "|" in done.stdout  # the printed table
    report: dict[str, Any] = json.loads((out / f"{scenario}.json").read_text())
    assert report["scenario"] == scenario
    assert report["machine"]["cpus"]
    assert list(out.glob("*.png")), "every scenario saves a plot"
    results: dict[str, Any] = report["results"]
    return results


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_fanin_compares_direct_and_relayed_side_by_side(tmp_path: Path) -> None:
    r = bench(tmp_path, "fanin")
    direct, relayed = r["summary"]["direct"], r["summary"]["relayed"]
    assert direct["connections"]["median"] > relayed["connections"]["median"]
    assert r["relayed_upstream_connections"] == [2]  # exactly R relays on the monitor's broker (smoke: R=2)
    for side in (direct, relayed):
        assert positive(side["monitor_msgs_per_s"]["median"])
        assert positive(side["monitor_rss_mb"]["median"])
        assert positive(side["monitor_bytes_per_beat"]["median"])  # the kernel's count on the monitor's socket
        assert side["monitor_cpu_s_per_1000_beats"]["median"] >= 0
        assert side["monitor_cpu_us_per_beat"]["median"] >= 0
    assert relayed["relays_cpu_us_per_beat"]["median"] >= 0
    assert math.isnan(direct["relays_cpu_us_per_beat"]["median"])  # no relays on the direct side
    assert direct["monitor_bytes_per_beat"]["median"] > 40  # a beat's PUBLISH: topic + payload + header
    assert direct["monitor_msgs_per_s"]["median"] > relayed["monitor_msgs_per_s"]["median"]
    if relayed["monitor_cpu_s_per_1000_beats"]["median"] > 0:
        assert math.isfinite(r["ratio_cpu_per_beat"]["median"])
    else:  # at smoke size the relayed monitor can use less CPU than the clock tick (10 ms) resolves
        assert math.isnan(r["ratio_cpu_per_beat"]["median"])
        assert direct["monitor_cpu_s_per_1000_beats"]["median"] > 0


def test_ingest_measures_the_monitor_and_the_raw_ceiling(tmp_path: Path) -> None:
    r = bench(tmp_path, "ingest")
    (size,) = r["summary"]
    assert positive(r["summary"][size]["entries_per_cpu_s"]["median"])
    assert positive(r["micro"][size]["raw: orjson + dict update"]["median"])
    assert positive(r["micro"][size]["Monitor.take (decode + observe)"]["median"])
    assert positive(r["ratio_to_raw"][size])
    assert Path(r["profile"]["html"]).stat().st_size > 1000
    assert "take" in Path(r["profile"]["text"]).read_text()


def test_detector_reports_throughput_expiry_and_memory(tmp_path: Path) -> None:
    r = bench(tmp_path, "detector")
    assert positive(r["observe_entries_per_s"]["median"])
    assert r["expire"]["mass_down_transitions"]["median"] == 2000
    assert r["expire"]["relay_death_transitions"]["median"] == 500 + 1
    will = r["holds"]["500 hosts"]["relay last will: relay down, hosts unreachable"]
    assert will["transitions"]["median"] == 500 + 1
    assert will["calls"]["median"] > 1  # its hosts were decided in steps
    assert positive(r["holds"]["2,000-entry bundle"]["decode (version 2 keyframe)"]["max_ms"]["median"])
    for figures in r["memory"].values():
        # RSS at smoke size depends on what the allocator already holds (2 B/host was seen after other
        # tests): only bounded above; the traced figure is the one that must be real.
        assert figures["rss_bytes_per_host"] < 100_000
        assert 50 < figures["traced_bytes_per_host"] < 100_000


def test_lag_sees_every_killed_leaf_and_both_relay_deaths(tmp_path: Path) -> None:
    r = bench(tmp_path, "lag")
    assert r["missed"] == []
    for group in ("direct", "relayed"):
        lag = r["summary"][group]["lag_ms"]
        assert lag["n"] == 3
        assert -100 < lag["p50"] < 5000
    for how in ("SIGSTOP", "SIGKILL"):
        (death,) = r["relays"][how]
        assert death["relay_state"] == "down"
        assert death["hosts_unreachable_seen"] == death["hosts_up_before"] > 0


def test_api_load_reports_latency_and_rate(tmp_path: Path) -> None:
    r = bench(tmp_path, "api")
    for endpoint in ("host", "page"):
        s = r["summary"][endpoint]
        assert positive(s["req_per_s"]["median"])
        assert s["p50_ms"]["median"] <= s["p99_ms"]["median"]
        assert s["non_2xx"]["median"] == 0
    assert r["page_bytes"] > 1000
    assert positive(r["ingest_taken_entries_per_s"])


def test_persist_writes_the_mass_event_on_sqlite(tmp_path: Path) -> None:
    pg = os.environ.get("RELAYBEAT_TEST_DB_URL")
    databases = ["sqlite", "postgresql"] if pg else ["sqlite"]
    r = bench(tmp_path, "persist", "--databases", *databases, *(["--pg-url", pg] if pg else []))
    for db in databases:
        s = r["summary"][db]
        assert s["transitions_written"]["median"] == 300 + 1
        assert 0 < s["first_queryable_s"]["median"] <= s["all_queryable_s"]["median"] < 60


def test_persist_holds_only_measures_how_long_the_writer_holds_the_loop(tmp_path: Path) -> None:
    pg = os.environ.get("RELAYBEAT_TEST_DB_URL")
    databases = ["sqlite", "postgresql"] if pg else ["sqlite"]
    r = bench(tmp_path, "persist", "--holds-only", "--databases", *databases, *(["--pg-url", pg] if pg else []))
    holds = r["writer_holds"]
    assert len(holds) == len(databases)
    for s in holds.values():
        assert s["transitions"]["median"] == 300 + 1
        assert s["flush_turns"]["median"] > 1
        assert positive(s["flush_hold_max_ms"]["median"])
        assert positive(s["checkpoint_hold_max_ms"]["median"])


def test_auth_reports_the_event_loop_stall_during_logins(tmp_path: Path) -> None:
    r = bench(tmp_path, "auth")
    s = r["5"]
    assert 0 <= s["stall_s"]["median"] < 60
    assert positive(s["all_logins_s"]["median"])


def test_quality_compares_reported_and_true_figures_for_every_timeout_mode(tmp_path: Path) -> None:
    r = bench(tmp_path, "quality")
    runs = r["runs"]
    assert {run["mode"] for run in runs} == {"fixed", "adaptive", "target"}
    for run in runs:
        assert run["true_mistakes"] >= 0
        assert run["reported_mistakes"] <= run["true_mistakes"] + 1  # proofs, never more mistakes than happened
        assert run["timeout_s_mean"] > 0


def test_wire_compares_bytes_per_beat_of_each_format(tmp_path: Path) -> None:
    r = bench(tmp_path, "wire")
    (case,) = r["cases"]
    sizes = {fmt: case[fmt]["bytes_per_beat"]["median"] for fmt in ("v1 json", "v2", "v2 indexed")}
    assert all(positive(size) for size in sizes.values())
    assert sizes["v2 indexed"] < sizes["v2"] < sizes["v1 json"]
    assert all(positive(value["median"]) for value in case["us_per_entry"].values())
    modes = {(d["node"], mode): us["median"] for d in r["decode_modes"] for mode, us in d["us_per_entry"].items()}
    assert sorted(modes) == [(node, mode) for node in ("delta", "keyframe by table") for mode in ("columnar", "list")]
    assert all(positive(us) for us in modes.values())


def test_lag_long_runs_synthetic_relays_at_the_default_interval_and_reports_what_sql_holds(tmp_path: Path) -> None:
    out = tmp_path / "long"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "lag", "--long", "--long-hosts", "300", "--long-relays", "3",
         "--long-duration", "25", "--long-interval", "5", "--out", str(out), "--timeout", "150"],
        cwd=REPO, capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert done.returncode == 0, f"bench lag --long failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    r = json.loads((out / "lag_long.json").read_text())["results"]["long"]
    assert (r["hosts"], r["relays"], r["interval_s"]) == (300, 3, 5)
    assert r["all_up_after_s"] is not None  # every host `up` in SQL by the 10 or 20 s sample
    assert r["unwritten"] == 0  # /healthz answered and the writer had caught up
    assert isinstance(r["false_down"], int)
    assert r["bundles_published"] >= 3 * 20
