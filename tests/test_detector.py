"""The detector, driven with a fake clock: one test per behaviour of issue 3, then a state machine.

Most tests build a small `Site`: leaves that beat on their interval into relays (real assemblers)
that flush on their cadence, child relays folding into parents, and the detector fed every bundle
and woken at every deadline, all on one fake clock. Times are chosen to be exact in binary.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from relaybeat.errors import SettingsError
from relaybeat.monitor.detector import Detector, HostSnapshot, Policy, RelaySnapshot
from relaybeat.monitor.ingest import Behind
from relaybeat.monitor.states import Event, Kind, State, Transition
from relaybeat.relay.assembler import Assembler
from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, decode_bundle, encode_bundle
from tests.columnar import Tables

# ------------------------------------------------------------------------------------- the site


@dataclass
class Leaf:
    id: str
    via: tuple[str | None, ...]  # relays it beats to; None = straight to the monitor's broker
    interval_s: float
    next_beat: float
    seq: int = 0
    alive: bool = True
    status: LeafStatus = LeafStatus.OK


@dataclass
class Relay:
    id: str
    parent: str | None
    flush_s: float
    asm: Assembler
    next_flush: float
    alive: bool = True
    uplink: bool = True  # False: it runs and hears its leaves, but its bundles go nowhere
    depth: int = 0


SITE_WIRE = [1]  # the wire version the site's relays speak: each test runs with 1 (keyframes) and 2 (deltas)


@pytest.fixture(autouse=True, params=[1, 2], ids=["keyframes", "deltas"])
def site_wire(request: pytest.FixtureRequest) -> Iterator[int]:
    SITE_WIRE[0] = request.param
    yield request.param
    SITE_WIRE[0] = 1


@dataclass
class Site:
    """A fake deployment around one detector, all on one fake clock. Its relays send version 1
    bundles (every one a keyframe) or version 2 deltas with a keyframe every 3 s and on request."""

    policy: Policy = field(default_factory=Policy)
    start: float = 0.0
    connected: bool = True  # the monitor's own broker connection
    network: bool = True  # False: bundles are lost on the way to the monitor (its network is cut)
    wire: int = field(default_factory=lambda: SITE_WIRE[0])

    def __post_init__(self) -> None:
        self.detector = Detector(self.policy, self.start)
        self.tables = Tables()
        self.now = self.start
        self.relays: dict[str, Relay] = {}
        self.leaves: dict[str, Leaf] = {}
        self.batches: list[list[Transition]] = []  # one entry per detector call that said something
        self.delivered: list[Bundle] = []  # every bundle the monitor received, in order

    # -------------------------------------------------------------------------------- building

    def relay(self, relay_id: str, flush_s: float = 1.0, parent: str | None = None, boot: str = "b1") -> Relay:
        depth = 0 if parent is None else self.relays[parent].depth + 1
        asm = self.assembler(relay_id, boot, flush_s)
        relay = Relay(relay_id, parent, flush_s, asm, self.now + flush_s, depth=depth)
        self.relays[relay_id] = relay
        return relay

    def leaf(
        self, host: str, *via: str | None, interval_s: float = 5.0, first_beat: float | None = None, seq: int = 0
    ) -> Leaf:
        leaf = Leaf(host, via or (None,), interval_s, self.now if first_beat is None else first_beat, seq)
        self.leaves[host] = leaf
        return leaf

    def assembler(self, relay_id: str, boot: str, flush_s: float) -> Assembler:
        if self.wire == 1:
            return Assembler(relay_id, boot, flush_s, self.policy.default_interval_s)
        return Assembler(
            relay_id, boot, flush_s, self.policy.default_interval_s, keyframe_s=3.0, version=2, booted_at=self.now
        )

    def restart_relay(self, relay_id: str, boot: str) -> None:
        relay = self.relays[relay_id]
        relay.asm = self.assembler(relay_id, boot, relay.flush_s)
        relay.alive = True
        relay.next_flush = self.now + relay.flush_s

    def restart_monitor(self, hosts: Iterable[HostSnapshot], relays: Iterable[RelaySnapshot]) -> None:
        self.detector = Detector(self.policy, self.now)
        self.detector.restore(hosts, relays)
        self.connected = True

    def snapshot(self) -> tuple[list[HostSnapshot], list[RelaySnapshot]]:
        """What the store would hold: every subject as the detector last decided it."""
        d = self.detector
        hosts = [
            HostSnapshot(h.id, h.state, h.since, h.last_seen, h.via, h.interval_s, h.seq) for h in d.hosts.values()
        ]
        relays = [
            RelaySnapshot(r.id, r.state, r.since, r.last_seen, r.parent, r.boot, r.seq, r.flush_s)
            for r in d.relays.values()
        ]
        return hosts, relays

    # ------------------------------------------------------------------------------- monitor side

    def record(self, out: list[Transition]) -> list[Transition]:
        if out:
            self.batches.append(out)
        return out

    def deliver(self, bundle: Bundle) -> list[Transition]:
        self.delivered.append(bundle)
        if self.wire == 2:  # deltas arrive as the monitor's decoder hands them over: most news by column
            bundle = self.tables.split(bundle)[1]
        out = self.record(self.detector.observe(bundle, self.now))
        assert self.detector.column_faults() == []
        for relay_id in self.detector.take_resync_requests():
            if self.relays[relay_id].alive:
                self.relays[relay_id].asm.request_keyframe()
        return out

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.detector.set_connected(connected, self.now)

    # ------------------------------------------------------------------------------------ time

    def run_until(self, until: float) -> None:
        """Play every beat, flush and deadline up to and including `until`, in time order."""
        for _ in range(100_000):
            times = [leaf.next_beat for leaf in self.leaves.values() if leaf.alive]
            times += [relay.next_flush for relay in self.relays.values() if relay.alive]
            deadline = self.detector.next_deadline()
            if deadline is not None:
                times.append(max(deadline, self.now))
            if not times or min(times) > until:
                break
            self.now = min(times)
            self._tick()
        else:
            msg = "the site did not settle"
            raise AssertionError(msg)
        self.now = until
        self.record(self.detector.expire(until))

    def _tick(self) -> None:
        now = self.now
        for leaf in self.leaves.values():
            if leaf.alive and leaf.next_beat == now:
                leaf.seq += 1
                leaf.next_beat += leaf.interval_s
                self.beat(leaf.id, Beat(leaf.seq, leaf.interval_s, leaf.status))
        # Deepest relays first, so that a parent flushing at the same instant folds the fresh child.
        for relay in sorted(self.relays.values(), key=lambda r: (-r.depth, r.id)):
            if relay.alive and relay.next_flush == now:
                relay.next_flush += relay.flush_s
                bundle = relay.asm.flush(now)
                if not relay.uplink:
                    continue
                if relay.parent is not None:
                    parent = self.relays[relay.parent]
                    if parent.alive:
                        parent.asm.add_child(bundle, now)
                elif self.connected and self.network:
                    self.deliver(bundle)
        deadline = self.detector.next_deadline()
        if deadline is not None and deadline <= now:
            self.record(self.detector.expire(now))

    def beat(self, host: str, beat: Beat) -> None:
        """One beat from a leaf, right now, to wherever it beats."""
        for relay_id in self.leaves[host].via:
            if relay_id is None:
                if self.connected and self.network:
                    self.record(self.detector.observe_beat(host, beat, self.now))
            elif self.relays[relay_id].alive:
                self.relays[relay_id].asm.add_beat(host, beat, self.now)

    # --------------------------------------------------------------------------------- reading

    @property
    def log(self) -> list[Transition]:
        return [t for batch in self.batches for t in batch]

    def changes(self, subject: str) -> list[tuple[State, State, float, str]]:
        """A subject's state changes: (from, to, at, reason)."""
        return [
            (t.from_state, t.to_state, t.at, t.reason)
            for t in self.log
            if t.subject == subject and t.event == Event.TRANSITION
        ]

    def events(self, subject: str, event: Event) -> list[Transition]:
        return [t for t in self.log if t.subject == subject and t.event == event]

    def state(self, subject: str) -> State:
        track = self.detector.hosts.get(subject) or self.detector.relays[subject]
        return track.state

    def batch_of(self, transition: Transition) -> list[Transition]:
        (batch,) = [b for b in self.batches if any(t is transition for t in b)]
        return batch


def one_relay_site(*hosts: str, flush_s: float = 1.0, interval_s: float = 5.0, policy: Policy | None = None) -> Site:
    """Relay r1 (flush 1 s: timeout 3 s) with leaves beating every 5 s (timeout 15 s) from t=0."""
    site = Site(policy or Policy())
    site.relay("r1", flush_s)
    for host in hosts:
        site.leaf(host, "r1", interval_s=interval_s)
    return site


UP, DOWN, UNKNOWN, UNREACHABLE, STOPPED = State.UP, State.DOWN, State.UNKNOWN, State.UNREACHABLE, State.STOPPED
SILENT_15 = "no beat for 15.0 s (interval 5 s × 3)"
RELAY_SILENT_3 = "no bundle for 3.0 s (flush 1 s × 3)"
LAST_WILL = "relay r1 said offline (status topic / last will)"
STOPPED_SAID = "relay r1 said it stopped"


# --------------------------------------------------------------------- 1. a dead relay is one outage


