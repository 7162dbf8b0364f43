"""The detector's own quality: false alarms proved (pure judge, driven by the pure detector on an
injected clock), the figures, timeouts from targets; then the shell: rows in SQL linked to their
transitions, /metrics, the webhook follow-up, availability and `GET /api/v1/quality`."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.notify import Target
from relaybeat.monitor.outbox import NotifySettings, Webhook
from relaybeat.monitor.quality import (
    DAY_S,
    Judge,
    Outage,
    Proof,
    Targets,
    TargetTimeouts,
    advise,
    figures,
    lookup_in,
)
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.states import Kind, State, Transition
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.wire import Beat, encode_beat
from tests.fakes import FakeClock
from tests.monitors import api, call

INTERVAL = 1.0


class Run:
    """The pure detector and the judge, fed one host's beats on a simulated clock (as the writer does)."""

    def __init__(self, timeouts: TargetTimeouts | None = None) -> None:
        self.detector = Detector(Policy(misses=3, default_interval_s=INTERVAL), 0.0, timeouts=timeouts)
        self.detector.grace_from = -1e9
        self.judge = Judge()
        self.lookup = lookup_in(self.detector)
        self.n = 0
        self.downs: list[tuple[float, Transition]] = []
        self.alarms: list[Any] = []

    def _decide(self, transitions: list[Transition], now: float) -> None:
        items = []
        for t in transitions:
            self.n += 1
            items.append((t, str(self.n)))
            if t.to_state is State.DOWN and t.from_state is not State.DOWN:
                self.downs.append((now, t))
        _, found = self.judge.decided(items, self.lookup, now)
        self.alarms += found

    def until(self, t: float) -> None:
        deadline = self.detector.next_deadline()
        while deadline is not None and deadline <= t:
            self._decide(self.detector.expire(deadline), deadline)
            deadline = self.detector.next_deadline()

    def beat(self, t: float, seq: int | None) -> None:
        self.until(t)
        transitions = self.detector.observe_beat("h", Beat(seq=seq, interval_s=INTERVAL), t)
        if transitions:
            self._decide(transitions, t)
        else:
            self.alarms += self.judge.look(t, self.lookup)


# --- the judge -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=20, max_size=200), st.integers(0, 5))
def test_every_down_of_a_host_that_kept_beating_is_proved_a_false_alarm(delivered: list[bool], extra: int) -> None:
    """Beats lost on the way, never a pause of the leaf itself: every `down` was wrong, and each is proved."""
    run = Run()
    for i, ok in enumerate([True, *delivered, *([True] * (3 + extra))]):
        if ok:
            run.beat(i * INTERVAL + 0.01, i)
    assert len(run.alarms) == len(run.downs)
    assert all(a.proof is Proof.SEQ_CONTINUITY for a in run.alarms)
    assert len({a.opened_key for a in run.alarms}) == len(run.alarms)  # each outage proved once


@settings(max_examples=40, deadline=None)
@given(st.floats(4.0, 500.0), st.booleans())
def test_a_restart_or_a_frozen_leaf_is_a_real_outage_not_a_false_alarm(gap_s: float, restart: bool) -> None:
    """Silent for `gap_s`, then back with seq 0 (a reboot) or seq + 1 (it was frozen): no false alarm."""
    run = Run()
    for i in range(10):
        run.beat(i * INTERVAL, 100 + i)
    back = 9 * INTERVAL + gap_s
    run.beat(back, 0 if restart else 110)
    for i in range(1, 5):
        run.beat(back + i * INTERVAL, (0 if restart else 110) + i)
    assert len(run.downs) == 1
    assert run.alarms == []


def test_a_burst_of_late_beats_after_the_outage_proves_it_within_an_interval() -> None:
    """The path held the beats back (first in, first out): the first one back is old news with seq + 1,
    the ones queued behind it follow at once and show the seq kept counting."""
    run = Run()
    for i in range(10):
        run.beat(float(i), i)
    # Beats 10..15 were sent on time but held up; they all arrive at 15.5.
    for s in range(10, 16):
        run.beat(15.5 + 0.001 * (s - 10), s)
    assert len(run.downs) == 1
    assert [a.proof for a in run.alarms] == [Proof.SEQ_CONTINUITY]
    assert (run.alarms[0].seq_before, run.alarms[0].seq_after) == (9, 15)


