"""Dating bundles by their relay's send time (monitor/dating.py), with an injected clock: property tests
of the pure clock, then the same through a real monitor's `take()` (a FakeClock, a SQLite store):
a backlog replayed from a persistent session never makes a dead relay or its hosts `up`."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relaybeat.monitor.dating import DRIFT, Dating
from relaybeat.monitor.states import State
from relaybeat.monitor.store import Store
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.compact import BundleEncoder
from relaybeat.relay.wire import BINARY_VERSION, Beat
from tests.fakes import FakeClock
from tests.monitors import new_monitor

flushes = st.floats(0.05, 10.0)
boot_times = st.floats(0.0, 1e6)  # the monitor's reading at the relay's boot


def sent_ms(k: int, flush_s: float) -> int:
    return round(k * flush_s * 1000)


@given(flushes, boot_times, st.lists(st.floats(0.0, 0.24), min_size=2, max_size=40))
def test_live_bundles_are_dated_between_their_send_and_their_arrival_from_the_second_on(
    flush_s: float, boot: float, transits: list[float]
) -> None:
    """Each transit is under a quarter flush: live, so the second bundle confirms the clock."""
    dating = Dating()
    for k, transit in enumerate(transits):
        sent = sent_ms(k, flush_s)
        arrival = boot + sent / 1000 + transit * flush_s
        dated = dating.date("r1", "b1", sent, arrival)
        if k == 0:
            assert dated is None  # its first bundle cannot be dated from itself
            continue
        assert dated is not None
        true_sent = boot + sent / 1000
        assert true_sent - 1e-6 <= dated <= arrival + 1e-9
        assert dated - true_sent <= max(transits[: k + 1]) * flush_s + 1e-6


@given(flushes, boot_times, st.integers(2, 200), st.floats(0.0, 0.4))
def test_a_replayed_backlog_is_never_dated(flush_s: float, boot: float, queued: int, spread: float) -> None:
    """A queue of `queued` bundles, sent once per flush, delivered in one burst (arriving less than
    half a flush apart): nothing in it can say how old it is, so nothing in it is dated."""
    dating = Dating()
    start = boot + queued * flush_s + 20.0  # the new monitor connects 20 s after the last was sent
    for k in range(queued):
        assert dating.date("r1", "b1", sent_ms(k, flush_s), start + k * spread * flush_s) is None


@given(flushes, boot_times, st.integers(1, 100), st.floats(1.0, 600.0), st.integers(2, 10))
def test_after_a_replay_the_live_stream_confirms_the_clock_and_a_late_bundle_is_dated_when_sent(
    flush_s: float, boot: float, queued: int, away_s: float, live: int
) -> None:
    dating = Dating()
    now = boot + queued * flush_s + away_s  # the backlog arrives at once
    for k in range(queued):
        dating.date("r1", "b1", sent_ms(k, flush_s), now)
    dated = None
    for k in range(queued, queued + live):  # then the relay's bundles, as it sends them
        sent = sent_ms(k + round(away_s / flush_s), flush_s)
        dated = dating.date("r1", "b1", sent, boot + sent / 1000 + 0.01 * flush_s)
    assert dated is not None
    # One more, delivered 30 s after it was sent (a cluster's failover): dated 30 s ago, not now.
    sent = sent_ms(queued + live + round(away_s / flush_s) + 1, flush_s)
    late = dating.date("r1", "b1", sent, boot + sent / 1000 + 30.0)
    assert late is not None
    assert abs(late - (boot + sent / 1000)) <= 0.01 * flush_s + DRIFT * 2 * flush_s + 1e-6  # transit, drift


@given(st.floats(-DRIFT * 0.9, DRIFT * 0.9), flushes, st.integers(10, 400))
def test_a_relay_clock_ticking_at_another_rate_keeps_its_bundles_fresh(rate: float, flush_s: float, n: int) -> None:
    """Two monotonic clocks differ by up to hundreds of ppm: the relay's news never ages on our clock."""
    dating = Dating()
    for k in range(n):
        ours = 1000.0 + k * flush_s  # sent on our clock, arriving at once
        dated = dating.date("r1", "b1", round(k * flush_s * (1 + rate) * 1000), ours)
        if k:
            assert dated is not None
            assert ours - dated <= 2 * DRIFT * flush_s + 0.002  # a rounding ms, and one flush of drift


def test_version_1_bundles_are_dated_on_arrival_and_boots_keep_their_own_clocks() -> None:
    dating = Dating()
    assert dating.date("r1", "b1", None, 5.0) == 5.0
    assert dating.date("r1", "b1", 0, 10.0) is None
    assert dating.date("r1", "b1", 1000, 11.0) == 11.0
    assert dating.date("r1", "b2", 0, 12.0) is None  # a new boot: a new clock, unconfirmed
    assert dating.date("r1", "b1", 2000, 12.0) == 12.0  # a late bundle of the old boot keeps its own
    assert dating.sent_at("r1", "b1", 500) == 10.5
    assert dating.sent_at("r1", "b2", 0) is None


# ------------------------------------------------------------------- through a real monitor


def v2_payloads(relay: str, hosts: tuple[str, ...], flushes_n: int, flush_s: float = 1.0) -> list[bytes]:
    """A relay's bundles (binary, deltas and keyframes) for `flushes_n` flushes of live leaves,
    on the relay's own clock from 0."""
    asm = Assembler(relay, "boot-1", flush_s, 1.0, keyframe_s=5.0, version=BINARY_VERSION, booted_at=0.0)
    encoder = BundleEncoder()
    out = []
    for k in range(1, flushes_n + 1):
        for host in hosts:
            asm.add_beat(host, Beat(k, 1.0), k * flush_s - 0.1)
        out.append(encoder.encode(asm.flush(k * flush_s)))
    return out


async def test_a_replayed_backlog_of_a_dead_relay_makes_no_one_up(store: Store) -> None:
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    # A persistent session kept 30 bundles of r1 (flush 1 s); r1 died 20 s before we connected.
    for payload in v2_payloads("r1", ("h1", "h2"), 30):
        monitor.take("relaybeat/bundle/r1", payload)
        clock.t += 0.001
    monitor.take("relaybeat/relay/r1/status", b"offline")  # its will, queued after them
    for _ in range(10):
        clock.t += 1.0
        monitor.expire()
    await monitor.flush()
    assert await store.history(newest_first=False) == []
    assert monitor.detector.relays.get("r1") is None
    assert monitor.ingest.received["bundles_undated"] == 30


async def test_a_live_relay_is_up_from_its_second_bundle_with_its_first_passed_on(store: Store) -> None:
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    first, second, *_ = v2_payloads("r1", ("h1",), 3)
    monitor.take("relaybeat/bundle/r1", first)
    assert monitor.detector.relays.get("r1") is None  # held: one bundle cannot be dated
    clock.t += 1.0
    monitor.take("relaybeat/bundle/r1", second)
    assert monitor.detector.relays["r1"].state is State.UP
    assert monitor.detector.relays["r1"].seq == 2
    assert monitor.detector.hosts["h1"].state is State.UP
    assert monitor.detector.ignored == {}  # the held keyframe went first: no seq gap, no resync