def test_dead_relay_makes_its_hosts_unreachable_in_one_batch_naming_the_relay() -> None:
    site = one_relay_site("h1", "h2", "h3")
    site.run_until(20.5)
    site.relays["r1"].alive = False  # last bundle at t=20: due by 23
    site.run_until(60.0)

    (down,) = [t for t in site.log if t.subject == "r1" and t.to_state == DOWN]
    assert (down.kind, down.from_state, down.at, down.reason, down.relay) == (
        Kind.RELAY,
        UP,
        23.0,
        RELAY_SILENT_3,
        None,
    )
    batch = site.batch_of(down)
    assert [(t.kind, t.subject, t.from_state, t.to_state, t.at, t.reason, t.relay) for t in batch] == [
        (Kind.RELAY, "r1", UP, DOWN, 23.0, RELAY_SILENT_3, None),
        (Kind.HOST, "h1", UP, UNREACHABLE, 23.0, "relay r1 down", "r1"),
        (Kind.HOST, "h2", UP, UNREACHABLE, 23.0, "relay r1 down", "r1"),
        (Kind.HOST, "h3", UP, UNREACHABLE, 23.0, "relay r1 down", "r1"),
    ]
    assert not [t for t in site.log if t.to_state == DOWN and t.kind == Kind.HOST]


def test_relay_last_will_marks_it_down_at_once_with_its_hosts_unreachable() -> None:
    site = one_relay_site("h1", "h2")
    site.run_until(20.5)
    site.relays["r1"].alive = False

    out = site.record(site.detector.relay_offline("r1", 20.5))

    assert [(t.subject, t.to_state, t.at, t.reason, t.relay) for t in out] == [
        ("r1", DOWN, 20.5, LAST_WILL, None),
        ("h1", UNREACHABLE, 20.5, "relay r1 down", "r1"),
        ("h2", UNREACHABLE, 20.5, "relay r1 down", "r1"),
    ]
    before = len(site.log)
    site.run_until(60.0)
    assert site.log[before:] == []  # the deadlines that pass later add nothing


def test_a_will_of_a_session_older_than_the_one_said_online_is_stale() -> None:
    """Sparkplug B's bdSeq rule: the relay gave up on upstream session 3 while its broker node hung;
    the node let it go (and sent its will) only after session 4 had said `online`."""
    site = one_relay_site("h1", "h2")
    site.run_until(20.5)
    detector = site.detector
    detector.relay_online("r1", "b1", 4)
    detector.relay_online("r1", "b1", 2)  # older news of the same boot: the newest session stays

    assert site.record(detector.relay_offline("r1", 20.5, boot="b1", session=3)) == []
    assert detector.ignored["stale_will"] == 1
    assert site.changes("r1")[-1][:2] != (UP, DOWN)
    out = site.record(detector.relay_offline("r1", 20.5, boot="b0", session=1))  # another boot's: not known stale
    assert [(t.subject, t.to_state) for t in out] == [("r1", DOWN), ("h1", UNREACHABLE), ("h2", UNREACHABLE)]
    assert detector.ignored["stale_will"] == 1


def test_the_will_of_the_session_said_online_still_marks_the_relay_down() -> None:
    site = one_relay_site("h1")
    site.run_until(20.5)
    site.detector.relay_online("r1", "b1", 4)
    out = site.record(site.detector.relay_offline("r1", 20.5, boot="b1", session=4))
    assert [(t.subject, t.to_state) for t in out] == [("r1", DOWN), ("h1", UNREACHABLE)]
    assert "stale_will" not in site.detector.ignored


def test_a_stopped_relay_pages_nobody_and_its_hosts_go_unknown_at_their_own_timeout() -> None:
    site = one_relay_site("h1", "h2")
    site.run_until(20.5)
    site.relays["r1"].alive = False  # SIGTERM: it says `stopped`, then disconnects cleanly (no will)

    out = site.record(site.detector.relay_stopped("r1", 20.5))

    assert [(t.subject, t.from_state, t.to_state, t.at) for t in out] == [("r1", UP, STOPPED, 20.5)]
    site.run_until(60.0)
    assert site.changes("r1") == [(UNKNOWN, UP, 1.0, "bundle received (seq 1)"), (UP, STOPPED, 20.5, STOPPED_SAID)]
    for host in ("h1", "h2"):  # last beat at t=20, timeout 15 s: no news is no evidence, not down, not unreachable
        assert site.changes(host)[1:] == [(UP, UNKNOWN, 35.0, "no beat for 15.0 s; relay r1 stopped")]
    assert not [t for t in site.log if t.to_state in (DOWN, UNREACHABLE)]


def test_a_relay_back_from_a_stop_brings_its_hosts_back_up_and_judges_the_unheard_again() -> None:
    site = one_relay_site("alive", "gone")
    site.run_until(20.5)
    site.relays["r1"].alive = False
    site.record(site.detector.relay_stopped("r1", 20.5))
    site.leaves["gone"].alive = False  # never beats again
    site.run_until(40.0)
    site.restart_relay("r1", "b2")
    site.run_until(80.0)

    assert site.changes("r1")[-1] == (STOPPED, UP, 41.0, "bundle received (seq 1)")
    assert site.changes("alive")[1:] == [
        (UP, UNKNOWN, 35.0, "no beat for 15.0 s; relay r1 stopped"),
        (UNKNOWN, UP, 45.0, "beat received"),  # its first beat the new boot hears
    ]
    # Unheard by the new boot: one timeout of grace from its return, then down.
    assert site.changes("gone")[1:] == [
        (UP, UNKNOWN, 35.0, "no beat for 15.0 s; relay r1 stopped"),
        (UNKNOWN, DOWN, 56.0, "no beat for 36.0 s (interval 5 s × 3)"),
    ]


def test_a_relay_that_says_stopped_while_down_takes_back_the_blame_from_its_hosts() -> None:
    site = one_relay_site("h1")
    site.run_until(20.5)
    site.record(site.detector.relay_offline("r1", 20.5))
    site.relays["r1"].alive = False

    out = site.record(site.detector.relay_stopped("r1", 21.0))

    assert [(t.subject, t.from_state, t.to_state) for t in out] == [("r1", DOWN, STOPPED), ("h1", UNREACHABLE, UNKNOWN)]


def test_a_child_relay_behind_a_stopped_parent_goes_unknown_not_unreachable() -> None:
    site = Site()
    site.relay("top", 1.0)
    site.relay("child", 1.0, parent="top")
    site.leaf("h1", "child")
    site.run_until(20.5)
    site.relays["top"].alive = False
    site.record(site.detector.relay_stopped("top", 20.5))
    site.run_until(60.0)

    assert site.changes("child")[-1][:2] == (UP, UNKNOWN)
    assert site.changes("h1")[-1][:2] == (UP, UNKNOWN)
    assert not [t for t in site.log if t.to_state in (DOWN, UNREACHABLE)]


def test_host_back_through_revived_relay_is_down_if_its_age_says_it_died_with_death_time_from_age() -> None:
    site = one_relay_site("alive", "died")
    site.run_until(20.5)
    site.relays["r1"].uplink = False  # r1 keeps running and hearing its leaves; the monitor hears nothing
    site.run_until(25.5)
    site.leaves["died"].alive = False  # last beat at t=25, heard by r1 only
    site.run_until(60.5)
    site.relays["r1"].uplink = True  # next bundle at t=61 says: "died" is 36 s old
    site.run_until(61.0)

    assert site.changes("r1") == [
        (UNKNOWN, UP, 1.0, "bundle received (seq 1)"),
        (UP, DOWN, 23.0, RELAY_SILENT_3),
        (DOWN, UP, 61.0, "bundle received (seq 61)"),
    ]
    assert site.changes("alive")[1:] == [
        (UP, UNREACHABLE, 23.0, "relay r1 down"),
        (UNREACHABLE, UP, 61.0, "beat received (was unreachable for 38.0 s)"),
    ]
    assert site.changes("died")[1:] == [
        (UP, UNREACHABLE, 23.0, "relay r1 down"),
        (UNREACHABLE, DOWN, 40.0, SILENT_15),  # died at 25 + 15, not when r1 came back at 61
    ]


def test_host_missing_from_revived_relays_first_bundles_is_not_down_until_a_timeout_after_the_return() -> None:
    site = one_relay_site()
    site.leaf("late", "r1", first_beat=2.5)  # beats at 2.5, 7.5, ...: not in a bundle at 61 or 62
    site.leaf("gone", "r1", first_beat=2.5)
    site.run_until(20.5)
    site.relays["r1"].alive = False
    site.leaves["gone"].alive = False
    site.run_until(60.0)
    site.restart_relay("r1", "b2")  # flushes from 61; "late" beats again at 62.5
    site.run_until(100.0)

    assert [to for _, to, _, _ in site.changes("late")] == [UP, UNREACHABLE, UNKNOWN, UP]
    assert site.changes("gone")[1:] == [
        (UP, UNREACHABLE, 23.0, "relay r1 down"),
        (UNREACHABLE, UNKNOWN, 61.0, "path is back; no news yet"),
        (UNKNOWN, DOWN, 76.0, "no beat for 58.5 s (interval 5 s × 3)"),  # a full timeout after r1 came back
    ]


