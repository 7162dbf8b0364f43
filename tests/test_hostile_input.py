"""Hostile input against real processes (issue 9): a monitor and a relay keep deciding while the fuzz
run's messages and a few hundred generated ones arrive on every topic they read.

On the old code the first deeply nested beat ended the monitor's task group without a word (the
process stayed up, killed hosts stayed `up`), and a NUL in a host id made every PostgreSQL write fail.
"""

from __future__ import annotations

import logging
from pathlib import Path

import paho.mqtt.publish
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from relaybeat.relay.service import RelayService, RelaySettings
from relaybeat.relay.wire import INTERNAL_ERROR, Beat, encode_beat
from tests.conftest import CentralBroker
from tests.processes import Topology, wait_until
from tests.wire_inputs import DEEP_LIST, DEEP_META, bundle_json, hostile_beats, hostile_bundles

INTERVAL_S = 1.0  # leaf interval and relay flush: timeouts of 3 s, room for a busy machine
MISSES = 3
GENERATED = 80  # beats and as many bundles, published to the monitor's broker and to the relay's

BEATS_FROM_THE_FUZZ_RUN = [
    DEEP_META,
    b'{"seq":' + DEEP_LIST + b"}",
    b'{"status":' + DEEP_LIST + b"}",
    b'{"meta":{"k":"a\\u0000b"}}',
]
BUNDLES_FROM_THE_FUZZ_RUN = [
    b'{"v":1,"relay":"evil","boot":"b","seq":1,"flush_ms":1000,"hosts":[' + DEEP_LIST + b"]}",
    b'{"v":1,"relay":' + DEEP_LIST + b',"boot":"b","seq":1,"flush_ms":1000,"hosts":[]}',
    bundle_json(relay="evil", hosts=[["web\0evil", 1, 5, 1000, "ok"]]),
    bundle_json(relay="evil", hosts=[["ok", 1, 5, 1000, "ok"], ["x" * 128 + "\0y", 1, 5, 1000, "ok"]]),
    bundle_json(relay="evil", v=True),
    bundle_json(relay="evil", v=1.0),
]


def generated(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    """`count` payloads from a Hypothesis strategy, the same ones every run (and drawn once per run)."""
    if (strategy, count) in _drawn:
        return _drawn[strategy, count]
    drawn: list[bytes] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(payload: bytes) -> None:
        drawn.append(payload)

    collect()
    _drawn[strategy, count] = drawn
    return drawn


_drawn: dict[tuple[st.SearchStrategy[bytes], int], list[bytes]] = {}


def publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    broker = BrokerURL.parse(url)
    paho.mqtt.publish.multiple([(topic, payload, 1, False) for topic, payload in messages], broker.host, broker.port)


@pytest.fixture
def topo(db_topo: Topology) -> Topology:
    return db_topo


@pytest.mark.e2e
def test_hostile_messages_are_counted_and_a_host_that_stops_is_still_declared_down(
    topo: Topology, central_broker: CentralBroker
) -> None:
    site, api = pick_free("127.0.0.1"), pick_free("127.0.0.1")
    site_url = f"mqtt://127.0.0.1:{site}"
    relay = topo.relay("r1", central_broker.url, serve=site, flush=INTERVAL_S)
    monitor = topo.monitor(central_broker.url, api, misses=MISSES)
    victim = topo.leaf("victim", site_url, interval=INTERVAL_S)
    beats = BEATS_FROM_THE_FUZZ_RUN + generated(hostile_beats, GENERATED)  # while the leaf starts
    bundles = BUNDLES_FROM_THE_FUZZ_RUN + generated(hostile_bundles, GENERATED)
    topo.wait_state("hosts", "victim", "up", timeout=20)
    p = topo.prefix
    hostile = [(f"{p}beat/evil", b) for b in beats] + [(f"{p}bundle/evil", b) for b in bundles]
    # Each is followed by a plain beat: once it counts, everything before it was read.
    publish(central_broker.url, [*hostile, (f"{p}beat/after-direct", b"")])
    publish(site_url, [*hostile, (f"{p}beat/after-relayed", b"")])
    topo.wait_state("hosts", "after-direct", "up", timeout=20)
    topo.wait_state("hosts", "after-relayed", "up", timeout=20)

    rejected = topo.healthz()["rejected"]
    assert rejected.get("too_deep", 0) >= 3, rejected  # the deep beats
    assert rejected.get("bad_id", 0) >= 3, rejected  # the deep relay and the NUL ids
    assert rejected.get("unknown_version", 0) >= 2, rejected  # `v: true`, `v: 1.0`
    assert rejected.get("bad_meta", 0) >= 1, rejected  # NUL in meta
    assert sum(rejected.values()) >= len(BEATS_FROM_THE_FUZZ_RUN) + len(BUNDLES_FROM_THE_FUZZ_RUN)
    assert INTERNAL_ERROR not in rejected, monitor.log()[-3000:]
    wait_until(lambda: "rejected too_deep" in relay.log() and "rejected bad_id" in relay.log(), 10, "relay counts")
    assert INTERNAL_ERROR not in relay.log(), relay.log()[-3000:]

    victim.kill()
    topo.wait_state("hosts", "victim", "down", timeout=INTERVAL_S * MISSES + 15)
    wait_until(lambda: topo.moves("victim")[-1:] == [("up", "down")], 10, "the transition to down in SQL")
    assert topo.state("relays", "r1") == "up"  # still bundling: its hosts are judged, not unreachable
    relay.assert_running()
    monitor.assert_running()
    assert topo.healthz()["database_ok"] is True


class Bug(Exception):
    """What a bug behind a decoder raises: nothing a decoder rejects."""


def _fail(*_: object) -> list[object]:
    msg = "a bug behind the decoder"
    raise Bug(msg)


async def test_a_failure_behind_the_decoders_is_counted_logged_with_its_traceback_and_input_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING)
    nowhere = BrokerURL.parse("mqtt://127.0.0.1:1")
    store = await Store.open(f"sqlite:///{tmp_path / 'guard.db'}")
    try:
        await store.upgrade()
        monitor = Monitor(MonitorSettings(nowhere), store)
        relay = RelayService(RelaySettings("r1", nowhere, nowhere))
        for service, core, method in (
            (monitor, monitor.detector, "observe_beat"),
            (relay, relay.assembler, "add_beat"),
        ):
            with monkeypatch.context() as patched:
                patched.setattr(core, method, _fail)
                for _ in range(3):
                    service.take("relaybeat/beat/web-1", encode_beat(Beat(seq=1)))  # never raises
            assert service.rejections.counts == {INTERNAL_ERROR: 3}
            service.take("relaybeat/beat/web-2", b"")  # the next message is read as ever
        assert "web-2" in monitor.detector.hosts
        assert relay.assembler.leaf_count == 1
        logged = [r for r in caplog.records if INTERNAL_ERROR in r.getMessage()]
        assert len(logged) == 2  # once per service within the interval, with the traceback
        assert all(r.exc_info is not None and r.exc_info[0] is Bug for r in logged)
    finally:
        await store.close()
