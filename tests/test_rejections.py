"""Bad input gets a reason, a count and one rate-limited warning; nothing raises and nothing held is lost.

A real Monitor (SQLite store, fed through its own `take`) and a real RelayService (its `take`,
constructed but never run) get every kind of bad input twice. Each is counted under its reason
(the monitor's counts are read back from GET /healthz), warned about once per reason per interval,
and the valid state they held before is exactly the state they hold after.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import relaybeat.relay.rejections
from relaybeat.api.app import create_app
from relaybeat.config import load_config
from relaybeat.monitor.service import Monitor
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.service import RelayService
from relaybeat.relay.wire import MAX_AGE_MS, Beat, Bundle, HostEntry, LeafStatus, encode_beat, encode_bundle
from tests.fakes import FakeClock

OK = LeafStatus.OK
MONITOR_MAX_BYTES = 4 * 1024 * 1024
MONITOR_MAX_ENTRIES = 100_000
RELAY_MAX_BYTES = 64 * 1024


def body(relay: str = "r1", boot: str = "boot1", seq: object = 1, hosts: Any = None, **extra: Any) -> dict[str, Any]:
    hosts = [["web-1", 1, 0, 1000, "ok"]] if hosts is None else hosts
    return {"v": 1, "relay": relay, "boot": boot, "seq": seq, "flush_ms": 1000, "hosts": hosts} | extra


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()  # the stdlib's: it writes integers of any size


def entry(*fields: Any) -> bytes:
    """A bundle for r1 whose only host entry is `fields`."""
    return raw(body(seq=99, hosts=[list(fields)]))


def nested(depth: int) -> dict[str, Any]:
    child: dict[str, Any] = body(relay=f"deep{depth}", hosts=[]) | {"age_ms": 0}
    for level in range(depth - 1, 0, -1):
        child = body(relay=f"deep{level}", hosts=[], children=[child]) | {"age_ms": 0}
    return body(seq=99, hosts=[], children=[child])


def many_hosts(relay: str, count: int, seq: int = 1) -> bytes:
    entries = tuple(HostEntry(f"h{i:06d}", 1, 0, 1000, OK) for i in range(count))
    return encode_bundle(Bundle(relay, "boot1", seq, 1000, entries))


BUNDLE = "relaybeat/bundle/r1"
BEAT = "relaybeat/beat/web-9"

# (topic, payload, reason) for the monitor: every row is fed twice.
MONITOR_BAD: list[tuple[str, bytes, str]] = [
    # malformed JSON, and numbers JSON cannot carry
    (BUNDLE, b"{not json", "bad_json"),
    (BUNDLE, b"", "bad_json"),
    (BUNDLE, b'{"v":1,"relay":"r1","hosts":[["web-1",1,NaN,1000,"ok"]]}', "bad_json"),
    (BUNDLE, b'{"v":1,"relay":"r1","hosts":[["web-1",1,1e400,1000,"ok"]]}', "bad_json"),
    (BUNDLE, b"\xff\xfe\x00", "bad_json"),
    # wrong types and shapes
    (BUNDLE, raw([1, 2, 3]), "bad_bundle"),
    (BUNDLE, raw(body(hosts="web-1")), "bad_bundle"),
    (BUNDLE, raw({"v": 1, "relay": "r1"}), "bad_bundle"),
    (BUNDLE, raw(body(seq="7")), "bad_seq"),
    (BUNDLE, raw(body(seq=-1)), "bad_seq"),
    (BUNDLE, raw(body(seq=True)), "bad_seq"),
    (BUNDLE, entry("web-1", 1, 0, 1000), "bad_entry"),
    (BUNDLE, raw(body(hosts=[{"id": "web-1"}])), "bad_entry"),
    (BUNDLE, entry("web-1", 1, 0, 1000, "sleeping"), "bad_status"),
    # unknown versions
    (BUNDLE, raw(body() | {"v": 2}), "unknown_version"),
    (BUNDLE, raw({k: v for k, v in body().items() if k != "v"}), "unknown_version"),
    (BUNDLE, raw(body() | {"v": "1"}), "unknown_version"),
    # invalid ids
    (BUNDLE, entry("web 1", 1, 0, 1000, "ok"), "bad_id"),
    (BUNDLE, entry("x" * 129, 1, 0, 1000, "ok"), "bad_id"),
    (BUNDLE, entry(None, 1, 0, 1000, "ok"), "bad_id"),
    (BUNDLE, raw(body(relay="r/1")), "bad_id"),
    (BUNDLE, raw(body(boot="")), "bad_boot"),
    # negative, fractional and huge ages; bad intervals
    (BUNDLE, entry("web-1", 1, -5, 1000, "ok"), "bad_age"),
    (BUNDLE, entry("web-1", 1, 1.5, 1000, "ok"), "bad_age"),
    (BUNDLE, entry("web-1", 1, MAX_AGE_MS + 1, 1000, "ok"), "bad_age"),
    (BUNDLE, entry("web-1", 1, 10**30, 1000, "ok"), "bad_age"),
    (BUNDLE, entry("web-1", 1, 0, -1000, "ok"), "bad_interval"),
    (BUNDLE, entry("web-1", 1, 0, 0, "ok"), "bad_interval"),
    (BUNDLE, entry("web-1", 1, 0, 10**12, "ok"), "bad_interval"),
    (BUNDLE, raw(body(flush_ms=5)), "bad_interval"),
    (BUNDLE, raw(body(children=[body(relay="c1", hosts=[]) | {"age_ms": -1}])), "bad_age"),
    (BUNDLE, raw(body(children=[body(relay="c1", hosts=[])])), "bad_bundle"),  # child without age_ms
    # oversized, too many entries, too deep
    (BUNDLE, b" " * (MONITOR_MAX_BYTES + 1), "too_large"),
    (BUNDLE, many_hosts("r1", MONITOR_MAX_ENTRIES + 1, seq=99), "too_many_entries"),
    (BUNDLE, raw(nested(17)), "too_deep"),
    # a bundle on the wrong relay's topic
    ("relaybeat/bundle/r2", raw(body(relay="r1", seq=99)), "relay_mismatch"),
    # bad topics
    ("relaybeat/beat/web 9", b"", "bad_topic"),
    ("relaybeat/beat/a/b", b"", "bad_topic"),
    ("relaybeat/beat/", b"", "bad_topic"),
    ("elsewhere/beat/web-9", b"", "bad_topic"),
    ("relaybeat/bundle/" + "r" * 129, raw(body()), "bad_topic"),
    ("relaybeat/relay/r1/state", b"online", "bad_topic"),
    # bad beats straight to the monitor's broker, and a bad relay status
    (BEAT, b"{", "bad_json"),
    (BEAT, b"[1]", "bad_beat"),
    (BEAT, raw({"seq": -1}), "bad_seq"),
    (BEAT, raw({"interval": -1}), "bad_interval"),
    (BEAT, raw({"interval": 1e9}), "bad_interval"),
    (BEAT, raw({"interval": "NaN"}), "bad_interval"),
    (BEAT, raw({"status": "dead"}), "bad_status"),
    (BEAT, raw({"meta": "x"}), "bad_meta"),
    (BEAT, raw({"meta": {"blob": "x" * 2000}}), "bad_meta"),
    (BEAT, b"{" + b" " * 5000 + b"}", "too_large"),
    ("relaybeat/relay/r1/status", b"maybe", "bad_status"),
]


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    """A monitor whose limits come from a deployment file, holding r1 (web-1, web-2) and r2 (db-1)."""
    config_file = tmp_path / "relaybeat.toml"
    config_file.write_text(
        f"[monitor]\nbroker = 'mqtt://127.0.0.1:1'\n"
        f"max_bundle_bytes = {MONITOR_MAX_BYTES}\nmax_bundle_entries = {MONITOR_MAX_ENTRIES}\n"
    )
    config = load_config(config_file)
    store = await Store.open(f"sqlite:///{tmp_path / 'rejections.db'}")
    await store.upgrade()
    running = Monitor(config.monitor.settings(config.detector.policy()), store, FakeClock())
    running.take(BUNDLE, raw(body(seq=5, hosts=[["web-1", 7, 0, 1000, "ok"], ["web-2", 3, 200, 1000, "ok"]])))
    running.take("relaybeat/bundle/r2", raw(body(relay="r2", boot="b2", seq=1, hosts=[["db-1", None, 0, 2000, "ok"]])))
    assert not running.rejections.counts
    assert not running.detector.ignored
    yield running
    await store.close()


def held(monitor: Monitor) -> dict[str, Any]:
    """Everything the detector holds about each subject, as plain values."""
    hosts = {
        h.id: (h.state, h.since, h.last_seen, h.via, h.interval_s, h.seq, h.flapping)
        for h in monitor.detector.hosts.values()
    }
    relays = {
        r.id: (r.state, r.since, r.last_seen, r.parent, r.boot, r.seq, r.flush_s, sorted(r.hosts))
        for r in monitor.detector.relays.values()
    }
    return {"hosts": hosts, "relays": relays}


def warnings_by_reason(caplog: pytest.LogCaptureFixture, logger: str) -> Counter[str]:
    return Counter(
        str(r.args[0])
        for r in caplog.records
        if r.name == logger and r.levelno == logging.WARNING and isinstance(r.args, tuple)
    )


async def healthz(monitor: Monitor) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=create_app(monitor))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def test_monitor_counts_and_warns_once_per_reason_and_keeps_what_it_held(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="relaybeat.monitor")
    clock = monitor.clock
    assert isinstance(clock, FakeClock)
    before = held(monitor)
    clock.t += 0.5  # had any bad input been taken as evidence, last_seen would move
    stale = [
        (BUNDLE, raw(body(seq=5, hosts=[["web-1", 8, 0, 1000, "ok"]])), "detector_stale_bundle"),  # repeated
        (BUNDLE, raw(body(seq=4, hosts=[["web-1", 9, 0, 1000, "stopping"]])), "detector_stale_bundle"),  # older
    ]
    expected: Counter[str] = Counter()
    for _ in range(2):
        for topic, payload, reason in [*MONITOR_BAD, *stale]:
            monitor.take(topic, payload)  # never raises
            expected[reason] += 1

    assert held(monitor) == before
    health = await healthz(monitor)
    assert health["rejected"] == dict(expected)
    assert health["status"] == "ok"
    assert health["hosts"] == 3
    assert health["relays"] == 2
    warned = warnings_by_reason(caplog, "relaybeat.monitor")
    assert warned == Counter(dict.fromkeys(expected, 1))  # each reason once within the interval

    # ... and the monitor still takes good input afterwards.
    monitor.take(BUNDLE, raw(body(seq=6, hosts=[["web-1", 8, 0, 1000, "ok"]])))
    assert monitor.detector.hosts["web-1"].seq == 8
    assert monitor.detector.hosts["web-1"].last_seen == clock.t


async def test_a_replaced_boot_is_ignored_by_the_detector(monitor: Monitor, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relaybeat.monitor")
    monitor.take(BUNDLE, raw(body(boot="boot2", seq=1)))  # r1 restarted: boot1 is retired
    before = held(monitor)
    monitor.take(BUNDLE, raw(body(boot="boot1", seq=6)))  # a late bundle from the old boot
    assert held(monitor) == before
    assert (await healthz(monitor))["rejected"] == {"detector_retired_boot": 1}
    assert warnings_by_reason(caplog, "relaybeat.monitor") == {"detector_retired_boot": 1}


async def test_100k_entries_over_the_limit_are_refused_and_at_the_limit_tracked(monitor: Monitor) -> None:
    over = many_hosts("big", MONITOR_MAX_ENTRIES + 1)
    assert len(over) < MONITOR_MAX_BYTES  # refused for its entries, not its size
    monitor.take("relaybeat/bundle/big", over)
    assert "big" not in monitor.detector.relays
    assert len(monitor.detector.hosts) == 3
    monitor.take("relaybeat/bundle/big", many_hosts("big", MONITOR_MAX_ENTRIES))
    assert len(monitor.detector.hosts) == 3 + MONITOR_MAX_ENTRIES
    assert len(monitor.detector.relays["big"].hosts) == MONITOR_MAX_ENTRIES
    health = await healthz(monitor)
    assert health["rejected"] == {"too_many_entries": 1}
    assert health["received"]["bundle_entries"] == 3 + MONITOR_MAX_ENTRIES


def test_warnings_come_again_after_the_interval(
    monitor: Monitor, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class FakeTime:
        t = 0.0

        def monotonic(self) -> float:
            return self.t

    fake = FakeTime()
    monkeypatch.setattr(relaybeat.relay.rejections, "time", fake)
    monitor.ingest.rejections = relaybeat.relay.rejections.Rejections(
        logging.getLogger("relaybeat.monitor"), every_s=10.0
    )
    caplog.set_level(logging.WARNING, logger="relaybeat.monitor")
    for fake.t in (100.0, 101.0, 109.9, 110.0, 115.0, 120.5):
        monitor.take(BUNDLE, b"{not json")
    assert monitor.rejections.counts["bad_json"] == 6
    assert warnings_by_reason(caplog, "relaybeat.monitor") == {"bad_json": 3}  # at 100, 110 and 120.5


# ------------------------------------------------------------------------------------------ relay

CHILD = "relaybeat/bundle/r2"

# (topic, payload, reason) for the relay: beats from leaves and bundles from a child relay r2.
RELAY_BAD: list[tuple[str, bytes, str]] = [
    ("relaybeat/beat/web-1", b"{", "bad_json"),
    ("relaybeat/beat/web-1", b'{"interval": NaN}', "bad_json"),
    ("relaybeat/beat/web-1", b"[]", "bad_beat"),
    ("relaybeat/beat/web-1", b'"ok"', "bad_beat"),
    ("relaybeat/beat/web-1", raw({"seq": "1"}), "bad_seq"),
    ("relaybeat/beat/web-1", raw({"seq": -3}), "bad_seq"),
    ("relaybeat/beat/web-1", raw({"seq": 2**63}), "bad_seq"),
    ("relaybeat/beat/web-1", raw({"interval": -5}), "bad_interval"),
    ("relaybeat/beat/web-1", raw({"interval": 0.001}), "bad_interval"),
    ("relaybeat/beat/web-1", raw({"interval": 86_401}), "bad_interval"),
    ("relaybeat/beat/web-1", raw({"interval": [5]}), "bad_interval"),
    ("relaybeat/beat/web-1", raw({"status": "down"}), "bad_status"),
    ("relaybeat/beat/web-1", raw({"meta": [1]}), "bad_meta"),
    ("relaybeat/beat/web-1", b" " * 4097 + b"{}", "too_large"),
    ("relaybeat/beat/web 1", b"", "bad_topic"),
    ("relaybeat/beat/" + "w" * 129, b"", "bad_topic"),
    ("relaybeat/beat/web-1/extra", b"", "bad_topic"),
    ("relaybeat/heartbeat/web-1", b"", "bad_topic"),
    ("other/beat/web-1", b"", "bad_topic"),
    (CHILD, b"nope", "bad_json"),
    (CHILD, raw(body(relay="r2", boot="c", seq=9) | {"v": 9}), "unknown_version"),
    (CHILD, raw(body(relay="r2", boot="c", seq=9, hosts=[["db-1", 1, -1, 1000, "ok"]])), "bad_age"),
    (CHILD, raw(body(relay="r2", boot="c", seq=9, hosts=[["db 1", 1, 0, 1000, "ok"]])), "bad_id"),
    (CHILD, raw(body(relay="r2", boot="c", seq=9, hosts=None, flush_ms=-1)), "bad_interval"),
    (CHILD, raw(body(relay="r2", boot="c", seq=9, hosts=7)), "bad_bundle"),
    (CHILD, b" " * (RELAY_MAX_BYTES + 1), "too_large"),
    (CHILD, raw(body(relay="r3", boot="c", seq=9)), "relay_mismatch"),  # r3's bundle on r2's topic
    (CHILD, raw(body(relay="r2", boot="c", seq=2)), "stale_bundle"),  # repeated seq
    (CHILD, raw(body(relay="r2", boot="c", seq=1, hosts=[])), "stale_bundle"),  # older seq
]


def test_relay_counts_and_warns_once_per_reason_and_keeps_what_it_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_file = tmp_path / "relaybeat.toml"
    config_file.write_text(f"[relay]\nmax_bundle_bytes = {RELAY_MAX_BYTES}\nchildren = true\n")
    settings = load_config(config_file).relay.settings("r1", BrokerURL.parse("mqtt://127.0.0.1:1"))
    assert settings.max_bundle_bytes == RELAY_MAX_BYTES
    now = [50.0]
    service = RelayService(settings, clock=lambda: now[0])
    service.take("relaybeat/beat/web-1", encode_beat(Beat(seq=4, interval_s=1.0)))
    service.take("relaybeat/beat/web-2", b"")
    service.take(CHILD, raw(body(relay="r2", boot="c", seq=2, hosts=[["db-1", 1, 0, 1000, "ok"]])))
    assert not service.rejections.counts
    first = service.assembler.flush(now[0])
    caplog.set_level(logging.WARNING, logger="relaybeat.relay")

    now[0] += 1.0  # had any bad beat been taken, its age in the next bundle would be 0
    expected: Counter[str] = Counter()
    for _ in range(2):
        for topic, payload, reason in RELAY_BAD:
            service.take(topic, payload)  # never raises
            expected[reason] += 1

    assert service.rejections.counts == expected
    assert warnings_by_reason(caplog, "relaybeat.relay") == Counter(dict.fromkeys(expected, 1))
    service.assembler.request_keyframe()  # everything it holds, not just news (none: all was bad)
    after = service.assembler.flush(now[0])
    assert [(h.id, h.seq, h.age_ms, h.interval_ms, h.status) for h in after.hosts] == [
        (h.id, h.seq, h.age_ms + 1000, h.interval_ms, h.status) for h in first.hosts
    ]
    assert [(c.relay, c.seq, c.hosts, c.age_ms) for c in after.children] == [
        (c.relay, c.seq, c.hosts, c.age_ms + 1000) for c in first.children
    ]
    assert service.beats == 2


async def test_bundles_from_relays_outside_the_allowlist_are_rejected(tmp_path: Path) -> None:
    from relaybeat.monitor.detector import Policy
    from relaybeat.monitor.service import Monitor, MonitorSettings
    from relaybeat.monitor.store import Store
    from relaybeat.relay.mqtt import BrokerURL
    from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle

    store = await Store.open(f"sqlite:///{tmp_path / 'allow.db'}")
    try:
        await store.upgrade()
        settings = MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1"), Policy(), relays=frozenset({"r1", "r2"}))
        monitor = Monitor(settings, store)
        entry = (HostEntry("h1", 1, 0, 1000, LeafStatus.OK),)
        child = Bundle("rogue", "b", 1, 1000, entry, age_ms=0)
        monitor.take("relaybeat/bundle/r9", encode_bundle(Bundle("r9", "b", 1, 1000, entry)))
        monitor.take("relaybeat/bundle/r1", encode_bundle(Bundle("r1", "b", 1, 1000, (), (child,))))
        monitor.take("relaybeat/bundle/r2", encode_bundle(Bundle("r2", "b", 1, 1000, entry)))
        assert monitor.rejections.counts["unknown_relay"] == 2
        assert set(monitor.detector.relays) == {"r2"}
        assert set(monitor.detector.hosts) == {"h1"}
    finally:
        await store.close()