def test_child_relay_missing_from_revived_parents_first_bundle_is_not_down() -> None:
    site = Site()
    site.relay("r0")
    site.relay("r1", parent="r0")
    site.relay("r2", flush_s=2.0, parent="r1")  # flushes at even seconds
    site.leaf("h2", "r2")
    site.run_until(20.25)
    site.relays["r1"].alive = False
    site.run_until(40.75)
    site.restart_relay("r1", "b2")  # its bundle at 41.75 (r0's at 42) knows nothing of r2; the next one does
    site.run_until(80.0)

    assert [(t.subject, t.to_state) for t in site.log if t.to_state == DOWN and t.event == Event.TRANSITION] == [
        ("r1", DOWN)
    ]
    assert site.changes("r2")[1:] == [
        (UP, UNREACHABLE, 23.0, "relay r1 down"),
        (UNREACHABLE, UNKNOWN, 42.0, "path is back; no news yet"),
        (UNKNOWN, UP, 43.0, "bundle received (seq 21)"),
    ]
    assert [to for _, to, _, _ in site.changes("h2")] == [UP, UNREACHABLE, UNKNOWN, UP]


# ------------------------------------------------------------------ 2. a blind monitor decides nothing


def test_no_down_while_disconnected_and_grace_after_reconnect() -> None:
    site = one_relay_site("alive", "died")
    site.relay("r2", parent="r1")
    site.leaf("behind-r2", "r2")
    site.leaf("direct", None, first_beat=0.5)
    site.run_until(20.75)
    site.set_connected(False)  # the monitor last hears r1 (and r2 in it) at 20 and "direct" at 20.5
    site.leaves["died"].alive = False  # last beat at 20
    site.run_until(50.5)
    site.relays["r2"].alive = False
    site.leaves["direct"].alive = False
    assert site.detector.next_deadline() is None
    site.run_until(100.25)
    assert [t for t in site.log if t.at > 1.0] == []  # nothing at all while disconnected

    site.set_connected(True)  # grace: nobody is down before 100.25 + their own timeout
    site.run_until(200.0)

    assert [(t.subject, t.from_state, t.to_state, t.at, t.reason) for t in site.log if t.at > 1.0] == [
        ("r2", UP, DOWN, 103.25, "no bundle for 53.2 s (flush 1 s × 3)"),  # r1 kept its last bundle, from 50
        ("behind-r2", UP, UNREACHABLE, 103.25, "relay r2 down"),
        ("direct", UP, DOWN, 115.25, "no beat for 94.8 s (interval 5 s × 3)"),
        ("died", UP, DOWN, 115.25, "no beat for 95.2 s (interval 5 s × 3)"),  # decided once r1 spoke at 116
    ]


def test_a_monitor_behind_its_input_earns_grace_at_every_pass_until_its_episode_is_too_old() -> None:
    lag = Behind(grace_s=10.0)
    assert lag.still_behind(100.0)
    assert lag.still_behind(109.9)
    assert lag.graced(105.0)
    assert not lag.still_behind(110.0)  # behind for 10 s: it decides anyway
    assert not lag.graced(110.0)
    assert (lag.passes, lag.passes_past_grace, lag.total) == (3, 1, 3)
    lag.caught_up()
    assert not lag.graced(150.0)
    assert lag.still_behind(200.0)  # a new episode earns grace again
    assert (lag.passes, lag.total) == (1, 4)


def test_a_relay_whose_bundles_wait_unread_behind_our_backlog_is_not_down_until_the_grace_ends() -> None:
    site = one_relay_site("h1")
    site.run_until(20.5)  # r1's bundles reach the monitor at 1, 2, ... 20
    site.network = False  # from here its bundles wait in our backlog: the monitor is behind, not r1 silent
    lag = Behind(grace_s=10.0)
    t = 20.5
    while t < 40.0:  # what `Ingest.catch_up` does at every expiry pass that finds input still waiting
        if lag.still_behind(t):
            site.detector.regain_sight(t)
        site.run_until(t)
        t += 0.5
    # Grace was renewed up to 30.0 (the episode began at 20.5): r1 is judged from its last renewal on.
    assert [(t.subject, t.from_state, t.to_state, t.at) for t in site.log if t.at > 1.0] == [
        ("r1", UP, DOWN, 33.0),
        ("h1", UP, UNREACHABLE, 33.0),
    ]


def test_total_silence_from_all_relays_means_blind_not_down() -> None:
    site = Site()
    for relay_id in ("r1", "r2"):
        site.relay(relay_id)
        site.leaf(f"{relay_id}-a", relay_id)
        site.leaf(f"{relay_id}-b", relay_id)
    site.run_until(20.5)
    site.network = False  # the monitor's own network is cut: no bundle from anyone, no MQTT disconnect
    site.run_until(22.0)
    assert site.detector.blind  # silence from all is noticed at 20 + 2 flushes, before any relay's deadline
    site.leaves["r1-b"].alive = False  # last beat at 35, heard by r1 only
    site.run_until(35.5)
    site.relays["r2"].alive = False  # for real, this time
    site.run_until(100.5)
    assert site.detector.next_deadline() is None
    assert [t for t in site.log if t.at > 1.0] == []

    site.network = True  # r1's next bundle at 101 ends the blindness: grace until 101 + timeout
    site.run_until(200.0)

    assert site.changes("r2")[1:] == [(UP, DOWN, 104.0, "no bundle for 84.0 s (flush 1 s × 3)")]  # last heard at 20
    assert [(t.subject, t.to_state, t.at) for t in site.log if t.at > 1.0] == [
        ("r2", DOWN, 104.0),
        ("r2-a", UNREACHABLE, 104.0),
        ("r2-b", UNREACHABLE, 104.0),
        ("r1-b", DOWN, 116.0),
    ]


def test_total_silence_with_mixed_flush_rates_means_blind_not_down() -> None:
    site = Site()
    site.relay("fast", flush_s=1.0)
    site.relay("slow", flush_s=10.0)
    site.leaf("h1", "fast")
    site.leaf("h2", "slow")
    site.run_until(30.5)
    site.network = False  # nothing from anyone: the fast relay is no more dead than the slow one
    site.run_until(100.0)
    assert [t for t in site.log if t.at > 10.0] == []


# ----------------------------------------------------------------- 3. monitor restart without a storm


def test_restart_restores_state_and_grace_prevents_false_downs() -> None:
    site = one_relay_site("alive", "died")
    site.run_until(50.5)
    hosts, relays = site.snapshot()
    site.connected = False  # the monitor is gone; relay and leaves carry on
    site.run_until(100.5)
    site.leaves["died"].alive = False  # last beat at 100
    site.run_until(200.0)
    before = len(site.log)

    site.restart_monitor(hosts, relays)  # the clock is the same clock; everything in the snapshot is old
    stale = site.delivered[-1]  # QoS 1: a bundle the old monitor already had comes again
    assert site.deliver(stale) == []
    site.run_until(300.0)

    assert site.detector.ignored == {"stale_bundle": 1}
    new = site.log[before:]
    assert [(t.subject, t.from_state, t.to_state, t.at, t.reason) for t in new] == [
        ("died", UP, DOWN, 215.0, "no beat for 115.0 s (interval 5 s × 3)"),  # not before 200 + 15
    ]


# --------------------------------------------------------------------------------- 4. relay restart


def test_new_boot_resets_seq_and_missing_leaf_keeps_its_deadline() -> None:
    site = one_relay_site("steady")
    site.leaf("quiet", "r1", first_beat=3.0)  # beats at 3, 8, 13, 18, then stops
    site.run_until(20.5)
    site.leaves["quiet"].alive = False
    site.restart_relay("r1", "b2")  # fast restart: its first bundle at 21.5 is seq 1 and knows only "steady"
    site.run_until(21.5)

    (restart,) = site.events("r1", Event.RESTART)
    assert (restart.at, restart.reason, restart.from_state, restart.to_state) == (
        21.5, "relay restarted (boot b1 → b2)", UP, UP
    )  # fmt: skip
    assert site.detector.relays["r1"].seq == 1
    assert site.state("quiet") == UP
    assert site.detector.deadline_of(site.detector.hosts["quiet"]) == 33.0  # 18 + 15, as before the restart

    site.run_until(60.0)
    assert site.changes("quiet")[1:] == [(UP, DOWN, 33.0, SILENT_15)]
    assert site.changes("steady") == [(UNKNOWN, UP, 1.0, "beat received")]
    assert site.changes("r1") == [(UNKNOWN, UP, 1.0, "bundle received (seq 1)")]
    assert "stale_bundle" not in site.detector.ignored


# --------------------------------------------------------------------- 5. order, duplicates, restarts


@pytest.mark.parametrize("site_wire", [1], indirect=True)  # it reads ages of hosts a delta leaves out
def test_duplicate_or_older_bundle_never_moves_host_back() -> None:
    site = one_relay_site("died", "cut-off")
    site.run_until(10.5)
    site.leaves["died"].alive = False  # last beat at 10
    site.run_until(30.5)
    site.relays["r1"].alive = False  # last bundle at 30
    site.run_until(40.0)
    assert site.changes("died")[1:] == [(UP, DOWN, 25.0, SILENT_15)]
    assert site.changes("cut-off")[1:] == [(UP, UNREACHABLE, 33.0, "relay r1 down")]
    log = list(site.log)
    old, last = site.delivered[10], site.delivered[-1]
    assert (old.seq, {e.id: e.age_ms for e in old.hosts}) == (11, {"died": 1000, "cut-off": 1000})
    assert (last.seq, {e.id: e.age_ms for e in last.hosts}) == (30, {"died": 20000, "cut-off": 0})

    # QoS 1 redelivery, 10 s late: taken at face value, these would say "cut-off" was seen at 40 and
    # "died" at 29, and bring r1 back.
    assert site.deliver(last) == []
    assert site.deliver(old) == []
    assert site.deliver(site.delivered[20]) == []
    site.run_until(60.0)

    assert site.log == log
    assert (site.state("died"), site.state("cut-off"), site.state("r1")) == (DOWN, UNREACHABLE, DOWN)
    assert site.detector.ignored == {"stale_bundle": 3}