def test_a_beat_dated_inside_the_outage_proves_it_without_a_seq() -> None:
    judge = Judge()
    detector = Detector(Policy(misses=3), 0.0)
    detector.grace_from = -1e9
    lookup = lookup_in(detector)
    detector.observe_beat("h", Beat(interval_s=1.0), 10.0)
    down = detector.expire(13.0)
    judge.decided([(t, "d") for t in down], lookup, 13.0)
    # A bundle from a relay, 0.5 s after the decision, reports the host heard 0.2 s after the deadline.
    from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus

    back = detector.observe(Bundle("r", "b", 1, 1000, (HostEntry("h", None, 300, 1000, LeafStatus.OK),)), 13.5)
    _, found = judge.decided([(t, f"u{i}") for i, t in enumerate(back)], lookup, 13.5)
    assert [f.proof for f in found] == [Proof.DATED_INSIDE]
    assert found[0].opened_key == "d"


# --- the figures ---------------------------------------------------------------------------------


@given(
    st.lists(st.tuples(st.floats(0, 999), st.floats(0, 50), st.booleans(), st.floats(0, 20)), min_size=0, max_size=30),
    st.integers(1, 50),
)
def test_the_figures_hold_their_definitions(rows: list[tuple[float, float, bool, float]], subjects: int) -> None:
    outages = [
        Outage(kind=Kind.HOST, subject=f"h{i}", at=at, closed_at=at + length, detection_s=td, false_alarm=wrong)
        for i, (at, length, wrong, td) in enumerate(rows)
    ]
    f = figures(outages, subjects, 0.0, 1000.0)
    wrong = [o for o in outages if o.false_alarm]
    assert f.outages == len(rows)
    assert f.false_alarms == len(wrong)
    assert f.deaths == len(rows) - len(wrong)
    assert f.false_alarms_per_day is not None
    assert math.isclose(f.false_alarms_per_day, len(wrong) / (subjects * 1000.0) * DAY_S)
    assert f.query_accuracy is not None
    assert 0.0 <= f.query_accuracy <= 1.0
    if wrong:  # P_A = 1 − E[T_M] / E[T_MR]
        assert f.mistake_duration_s is not None
        assert f.mistake_recurrence_s is not None
        assert math.isclose(f.query_accuracy, max(0.0, 1 - f.mistake_duration_s / f.mistake_recurrence_s), abs_tol=1e-9)
    deaths = [o.detection_s for o in outages if not o.false_alarm and o.detection_s is not None]
    assert f.detection_s_mean == (None if not deaths else sum(deaths) / len(deaths))


# --- timeouts from targets -----------------------------------------------------------------------


@given(
    st.floats(0.1, 60.0),
    st.integers(10, 100_000),
    st.floats(0.0, 0.3),
    st.floats(0.0, 0.5),
    st.floats(0.01, 1000.0),
    st.floats(1.0, 600.0),
)
def test_a_derived_timeout_meets_the_false_alarm_target_or_says_it_cannot(
    interval: float, beats: int, loss: float, jitter: float, per_day: float, detection: float
) -> None:
    lost = int(beats * loss)
    advice = advise(interval, beats, {}, beats, lost, jitter * interval, Targets(detection, per_day))
    assert advice.timeout_s >= 2 * interval  # one lost beat never pages
    assert advice.meets_false_alarms == (advice.expected_false_alarms_per_day <= per_day)
    assert advice.meets_detection == (advice.timeout_s <= detection * (1 + 1e-9))
    if not advice.meets_detection:
        assert "cannot meet target_detection_s" in advice.basis
        assert advice.promised_detection_s == advice.timeout_s
    stricter = advise(interval, beats, {}, beats, lost, jitter * interval, Targets(detection, per_day / 10))
    assert stricter.timeout_s >= advice.timeout_s


def test_target_timeouts_learn_a_lossy_host_and_meet_both_targets() -> None:
    """5 % of beats lost: the timeout grows past interval × 3 to keep false alarms under 1 a day,
    and stays under the 10 s detection target; the detector uses it."""
    timeouts = TargetTimeouts(Targets(detection_s=10.0, false_alarms_per_day=1.0))
    run = Run(timeouts)
    for i in range(2000):
        if i % 20 != 7:  # every 20th beat lost
            run.beat(i * INTERVAL, i)
    advice = timeouts.advice("h")
    assert advice is not None
    assert advice.meets_false_alarms
    assert advice.meets_detection
    assert 3.0 < advice.timeout_s <= 10.0
    assert run.detector.timeout_s(run.detector.hosts["h"]) == advice.timeout_s