def test_bundle_from_a_retired_boot_is_ignored() -> None:
    site = one_relay_site("h1")
    site.run_until(10.5)
    old_boot = site.delivered[-1]
    site.restart_relay("r1", "b2")
    site.run_until(12.0)
    site.leaves["h1"].alive = False
    site.run_until(40.0)
    assert site.changes("h1")[1:] == [(UP, DOWN, 25.0, SILENT_15)]

    assert site.deliver(old_boot) == []

    assert site.state("h1") == DOWN
    assert site.detector.ignored == {"retired_boot": 1}


def test_seq_drop_records_restart_event() -> None:
    site = one_relay_site("h1")
    site.run_until(40.5)  # beats seq 1..9 at 0..40
    site.leaves["h1"].seq = 0  # the leaf restarted between beats: its next beat is seq 1
    site.run_until(60.0)

    (restart,) = site.events("h1", Event.RESTART)
    assert (restart.kind, restart.from_state, restart.to_state, restart.at, restart.reason, restart.relay) == (
        Kind.HOST, UP, UP, 45.0, "leaf restarted (seq 9 → 1)", "r1"
    )  # fmt: skip
    assert site.changes("h1") == [(UNKNOWN, UP, 1.0, "beat received")]  # no deadline was missed


# ---------------------------------------------------------------------------------- 6. two paths


def test_host_heard_through_two_relays_follows_freshest_and_survives_one_relay_death_without_flapping() -> None:
    site = Site()
    site.relay("r1", flush_s=0.5)  # first to report h1
    site.relay("r2")
    site.leaf("h1", "r1", "r2")
    site.run_until(30.25)
    assert site.detector.hosts["h1"].via == "r1"

    site.leaves["h1"].via = ("r2",)  # the leaf loses its link to r1 only: r2 now has the freshest news
    site.run_until(50.25)
    assert site.detector.hosts["h1"].via == "r2"
    site.leaves["h1"].via = ("r1", "r2")  # both hear it again: no reason to switch back and forth
    site.run_until(60.25)
    assert site.detector.hosts["h1"].via == "r2"

    site.relays["r2"].alive = False
    site.run_until(100.25)
    assert site.changes("r2")[1:] == [(UP, DOWN, 63.0, RELAY_SILENT_3)]
    assert site.detector.hosts["h1"].via == "r1"
    assert site.changes("h1") == [(UNKNOWN, UP, 0.5, "beat received")]  # one path died: no change at all

    site.relays["r1"].alive = False  # now no path is left
    site.run_until(150.0)
    assert site.changes("h1")[1:] == [(UP, UNREACHABLE, 101.5, "relay r1 down")]  # r1: 100 + 0.5 s × 3


def test_host_heard_through_two_relays_is_down_only_when_no_path_has_seen_it() -> None:
    site = Site()
    site.relay("r1")
    site.relay("r2")
    site.leaf("h1", "r1", "r2")
    site.run_until(20.5)
    site.leaves["h1"].via = ("r2",)
    site.run_until(50.5)
    assert site.changes("h1") == [(UNKNOWN, UP, 1.0, "beat received")]
    site.leaves["h1"].alive = False  # last beat at 50
    site.run_until(80.0)
    assert site.changes("h1")[1:] == [(UP, DOWN, 65.0, SILENT_15)]


# ---------------------------------------------------------------------------------- 7. relay trees


def tree_site() -> Site:
    """r0 ← r1 ← r2, one leaf on each."""
    site = Site()
    site.relay("r0")
    site.relay("r1", parent="r0")
    site.relay("r2", parent="r1")
    for n in range(3):
        site.leaf(f"h{n}", f"r{n}")
    return site


def test_three_level_tree_middle_relay_death_marks_subtree_unreachable_pointing_at_it() -> None:
    site = tree_site()
    site.run_until(20.5)
    assert {r: site.detector.relays[r].parent for r in ("r0", "r1", "r2")} == {"r0": None, "r1": "r0", "r2": "r1"}
    assert {s: site.state(s) for s in ("r0", "r1", "r2", "h0", "h1", "h2")} == dict.fromkeys(
        ("r0", "r1", "r2", "h0", "h1", "h2"), UP
    )
    site.relays["r1"].alive = False  # r0 keeps folding r1's last bundle, ever older
    site.run_until(60.0)

    (down,) = [t for t in site.log if t.to_state == DOWN]
    assert (down.subject, down.at, down.reason, down.relay) == ("r1", 23.0, RELAY_SILENT_3, "r0")
    assert sorted((t.subject, t.to_state, t.at, t.reason, t.relay) for t in site.batch_of(down)) == [
        ("h1", UNREACHABLE, 23.0, "relay r1 down", "r1"),
        ("h2", UNREACHABLE, 23.0, "relay r1 down", "r1"),
        ("r1", DOWN, 23.0, RELAY_SILENT_3, "r0"),
        ("r2", UNREACHABLE, 23.0, "relay r1 down", "r1"),
    ]
    assert site.detector.nearest_dead_relay("r2") == "r1"
    assert site.changes("r0") == [(UNKNOWN, UP, 1.0, "bundle received (seq 1)")]
    assert site.changes("h0") == [(UNKNOWN, UP, 1.0, "beat received")]

    site.restart_relay("r1", "b2")  # r2 was alive all along; its bundles reach r0 again through r1
    site.run_until(100.0)
    assert {s: site.state(s) for s in ("r1", "r2", "h1", "h2")} == dict.fromkeys(("r1", "r2", "h1", "h2"), UP)
    assert not [t for t in site.log if t.to_state == DOWN and t.subject != "r1"]


def test_three_level_tree_leaf_relay_death_blames_only_itself() -> None:
    site = tree_site()
    site.run_until(20.5)
    site.relays["r2"].alive = False
    site.run_until(60.0)
    assert [(t.subject, t.to_state, t.at, t.reason, t.relay) for t in site.log if t.at > 1.0] == [
        ("r2", DOWN, 23.0, RELAY_SILENT_3, "r1"),
        ("h2", UNREACHABLE, 23.0, "relay r2 down", "r2"),
    ]


def test_revived_relay_leaves_what_is_behind_a_still_dead_child_unreachable() -> None:
    site = Site()
    site.relay("r1")
    site.relay("r2", parent="r1")
    site.relay("r3", parent="r2")
    site.leaf("h3", "r3")
    site.run_until(20.25)
    site.relays["r2"].alive = False
    site.run_until(30.25)
    site.relays["r1"].alive = False
    site.run_until(40.0)
    site.restart_relay("r1", "b2")  # r1 is back; r2 is still dead, so r3 and h3 are still cut off
    site.run_until(80.0)

    assert site.changes("r2")[1:] == [(UP, DOWN, 23.0, RELAY_SILENT_3)]
    assert site.changes("r3")[1:] == [(UP, UNREACHABLE, 23.0, "relay r2 down")]
    assert site.changes("h3")[1:] == [(UP, UNREACHABLE, 23.0, "relay r2 down")]
    assert site.detector.nearest_dead_relay("r3") == "r2"


def test_a_new_relays_first_bundle_read_late_is_no_death_when_its_next_one_comes_with_it() -> None:
    """The monitor holds a new relay's first bundle until the second confirms its clock; behind its
    input, it reads both after the first is already a relay timeout old."""
    d = Detector(Policy(misses=3), 0.0)
    entry = HostEntry("h1", 1, 0, 5000, LeafStatus.OK)
    out = d.observe(Bundle("r1", "b", 1, 1000, (entry,)), 10.0, sent=5.0)  # 5 s old: past its 3 s timeout
    out += d.observe(Bundle("r1", "b", 2, 1000, (entry._replace(age_ms=1000),)), 10.0, sent=9.5)
    out += d.expire(10.0)
    assert [(t.subject, t.to_state) for t in out if t.kind is Kind.RELAY] == [("r1", UP)]
    # Alone, the late first bundle is judged at the next expiry pass: no newer news came.
    d.observe(Bundle("r2", "b", 1, 1000, (HostEntry("h2", 1, 0, 5000, LeafStatus.OK),)), 10.0, sent=5.0)
    assert [(t.subject, t.to_state, t.reason) for t in d.expire(10.0) if t.kind is Kind.RELAY] == [
        ("r2", DOWN, RELAY_SILENT_3)
    ]


def test_relay_first_heard_through_a_dead_parent_is_unreachable_not_down() -> None:
    site = Site()
    site.relay("r1", flush_s=4.0)
    site.relay("r3", parent="r1")
    site.relay("r4", parent="r3")
    site.leaf("e", "r4")
    site.run_until(1.5)
    site.relays["r3"].alive = False  # its only bundle, from t=1, reaches the monitor inside r1's at t=4
    site.run_until(30.0)

    assert site.changes("r3") == [(UNKNOWN, DOWN, 4.0, RELAY_SILENT_3)]
    assert site.changes("r4") == [(UNKNOWN, UNREACHABLE, 4.0, "relay r3 down")]
    assert site.changes("e") == [(UNKNOWN, UP, 4.0, "beat received"), (UP, UNREACHABLE, 15.0, "relay r3 down")]
    assert site.detector.nearest_dead_relay("r4") == "r3"


def test_child_relay_back_behind_revived_parent_is_down_if_its_age_says_it_died_and_its_hosts_stay_unreachable() -> (
    None
):
    site = tree_site()
    site.run_until(20.5)
    site.relays["r0"].uplink = False  # the whole tree keeps running; the monitor hears none of it
    site.run_until(30.5)
    site.relays["r2"].alive = False  # last bundle at 30, kept by r1 from then on
    site.run_until(60.5)
    site.relays["r0"].uplink = True
    site.run_until(80.0)

    assert site.changes("r2")[1:] == [
        (UP, UNREACHABLE, 23.0, "relay r0 down"),
        (UNREACHABLE, DOWN, 33.0, RELAY_SILENT_3),  # died at 30 + 3, as r1's copy of its bundle says
    ]
    assert site.changes("h2")[1:] == [(UP, UNREACHABLE, 23.0, "relay r0 down")]  # its silence is r2's
    assert site.detector.nearest_dead_relay("r2") == "r2"
    assert {s: site.state(s) for s in ("r0", "r1", "h0", "h1")} == dict.fromkeys(("r0", "r1", "h0", "h1"), UP)


# ------------------------------------------------------------------------------------- 8. flapping


def test_flapping_flagged_after_k_changes_and_cleared_with_hysteresis() -> None:
    policy = Policy(flap_start=4, flap_stop=2, flap_window_s=100.0)
    d = Detector(policy, 0.0)
    out: list[Transition] = []

    def beat(t: float) -> None:
        out.extend(d.expire(t))
        out.extend(d.observe_beat("h1", Beat(interval_s=1.0), t))

    beat(1.0)  # change 1: up
    out.extend(d.expire(4.0))  # change 2: down
    beat(10.0)  # change 3: up
    out.extend(d.expire(13.0))  # change 4: down, and flapping
    (start,) = [t for t in out if t.event == Event.FLAPPING_START]
    assert (start.at, start.from_state, start.to_state, start.reason) == (
        13.0,
        DOWN,
        DOWN,
        "4 state changes within 100 s",
    )
    assert (d.flapping_tally[Kind.HOST], d.tally[Kind.HOST][DOWN]) == (1, 1)
    for t in range(20, 110):  # change 5 at 20, then steady
        beat(float(t))
    assert not [t for t in out if t.event == Event.FLAPPING_END]  # at 109: changes at 10, 13, 20 in the window
    beat(110.0)  # 10 leaves the window: 2 left

    (end,) = [t for t in out if t.event == Event.FLAPPING_END]
    assert (end.at, end.from_state, end.to_state, end.reason) == (110.0, UP, UP, "2 state changes within 100 s")
    assert (d.flapping_tally[Kind.HOST], d.tally[Kind.HOST][UP]) == (0, 1)
    assert d.tally_faults() == []
    assert [(t.to_state, t.at) for t in out if t.event == Event.TRANSITION] == [
        (UP, 1.0), (DOWN, 4.0), (UP, 10.0), (DOWN, 13.0), (UP, 20.0)
    ]  # fmt: skip


def test_flapping_is_not_flagged_below_k_changes() -> None:
    d = Detector(Policy(flap_start=4, flap_stop=2, flap_window_s=100.0), 0.0)
    out = d.observe_beat("h1", Beat(interval_s=1.0), 1.0) + d.expire(4.0) + d.observe_beat("h1", Beat(), 10.0)
    assert [t.event for t in out] == [Event.TRANSITION] * 3


# ------------------------------------------------------------------------------- 9. per-host timing


def test_misses_override_by_glob() -> None:
    policy = Policy(misses_by_glob=(("db-old-*", 2), ("db-*", 5)))
    d = Detector(policy, 0.0)
    for host in ("web-1", "db-1", "db-old-1"):
        d.observe_beat(host, Beat(), 1.0)  # no declared interval: the default 5 s
    out = d.expire(100.0)
    assert [(t.subject, t.to_state, t.at, t.reason) for t in out] == [
        ("db-old-1", DOWN, 11.0, "no beat for 10.0 s (interval 5 s × 2)"),
        ("web-1", DOWN, 16.0, SILENT_15),
        ("db-1", DOWN, 26.0, "no beat for 25.0 s (interval 5 s × 5)"),
    ]


def test_declared_interval_sets_the_timeout() -> None:
    d = Detector(Policy(), 0.0)
    d.observe_beat("h1", Beat(interval_s=0.5), 1.0)
    assert d.next_deadline() == 2.5
    assert [(t.at, t.reason) for t in d.expire(2.5)] == [(2.5, "no beat for 1.5 s (interval 0.5 s × 3)")]


def test_adaptive_phi_timeout_tracks_observed_intervals() -> None:
    adaptive, fixed = Detector(Policy(adaptive=True), 0.0), Detector(Policy(), 0.0)
    seq = 0

    def beat(t: float) -> None:
        nonlocal seq
        seq += 1
        for d in (adaptive, fixed):
            assert d.expire(t) == []
            d.observe_beat("h1", Beat(seq=seq, interval_s=10.0), t)  # it says 10 s but beats faster

    t = 0.0
    for _ in range(5):
        t += 2.0
        beat(t)
    host = adaptive.hosts["h1"]
    assert adaptive.timeout_s(host) == 30.0  # too few samples yet: the declared interval × misses
    for _ in range(20):
        t += 2.0
        beat(t)
    slow = adaptive.timeout_s(host)
    assert 2.0 < slow <= 5.0  # beats every 2 s: a little more than one gap
    for _ in range(60):
        t += 1.0
        beat(t)
    fast = adaptive.timeout_s(host)
    assert 1.0 < fast <= 2.5
    assert fast < slow
    assert fixed.timeout_s(fixed.hosts["h1"]) == 30.0

    (down,) = adaptive.expire(t + 5.0)
    assert (down.to_state, down.at) == (DOWN, t + fast)
    assert down.reason == f"no beat for {fast:.1f} s (phi ≥ 8)"
    assert fixed.expire(t + 5.0) == []


# ------------------------------------------------------------------------------ 10. reasons, timing


def test_reasons_are_human_readable() -> None:
    site = one_relay_site("h1", "h2")
    site.leaf("h3", "r1", first_beat=3.0)
    site.run_until(40.5)  # h1 beats seq 1..9
    site.leaves["h1"].seq = 0
    site.leaves["h2"].alive = False  # last beat at 40
    site.leaves["h3"].status = LeafStatus.STOPPING
    site.run_until(60.5)
    site.relays["r1"].alive = False
    site.run_until(70.0)
    site.restart_relay("r1", "b2")
    site.run_until(71.0)
    site.relays["r1"].alive = False
    site.record(site.detector.relay_offline("r1", 71.5))

    reasons = [(t.subject, t.reason) for t in site.log]
    assert reasons == [
        ("r1", "bundle received (seq 1)"),
        ("h1", "beat received"),
        ("h2", "beat received"),
        ("h3", "beat received"),
        ("h3", "leaf said it is stopping"),
        ("h1", "leaf restarted (seq 9 → 1)"),
        ("h2", "no beat for 15.0 s (interval 5 s × 3)"),
        ("r1", "no bundle for 3.0 s (flush 1 s × 3)"),
        ("h1", "relay r1 down"),
        ("r1", "relay restarted (boot b1 → b2)"),
        ("r1", "bundle received (seq 1)"),
        ("h1", "beat received (was unreachable for 8.0 s)"),
        ("r1", LAST_WILL),
        ("h1", "relay r1 down"),
    ]


def test_host_down_at_deadline_not_at_tick() -> None:
    d = Detector(Policy(), 0.0)
    d.observe_beat("h1", Beat(seq=1), 2.0)
    assert d.next_deadline() == 17.0
    assert d.expire(16.999) == []
    (down,) = d.expire(d.next_deadline() or 0.0)
    assert (down.to_state, down.at) == (DOWN, 17.0)
    assert d.next_deadline() is None


def test_host_behind_relay_down_at_its_deadline_even_when_the_confirming_bundle_comes_later() -> None:
    site = one_relay_site()
    site.leaf("h1", "r1", first_beat=0.25)
    site.run_until(10.0)
    site.leaves["h1"].alive = False  # last beat 5.25: due at 20.25; r1's next bundle is at 21
    site.run_until(20.75)
    assert site.state("h1") == UP  # r1 has not spoken since the deadline: the silence may be r1's
    site.run_until(21.0)
    assert site.changes("h1")[1:] == [(UP, DOWN, 20.25, SILENT_15)]


def test_stopping_beat_means_stopped_not_down() -> None:
    d = Detector(Policy(), 0.0)
    d.observe_beat("h1", Beat(seq=1), 1.0)
    (stopped,) = d.observe_beat("h1", Beat(seq=2, status=LeafStatus.STOPPING), 3.0)  # seq 2: no restart
    assert (stopped.from_state, stopped.to_state, stopped.at, stopped.reason) == (
        UP, STOPPED, 3.0, "leaf said it is stopping"
    )  # fmt: skip
    assert d.next_deadline() is None or d.expire(d.next_deadline() or 0.0) == []
    assert d.expire(1000.0) == []
    restart, back = d.observe_beat("h1", Beat(seq=1), 2000.0)
    assert (restart.event, back.event) == (Event.RESTART, Event.TRANSITION)
    assert (back.from_state, back.to_state, back.reason) == (STOPPED, UP, "beat received")


def test_stopping_beat_through_a_relay_is_stopped_at_the_time_the_leaf_said_it() -> None:
    site = one_relay_site()
    site.leaf("h1", "r1", first_beat=0.25)
    site.run_until(5.0)
    site.leaves["h1"].status = LeafStatus.STOPPING
    site.run_until(5.5)  # the stopping beat at 5.25, in the bundle at 6
    site.leaves["h1"].alive = False
    site.run_until(100.0)
    assert site.changes("h1")[1:] == [(UP, STOPPED, 5.25, "leaf said it is stopping")]