def test_an_impossible_detection_target_favours_false_alarms_and_says_what_it_can_promise() -> None:
    timeouts = TargetTimeouts(Targets(detection_s=2.0, false_alarms_per_day=0.01))
    run = Run(timeouts)
    for i in range(200):
        run.beat(i * INTERVAL, i)
    advice = timeouts.advice("h")
    assert advice is not None
    assert advice.meets_false_alarms
    assert not advice.meets_detection
    assert "cannot meet target_detection_s 2" in advice.basis
    assert advice.promised_detection_s == advice.timeout_s > 2.0


# --- the shell: SQL, metrics, follow-up, availability, API ---------------------------------------


def _monitor(store: Store, clock: FakeClock) -> Monitor:
    webhook = Webhook(Target("ops"), "http://127.0.0.1:9/hook")
    settings = MonitorSettings(
        BrokerURL.parse("mqtt://127.0.0.1:1"), Policy(misses=3), notify=NotifySettings((webhook,))
    )
    return Monitor(settings, store, clock)


def _beat(monitor: Monitor, clock: FakeClock, at: float, seq: int) -> None:
    clock.t = at
    monitor.expire()
    monitor.take("relaybeat/beat/web-1", encode_beat(Beat(seq=seq, interval_s=1.0)))
    monitor.expire()


async def test_a_false_alarm_is_recorded_counted_followed_up_and_reported(store: Store) -> None:
    clock = FakeClock()
    monitor = _monitor(store, clock)
    await monitor.restore()
    client = api(monitor)  # its metrics observe decisions from now on
    start = clock.t + 10  # past the start-up grace
    for i in range(5):
        _beat(monitor, clock, start + i, i)
    # Beats 5..9 are lost: down at start + 7; beat 10 arrives at start + 10 with the seq counting on.
    clock.t = start + 7  # the deadline: decided on time
    monitor.expire()
    _beat(monitor, clock, start + 10, 10)
    for i in range(11, 14):
        _beat(monitor, clock, start + i, i)
    await monitor.flush()

    rows = await store.history(subject="web-1", newest_first=False)
    down = next(r for r in rows if r.to_state is State.DOWN)
    up = next(r for r in rows if r.from_state is State.DOWN)
    alarms = await store.false_alarms()
    assert [(a.subject, a.proof, a.opened_id, a.closed_id) for a in alarms] == [
        ("web-1", "seq_continuity", down.id, up.id)
    ]
    assert (alarms[0].seq_before, alarms[0].seq_after) == (4, 10)
    detections = await store.detections()
    assert [(d.transition_id, d.seq) for d in detections] == [(down.id, 4)]
    assert detections[0].detection_s is not None
    assert math.isclose(detections[0].detection_s, 3.0, abs_tol=1e-3)

    # The follow-up goes to the target that was told of the outage and its recovery, after both.
    outbox = await store.outbox()
    assert [m.type.value for m in outbox] == ["outage", "recovery", "false_alarm"]
    body = json.loads(outbox[-1].body)
    assert body["incident"] == "host:web-1"
    assert body["summary"].startswith("false alarm: host web-1 was alive")

    async with client:
        headers = {"Authorization": "Bearer read-token-0123456789ab"}
        report = await call(client, "GET", "/api/v1/quality?kind=host", 200, headers=headers)
        assert report["hosts"]["false_alarms"] == 1
        assert report["hosts"]["deaths"] == 0
        assert report["hosts"]["query_accuracy"] < 1.0
        assert report["relays"] is None
        assert [(s["id"], s["false_alarms"]) for s in report["subjects"]] == [("web-1", 1)]
        assert report["false_alarms"][0]["opened_id"] == down.id
        availability = await call(client, "GET", "/api/v1/hosts/web-1/availability", 200, headers=headers)
        assert availability["downtime_s"] == 0
        assert availability["outages"] == 0
        assert math.isclose(availability["false_alarm_s"], (up.at - down.at).total_seconds())
        metrics = (await client.get("/metrics")).text
        assert 'relaybeat_false_alarms_total{kind="host",proof="seq_continuity"} 1.0' in metrics
        assert 'relaybeat_detection_seconds_count{kind="host",to="down"} 1.0' in metrics