def test_direct_beats_have_no_relay() -> None:
    site = one_relay_site("behind")
    site.leaf("direct", None, first_beat=0.5)
    site.run_until(20.75)
    site.leaves["direct"].alive = False  # last beat at 20.5
    site.relays["r1"].alive = False
    site.record(site.detector.relay_offline("r1", 21.0))
    site.run_until(40.0)

    assert site.detector.hosts["direct"].via is None
    assert [(t.to_state, t.at, t.relay) for t in site.log if t.subject == "direct"] == [
        (UP, 0.5, None),
        (DOWN, 35.5, None),
    ]
    assert site.changes("behind")[1:] == [(UP, UNREACHABLE, 21.0, "relay r1 down")]


@pytest.mark.parametrize("bad", [{"misses": 0}, {"flap_start": 3, "flap_stop": 3}, {"phi_threshold": 0.0}])
def test_policy_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(SettingsError, match="must be"):
        Policy(**bad)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- state machine

SM_POLICY = Policy()
# r1 ← r3 ← r4 and r2 at the top; leaf "b" beats to two relays, "d" straight to the monitor.
SM_RELAYS: dict[str, tuple[str | None, float]] = {
    "r1": (None, 1.0),
    "r2": (None, 0.5),
    "r3": ("r1", 1.0),
    "r4": ("r3", 1.0),
}
SM_LEAVES: dict[str, tuple[tuple[str | None, ...], float]] = {
    "a": (("r1",), 2.0),
    "b": (("r1", "r2"), 1.0),
    "c": (("r3",), 2.0),
    "d": ((None,), 1.5),
    "e": (("r4",), 2.0),
}


def sm_routes(subject: str) -> list[set[str]]:
    """The relays between a subject and the monitor, one set per route, by the site's wiring."""
    starts = list(SM_LEAVES[subject][0]) if subject in SM_LEAVES else [SM_RELAYS[subject][0]]
    routes = []
    for relay_id in starts:
        route: set[str] = set()
        while relay_id is not None:
            route.add(relay_id)
            relay_id = SM_RELAYS[relay_id][0]
        routes.append(route)
    return routes


def sm_path(subject: str) -> set[str]:
    return set().union(*sm_routes(subject))


def sm_timeout(subject: str) -> float:
    interval = SM_LEAVES[subject][1] if subject in SM_LEAVES else SM_RELAYS[subject][1]
    return interval * SM_POLICY.misses


class DetectorMachine(RuleBasedStateMachine):
    """Arbitrary interleavings of beats, flushes (late, duplicated, reordered), relay deaths and
    new boots, last wills, monitor disconnects and time steps, checked against a small model."""

    # Per-host work a mass event owes (a relay's hosts): None, done within the call; a number, at
    # most that many hosts per call, the rest left owed across later inputs (`expire` calls are
    # repeated until nothing is due, as the monitor's expiry does), and checked against a twin that
    # gets the same inputs with no limit.
    limit: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.detector = Detector(SM_POLICY, 0.0)
        self.twin = Detector(SM_POLICY, 0.0)  # the same inputs, every mass event done at once
        self.history: dict[str, list[Transition]] = {}
        self.twin_history: dict[str, list[Transition]] = {}
        self.twin_out: list[Transition] = []  # the twin's answer to the last input
        self.now = 0.0
        self.calls: list[tuple[str, tuple[object, ...], list[Transition]]] = []
        # The site.
        self.asm = {r: self.assembler(r, f"{r}-0", flush) for r, (_, flush) in SM_RELAYS.items()}
        self.boots = dict.fromkeys(SM_RELAYS, 0)
        self.relay_alive = dict.fromkeys(SM_RELAYS, True)
        self.next_flush = {r: flush for r, (_, flush) in SM_RELAYS.items()}
        self.leaf_alive = dict.fromkeys(SM_LEAVES, True)
        self.seq = dict.fromkeys(SM_LEAVES, 0)
        self.next_beat = dict.fromkeys(SM_LEAVES, 0.0)
        self.in_flight: list[Bundle] = []  # published, not yet delivered (late, reordered)
        self.sent: list[bytes] = []  # every bundle ever delivered, encoded, for redelivery
        # Those of `sent` the detector refused as `future_seq` (a seq further ahead than its relay
        # could have sent since it was last heard): a later delivery of one may be its first news.
        self.refused: set[int] = set()
        # The model.
        self.connected = True
        self.grace_from = 0.0
        self.state: dict[str, State] = {}
        self.last_at: dict[str, float] = {}

    def assembler(self, relay_id: str, boot: str, flush_s: float) -> Assembler:
        return Assembler(relay_id, boot, flush_s, SM_POLICY.default_interval_s)

    # --------------------------------------------------------------------------- the one door

    def call(self, name: str, *args: object) -> None:
        if self.limit is None:
            out: list[Transition] = getattr(self.detector, name)(*args)
            self.calls.append((name, args, out))
        else:
            out = []
            while True:
                step = getattr(self.detector, name)(*args, limit=self.limit)
                self.calls.append((name, args, step))
                out += step
                if name != "expire" or not self.detector.due(self.now):
                    break
            self.twin_out = getattr(self.twin, name)(*args)
            for t in self.twin_out:
                self.twin_history.setdefault(t.subject, []).append(t)
        for t in out:
            self.history.setdefault(t.subject, []).append(t)
        for relay_id in self.detector.take_resync_requests():  # the relay hears the request (or not: it is dead)
            if self.relay_alive[relay_id]:
                self.asm[relay_id].request_keyframe()
        for t in out:
            current = self.state.get(t.subject, State.UNKNOWN)
            assert t.at <= self.now, t
            if t.event != Event.TRANSITION:
                assert t.from_state == t.to_state == current, t
                continue
            assert t.from_state == current != t.to_state, t
            assert t.at >= self.last_at.get(t.subject, -math.inf), (t, self.last_at[t.subject])
            if t.to_state == DOWN:
                assert self.connected, f"{t} while disconnected"
                live = (UP, UNKNOWN, STOPPED) if name == "relay_offline" else (UP, UNKNOWN)  # a will is evidence
                assert any(
                    all(self.state.get(r, State.UNKNOWN) in live for r in route) for route in sm_routes(t.subject)
                ), f"{t} while every route to it is cut"
                if name != "relay_offline":  # a last will is evidence, not silence: grace does not apply
                    assert self.now >= self.grace_from + sm_timeout(t.subject), f"{t} within grace"
            self.state[t.subject] = t.to_state
            self.last_at[t.subject] = t.at
        if name == "expire":
            deadline = self.detector.next_deadline()
            assert deadline is None or deadline > self.now
            assert self.detector.owed == 0

    def set_connected(self, connected: bool) -> None:
        self.detector.set_connected(connected, self.now)
        self.twin.set_connected(connected, self.now)
        self.calls.append(("set_connected", (connected, self.now), []))

    def deliver(self, bundle: Bundle) -> None:
        self.sent.append(encode_bundle(bundle))
        refused = self.detector.ignored.get("future_seq", 0)
        self.call("observe", bundle, self.now)
        if self.detector.ignored.get("future_seq", 0) != refused:
            self.refused.add(len(self.sent) - 1)

    def flush(self, relay_id: str, late: bool) -> None:
        bundle = self.asm[relay_id].flush(self.now)
        parent = SM_RELAYS[relay_id][0]
        if parent is not None:
            if self.relay_alive[parent]:
                self.asm[parent].add_child(bundle, self.now)
        elif late or not self.connected:
            self.in_flight.append(bundle)  # a persistent session keeps it for a disconnected monitor
        else:
            self.deliver(bundle)

    def beat(self, leaf: str, stopping: bool = False) -> None:
        self.seq[leaf] += 1
        self.next_beat[leaf] = self.now + SM_LEAVES[leaf][1]
        beat = Beat(self.seq[leaf], SM_LEAVES[leaf][1], LeafStatus.STOPPING if stopping else LeafStatus.OK)
        for relay_id in SM_LEAVES[leaf][0]:
            if relay_id is None:
                if self.connected:
                    self.call("observe_beat", leaf, beat, self.now)
            elif self.relay_alive[relay_id]:
                self.asm[relay_id].add_beat(leaf, beat, self.now)

    # --------------------------------------------------------------------------------- rules

    @rule(leaf=st.sampled_from(sorted(SM_LEAVES)), restarted=st.booleans(), stopping=st.booleans())
    def leaf_beats(self, leaf: str, restarted: bool, stopping: bool) -> None:
        if restarted:
            self.seq[leaf] = 0
        self.beat(leaf, stopping)

    @rule(leaf=st.sampled_from(sorted(SM_LEAVES)))
    def leaf_dies_or_revives(self, leaf: str) -> None:
        self.leaf_alive[leaf] = not self.leaf_alive[leaf]

    @rule(relay_id=st.sampled_from(sorted(SM_RELAYS)), late=st.booleans())
    def relay_flushes(self, relay_id: str, late: bool) -> None:
        if self.relay_alive[relay_id]:
            self.flush(relay_id, late)

    @rule(pick=st.integers(0, 1000))
    def late_bundle_arrives(self, pick: int) -> None:
        if self.connected and self.in_flight:
            self.deliver(self.in_flight.pop(pick % len(self.in_flight)))

    @rule(pick=st.integers(0, 1000))
    def old_bundle_arrives_again(self, pick: int) -> None:
        if self.connected and self.sent:
            first = pick % len(self.sent)
            again = decode_bundle(self.sent[first])
            self.deliver(again)
            if self.boots[again.relay] <= SM_POLICY.relay_memory and first not in self.refused:  # news then, not now
                news = self.calls[-1][2] if self.limit is None else self.twin_out  # (owed work may be done first)
                assert news == [], "a bundle delivered twice must be no news the second time"

    @rule(relay_id=st.sampled_from(sorted(SM_RELAYS)))
    def relay_dies(self, relay_id: str) -> None:
        self.relay_alive[relay_id] = False

    @rule(relay_id=st.sampled_from(sorted(SM_RELAYS)))
    def relay_starts_with_new_boot(self, relay_id: str) -> None:
        if not self.relay_alive[relay_id]:
            self.boots[relay_id] += 1
            flush_s = SM_RELAYS[relay_id][1]
            boot = f"{relay_id}-{self.boots[relay_id]}"
            self.asm[relay_id] = self.assembler(relay_id, boot, flush_s)
            self.relay_alive[relay_id] = True
            self.next_flush[relay_id] = self.now + flush_s

    @rule(relay_id=st.sampled_from(sorted(SM_RELAYS)))
    def relay_last_will(self, relay_id: str) -> None:
        if self.connected and not self.relay_alive[relay_id]:
            self.call("relay_offline", relay_id, self.now)

    @rule(relay_id=st.sampled_from(sorted(SM_RELAYS)))
    def relay_stops_cleanly(self, relay_id: str) -> None:
        if self.connected and self.relay_alive[relay_id]:
            self.relay_alive[relay_id] = False
            self.call("relay_stopped", relay_id, self.now)

    @rule()
    def monitor_disconnects(self) -> None:
        if self.connected:
            self.connected = False
            self.set_connected(False)

    @rule()
    def monitor_reconnects(self) -> None:
        if not self.connected:
            self.connected = True
            self.grace_from = self.now
            self.set_connected(True)

    @rule(dt=st.integers(1, 120))
    def time_passes(self, dt: int) -> None:
        self.now += dt / 8
        self.call("expire", self.now)

    @rule()
    def time_passes_to_next_deadline(self) -> None:
        deadline = self.detector.next_deadline()
        if deadline is not None:
            self.now = max(self.now, deadline)
            self.call("expire", self.now)

    @rule(steps=st.integers(1, 60))
    def site_runs(self, steps: int) -> None:
        """Ordinary life, in quarter seconds: live leaves beat and live relays flush on cadence."""
        for _ in range(steps):
            self.now += 0.25
            for leaf in sorted(SM_LEAVES):
                if self.leaf_alive[leaf] and self.next_beat[leaf] <= self.now:
                    self.beat(leaf)
            for relay_id in ("r4", "r3", "r1", "r2"):  # children first, so their parents fold them fresh
                if self.relay_alive[relay_id] and self.next_flush[relay_id] <= self.now:
                    self.next_flush[relay_id] = self.now + SM_RELAYS[relay_id][1]
                    self.flush(relay_id, late=False)
            self.call("expire", self.now)

    # ---------------------------------------------------------------------------- invariants

    @invariant()
    def reported_states_are_the_detectors_states(self) -> None:
        tracks = {**self.detector.hosts, **self.detector.relays}
        assert {s: t.state for s, t in tracks.items()} == {s: self.state.get(s, State.UNKNOWN) for s in tracks}

    @invariant()
    def unreachable_only_behind_a_dead_relay(self) -> None:
        if self.detector.owed:
            return  # a mass event half done: its hosts are the next steps' work
        for subject, state in self.state.items():
            if state == UNREACHABLE:
                path = sm_path(subject)
                assert any(self.state.get(r) in (DOWN, UNREACHABLE) for r in path), (subject, path, self.state)

    @invariant()
    def every_state_change_is_in_the_documented_table(self) -> None:
        unlisted = {k: n for k, n in self.detector.ignored.items() if k.startswith("unlisted_transition")}
        assert unlisted == {}, "add the transition to monitor/states.py (and the README diagram) or fix it"

    @invariant()
    def columns_mirror_their_hosts(self) -> None:
        assert self.detector.column_faults() == []

    @invariant()
    def tallies_count_every_subject(self) -> None:
        assert self.detector.tally_faults() == []

    @invariant()
    def blind_while_disconnected(self) -> None:
        if not self.connected:
            assert self.detector.next_deadline() is None

    @invariant()
    def work_done_in_steps_is_the_work_done_at_once(self) -> None:
        """Each subject's decisions so far are the first of the twin's, all of them once nothing is owed."""
        if self.limit is None:
            return
        for subject, theirs in self.twin_history.items():
            mine = self.history.get(subject, [])
            assert mine == theirs[: len(mine)], subject
        if self.detector.owed == 0:
            assert self.history == self.twin_history
            tracks, twins = {**self.detector.hosts, **self.detector.relays}, {**self.twin.hosts, **self.twin.relays}
            assert {s: t.state for s, t in tracks.items()} == {s: t.state for s, t in twins.items()}

    def teardown(self) -> None:
        replay = Detector(SM_POLICY, 0.0)
        for name, args, out in self.calls:
            limit = {} if self.limit is None or name == "set_connected" else {"limit": self.limit}
            assert getattr(replay, name)(*args, **limit) == (out if name != "set_connected" else None), name
        if self.limit is not None:  # what is still owed (and what is due, for both), then all as if done at once
            for t in self.detector.expire(self.now):
                self.history.setdefault(t.subject, []).append(t)
            for t in self.twin.expire(self.now):
                self.twin_history.setdefault(t.subject, []).append(t)
            assert self.history == self.twin_history


class DeltaDetectorMachine(DetectorMachine):
    """The same site and model, with relays sending binary delta bundles and a keyframe every 2 s
    (and whenever the detector asks for one): lost, late and repeated deltas must never make the
    detector judge a host on news it missed."""

    def assembler(self, relay_id: str, boot: str, flush_s: float) -> Assembler:
        return Assembler(
            relay_id, boot, flush_s, SM_POLICY.default_interval_s, keyframe_s=2.0, version=2, booted_at=self.now
        )


class ColumnarDetectorMachine(DeltaDetectorMachine):
    """The same, with bundles as the monitor's columnar decoder hands them over (most news in
    `Bundle.beats`), beside a twin that gets every entry listed in the same order: the same
    decisions, in the same order, from every input."""

    def __init__(self) -> None:
        super().__init__()
        self.tables = Tables()
        self.listed = Detector(SM_POLICY, 0.0)

    def call(self, name: str, *args: object) -> None:
        if name in ("observe", "lost_track"):
            listed, columnar = self.tables.split(args[0])  # type: ignore[arg-type]
            theirs = getattr(self.listed, name)(listed, *args[1:])
            args = (columnar, *args[1:])
        else:
            theirs = getattr(self.listed, name)(*args)
        super().call(name, *args)
        assert self.calls[-1][2] == theirs, name

    def set_connected(self, connected: bool) -> None:
        super().set_connected(connected)
        self.listed.set_connected(connected, self.now)


class SteppedDetectorMachine(DetectorMachine):
    limit = 1


class SteppedDeltaDetectorMachine(DeltaDetectorMachine):
    limit = 1


def test_detector_machine(site_wire: int) -> None:
    """The state machine, with relays speaking version 1 (keyframes) or version 2 (deltas)."""
    machine = DetectorMachine if site_wire == 1 else DeltaDetectorMachine
    run_state_machine_as_test(machine, settings=settings(max_examples=100, stateful_step_count=40, deadline=None))


@pytest.mark.parametrize("site_wire", [2], indirect=True)
def test_detector_machine_reading_news_by_column_decides_as_reading_it_listed(site_wire: int) -> None:
    """Deltas as the monitor's decoder hands them over: the vectorised path decides exactly as the
    per-entry one, and the relays' columns always mirror their hosts."""
    run_state_machine_as_test(
        ColumnarDetectorMachine, settings=settings(max_examples=150, stateful_step_count=40, deadline=None)
    )


def test_detector_machine_with_mass_events_in_steps(site_wire: int) -> None:
    """The same, with the per-host work of mass events done one host per call and left owed across
    other inputs: every decision, its time and its order per subject are those of doing it at once."""
    machine = SteppedDetectorMachine if site_wire == 1 else SteppedDeltaDetectorMachine
    run_state_machine_as_test(machine, settings=settings(max_examples=150, stateful_step_count=40, deadline=None))


def test_leaf_with_a_constant_seq_stays_up_through_a_relay() -> None:
    """Any MQTT client may be a leaf: one that always sends `{"seq": 1}` still beats."""
    detector = Detector(Policy(misses=3), 0.0)
    assembler = Assembler("r1", "boot", 1.0, 1.0)
    out: list[Transition] = []
    for tick in range(1, 41):  # a beat every second, a flush every second, for 40 s
        now = float(tick)
        assembler.add_beat("cron-job", Beat(seq=1, interval_s=1.0), now - 0.5)
        out += detector.expire(now)
        out += detector.observe(assembler.flush(now), now)
    assert [(t.from_state, t.to_state) for t in out if t.subject == "cron-job"] == [(UNKNOWN, UP)]
    assert detector.hosts["cron-job"].last_seen == 39.5