async def test_a_real_death_counts_its_detection_time_and_no_false_alarm(store: Store) -> None:
    clock = FakeClock()
    monitor = _monitor(store, clock)
    await monitor.restore()
    start = clock.t + 10
    for i in range(5):
        _beat(monitor, clock, start + i, 100 + i)
    clock.t = start + 7
    monitor.expire()
    clock.t = start + 30
    for i in range(3):  # rebooted: seq starts again
        _beat(monitor, clock, start + 30 + i, i)
    await monitor.flush()
    assert await store.false_alarms() == []
    async with api(monitor) as client:
        headers = {"Authorization": "Bearer read-token-0123456789ab"}
        report = await call(client, "GET", "/api/v1/quality", 200, headers=headers)
        assert (report["hosts"]["deaths"], report["hosts"]["false_alarms"]) == (1, 0)
        assert math.isclose(report["hosts"]["detection_s_mean"], 3.0, abs_tol=0.05)
        assert report["hosts"]["query_accuracy"] == 1.0


async def test_quality_rejects_a_window_without_a_time_zone(store: Store) -> None:
    clock = FakeClock()
    monitor = _monitor(store, clock)
    async with api(monitor) as client:
        headers = {"Authorization": "Bearer read-token-0123456789ab"}
        response = await client.get("/api/v1/quality?since=2026-01-01T00:00:00", headers=headers)
        assert response.status_code == 422
        assert isinstance(response, httpx.Response)


def test_a_relay_whose_bundles_were_lost_and_its_unreachable_hosts_are_false_alarms() -> None:
    from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus

    detector = Detector(Policy(misses=3), 0.0)
    detector.grace_from = -1e9
    judge, lookup = Judge(), lookup_in(detector)
    found: list[Any] = []
    n = 0

    def feed(transitions: list[Transition], now: float) -> None:
        nonlocal n
        items = []
        for t in transitions:
            n += 1
            items.append((t, str(n)))
        found.extend(judge.decided(items, lookup, now)[1])

    def bundle(t: float, seq: int) -> None:
        entry = HostEntry("h", 100 + seq, 0, 1000, LeafStatus.OK)
        feed(detector.observe(Bundle("r", "boot", seq, 1000, (entry,)), t), t)

    for s in range(1, 6):
        bundle(float(s), s)
    feed(detector.expire(8.0), 8.0)  # relay down at 8, its host unreachable
    assert (detector.relays["r"].state, detector.hosts["h"].state) == (State.DOWN, State.UNREACHABLE)
    bundle(11.0, 11)  # the same boot, six bundles on: they were lost on the way, the relay was fine
    assert [(f.kind, f.subject, f.proof) for f in found] == [
        (Kind.RELAY, "r", Proof.SEQ_CONTINUITY),
        (Kind.HOST, "h", Proof.RELAY_FALSE_ALARM),
    ]


async def test_an_outage_open_across_a_monitor_restart_is_still_judged_when_it_ends(store: Store) -> None:
    clock = FakeClock()
    first = _monitor(store, clock)
    await first.restore()
    start = clock.t + 10
    for i in range(5):
        _beat(first, clock, start + i, i)
    clock.t = start + 7
    first.expire()
    await first.flush()
    first.close()

    clock.t = start + 20
    second = _monitor(store, clock)
    await second.restore()
    _beat(second, clock, start + 21, 21)  # the leaf kept counting while both the path and the monitor were away
    await second.flush()
    alarms = await store.false_alarms()
    assert [(a.subject, a.proof, a.seq_before, a.seq_after) for a in alarms] == [("web-1", "seq_continuity", 4, 21)]
    assert alarms[0].opened_id is not None
    assert alarms[0].closed_id is not None


def test_the_false_alarm_body_has_the_rows_fields() -> None:
    """One record per concept: the API shows a false alarm's row as stored (its keys are the links' ids)."""
    from dataclasses import fields

    from relaybeat.api.quality import FalseAlarmOut
    from relaybeat.monitor.records import FalseAlarmRow

    assert set(FalseAlarmOut.model_fields) == {f.name for f in fields(FalseAlarmRow)} - {"opened_key", "closed_key"}