def test_a_bundle_seq_far_in_the_future_is_ignored_and_does_not_poison_the_relay() -> None:
    detector = Detector(Policy(misses=3), 0.0)
    assert detector.observe(Bundle("r1", "b", 1, 1000, ()), 1.0)[0].to_state == UP
    assert detector.observe(Bundle("r1", "b", 10**12, 1000, ()), 2.0) == []  # forged or corrupt
    assert detector.ignored["future_seq"] == 1
    assert detector.relays["r1"].seq == 1
    for tick in range(2, 30):  # the genuine bundles keep being news: r1 never looks silent
        assert detector.observe(Bundle("r1", "b", tick, 1000, ()), 1.0 + tick) == []
        assert detector.expire(1.0 + tick) == []
    # A relay heard again after a long gap may have moved on by many flushes: that is not "future".
    detector.observe(Bundle("r1", "b", 29 + 500, 1000, ()), 30.0 + 400)
    assert detector.relays["r1"].seq == 529
    assert detector.ignored["future_seq"] == 1


# ---------------------------------------------------------------------------- missed deltas


def delta_relay(relay_id: str = "r1", boot: str = "b") -> Assembler:
    return Assembler(relay_id, boot, 1.0, 5.0, keyframe_s=1000.0, version=2)


@pytest.mark.parametrize("site_wire", [2], indirect=True)
def test_after_a_missed_delta_nothing_behind_the_relay_is_judged_until_a_keyframe_and_one_is_asked_for() -> None:
    detector = Detector(Policy(misses=3), 0.0)
    asm = delta_relay()
    asm.add_beat("h1", Beat(seq=1, interval_s=1.0), 0.0)  # timeout 3 s
    out = detector.observe(asm.flush(1.0), 1.0)
    assert [(t.subject, t.to_state) for t in out] == [("r1", UP), ("h1", UP)]
    asm.add_beat("h1", Beat(seq=2, interval_s=1.0), 1.5)  # its last beat, in a bundle that is lost:
    asm.flush(2.0)
    out = []
    for tick in range(3, 11):  # the relay keeps sending (empty) deltas: h1's deadline passes
        out += detector.expire(float(tick)) + detector.observe(asm.flush(float(tick)), float(tick))
        assert detector.take_resync_requests() == (["r1"] if tick in (3, 6, 9) else [])  # asked again every 3 s
    assert out == []
    assert detector.relays["r1"].desynced
    asm.request_keyframe()
    out = detector.observe(asm.flush(11.0), 11.0)
    # Down, dated by the beat the lost delta carried (1.5 + 3), which only the keyframe told us.
    assert [(t.subject, t.from_state, t.to_state, t.at) for t in out] == [("h1", UP, DOWN, 4.5)]
    assert not detector.relays["r1"].desynced


@pytest.mark.parametrize("site_wire", [2], indirect=True)
def test_a_host_behind_a_delta_relay_is_down_at_the_first_bundle_after_its_deadline_without_news_of_it() -> None:
    detector = Detector(Policy(misses=3), 0.0)
    asm = delta_relay()
    asm.add_beat("h1", Beat(seq=1, interval_s=1.0), 0.5)
    detector.observe(asm.flush(1.0), 1.0)
    assert detector.expire(3.5) == []  # its deadline passed (3.5), but the relay has not spoken since
    out = detector.observe(asm.flush(3.75), 3.75)  # an empty delta: the relay is alive, h1 said nothing
    assert [(t.subject, t.to_state, t.at) for t in out] == [("h1", DOWN, 3.5)]


@pytest.mark.parametrize("site_wire", [2], indirect=True)
def test_a_missed_child_delta_asks_the_top_level_relay_and_its_keyframe_resyncs_the_child() -> None:
    detector = Detector(Policy(misses=3), 0.0)
    child, top = delta_relay("r2", "c"), delta_relay("r1", "t")
    top.add_child(child.flush(0.5), 0.5)
    detector.observe(top.flush(1.0), 1.0)
    child.flush(1.5)  # lost between the child and its parent
    top.add_child(child.flush(2.5), 2.5)
    assert top.wanted_keyframes == ["r2"]
    detector.observe(top.flush(3.0), 3.0)
    assert detector.relays["r2"].desynced
    assert detector.take_resync_requests() == ["r1"]  # the relay the monitor can reach
    child.request_keyframe()  # what the parent asks of it
    top.add_child(child.flush(3.5), 3.5)
    detector.observe(top.flush(4.0), 4.0)
    assert not detector.relays["r2"].desynced


@pytest.mark.parametrize("site_wire", [2], indirect=True)
def test_a_relay_whose_keyframe_was_missed_or_that_was_restored_waits_for_one() -> None:
    detector = Detector(Policy(misses=3), 0.0)
    asm = delta_relay()
    asm.flush(1.0)  # its first bundle, a keyframe: lost
    detector.observe(asm.flush(2.0), 2.0)
    assert detector.relays["r1"].desynced
    assert detector.take_resync_requests() == ["r1"]
    hosts: list[HostSnapshot] = []
    relays = [RelaySnapshot("r1", UP, 0.0, 2.0, None, "b", 2, 1.0)]
    restored = Detector(Policy(misses=3), 10.0)
    restored.restore(hosts, relays)
    restored.observe(asm.flush(11.0), 11.0)
    assert restored.relays["r1"].desynced  # seq 3 follows 2, but what it said meanwhile is not in SQL
    asm.request_keyframe()
    restored.observe(asm.flush(12.0), 12.0)
    assert not restored.relays["r1"].desynced


def test_expire_with_a_limit_decides_a_mass_event_in_steps_with_the_same_outcome() -> None:
    def fleet() -> Detector:
        detector = Detector(Policy(misses=3), 0.0)
        for i in range(1000):
            detector.observe_beat(f"d{i:04d}", Beat(1, 1.0), 1.0 + i / 10_000)
        return detector

    whole = fleet().expire(10.0)
    stepped, steps = fleet(), []
    while out := stepped.expire(10.0, limit=300):
        steps.append(out)
    assert [len(step) for step in steps] == [300, 300, 300, 100]
    assert [t for step in steps for t in step] == whole
    assert len(whole) == 1000


def relay_tree(hosts: int) -> tuple[Detector, Bundle]:
    """`hosts` hosts behind a relay `top` (interval 1 s), as many behind its child `mid`, all up."""

    def entries(prefix: str) -> tuple[HostEntry, ...]:
        return tuple(HostEntry(f"{prefix}{i:05d}", 1, i % 300, 1000, LeafStatus.OK) for i in range(hosts))

    child = Bundle("mid", "m", 1, 1000, entries("m"))
    top = Bundle("top", "t", 1, 1000, entries("t"), children=(child,))
    detector = Detector(Policy(misses=3), 0.0)
    detector.observe(top, 1.0)
    return detector, top


MASS_EVENTS: dict[str, Callable[[Detector, int | None], list[Transition]]] = {
    "last will": lambda d, limit: d.relay_offline("top", 2.0, limit=limit),
    "silence": lambda d, limit: d.expire(10.0, limit),
    "clean stop": lambda d, limit: d.relay_stopped("top", 2.0, limit=limit),
    "back after a death": lambda d, limit: (
        d.relay_offline("top", 2.0) and d.observe(Bundle("top", "t2", 1, 1000, ()), 20.0, limit=limit)
    ),
}


@pytest.mark.parametrize("event", sorted(MASS_EVENTS))
def test_a_mass_event_done_in_steps_decides_what_it_decides_at_once_and_no_step_does_more(event: str) -> None:
    whole, _ = relay_tree(1000)
    at_once = MASS_EVENTS[event](whole, None)
    assert whole.owed == 0
    assert not whole.due(10.0 if event == "silence" else 2.0)
    stepped, _ = relay_tree(1000)
    steps = [MASS_EVENTS[event](stepped, 50)]
    owed = [stepped.owed]
    now = 10.0 if event == "silence" else 20.0 if event.startswith("back") else 2.0
    while stepped.due(now):
        steps.append(stepped.expire(now, 50))
        owed.append(stepped.owed)
    assert [t for step in steps for t in step] == at_once
    hosts_per_step = [sum(t.kind is Kind.HOST for t in step) for step in steps]
    assert max(hosts_per_step) <= 50
    assert all(a - b <= 50 for a, b in itertools.pairwise(owed))  # no step did more than its limit of slots
    assert len(steps) > 2000 * 2 // 50 // 2  # it was done in steps, not at once
    if event != "clean stop":
        assert sum(hosts_per_step) == 2000
    assert {s: t.state for s, t in stepped.hosts.items()} == {s: t.state for s, t in whole.hosts.items()}


def test_news_of_hosts_a_mass_event_still_owes_comes_after_their_owed_decision() -> None:
    """A relay died; before its hosts' part is done, a direct beat of one of them and a bundle of
    its child arrive: the owed decisions are made first, so each host's history is as if at once."""
    whole, _ = relay_tree(200)
    stepped, _ = relay_tree(200)
    direct = ("t00150", Beat(2, 1.0), 2.5)
    child = Bundle("mid", "m", 2, 1000, (HostEntry("m00199", 2, 0, 1000, LeafStatus.OK),))
    at_once = whole.relay_offline("top", 2.0) + whole.observe_beat(*direct) + whole.observe(child, 2.6)
    first = stepped.relay_offline("top", 2.0, limit=10)
    assert stepped.owed > 0
    later = stepped.observe_beat(*direct, limit=10) + stepped.observe(child, 2.6, limit=10)
    while stepped.due(2.6):
        later += stepped.expire(2.6, 10)
    assert first + later == at_once  # the beat and the bundle each found the work owed and did it first
    assert stepped.hosts["t00150"].state == UP
    assert stepped.hosts["t00150"].via is None
