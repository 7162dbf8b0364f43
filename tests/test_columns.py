"""The detector's vectorised pass over ordinary news by column (`Bundle.beats`, monitor/columns.py).

Each case feeds the same bundles to two detectors, one with the news by column and one with every
entry listed, and wants the same decisions and the same hosts; and it says which rows the
vectorised pass took (`Detector.plain_rows`) and which it left to the full path.
"""

from __future__ import annotations

from relaybeat.monitor.detector import Detector, Policy
from relaybeat.monitor.states import Event, State, Transition
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus
from tests.columnar import Tables

OK, STOPPING = LeafStatus.OK, LeafStatus.STOPPING


class Twins:
    def __init__(self, policy: Policy | None = None) -> None:
        self.columnar = Detector(policy or Policy(misses=3), 0.0)
        self.listed = Detector(policy or Policy(misses=3), 0.0)
        self.tables = Tables(listed_one_in=10**9)  # every entry by column
        self.seqs: dict[str, int] = {}

    def bundle(self, relay: str, now: float, *entries: HostEntry) -> list[Transition]:
        self.seqs[relay] = self.seqs.get(relay, 0) + 1
        listed, columnar = self.tables.split(Bundle(relay, "b", self.seqs[relay], 1000, entries))
        out = self.columnar.observe(columnar, now)
        assert out == self.listed.observe(listed, now)
        self.check()
        return out

    def expire(self, now: float) -> list[Transition]:
        out = self.columnar.expire(now)
        assert out == self.listed.expire(now)
        self.check()
        return out

    def check(self) -> None:
        assert self.columnar.column_faults() == []
        assert self.columnar.tally_faults() == []

        def fields(d: Detector) -> dict[str, tuple[object, ...]]:
            return {
                h.id: (h.state, h.since, h.last_seen, h.via, h.via_seen, h.seq, h.interval_s, h.scheduled, h.flapping)
                for h in d.hosts.values()
            }

        assert fields(self.columnar) == fields(self.listed)


def beat(host: str, seq: int | None, age_ms: int = 100, interval_ms: int = 1000, status: LeafStatus = OK) -> HostEntry:
    return HostEntry(host, seq, age_ms, interval_ms, status)


def steady(twins: Twins, hosts: tuple[str, ...] = ("a", "b", "c"), until: int = 5) -> None:
    for t in range(1, until + 1):
        twins.bundle("r1", float(t), *(beat(h, t) for h in hosts))


def test_new_beats_of_up_hosts_move_in_place_and_the_beat_already_heard_is_nothing() -> None:
    twins = Twins()
    steady(twins)
    taken = twins.columnar.plain_rows
    assert taken >= 3 * 3  # from the second or third bundle on, every row
    assert twins.columnar.hosts["a"].last_seen == 5.0 - 0.1
    twins.bundle("r1", 5.02, beat("a", 5, age_ms=110))  # the same beat, 10 ms later: no news
    assert twins.columnar.plain_rows == taken
    assert twins.columnar.hosts["a"].last_seen == 5.0 - 0.1
    assert twins.expire(7.0) == []


def test_a_higher_seq_with_older_evidence_never_moves_a_host_back() -> None:
    twins = Twins()
    steady(twins)
    taken = twins.columnar.plain_rows
    twins.bundle("r1", 5.5, beat("a", 9, age_ms=3000))  # forged or reordered: newer seq, older news
    assert twins.columnar.plain_rows == taken
    assert twins.columnar.hosts["a"].last_seen == 5.0 - 0.1


def test_changes_take_the_full_path_stopping_interval_restart() -> None:
    twins = Twins()
    steady(twins)
    taken = twins.columnar.plain_rows
    out = twins.bundle("r1", 6.0, beat("a", 6, status=STOPPING), beat("b", 6, interval_ms=2000), beat("c", 1))
    assert twins.columnar.plain_rows == taken
    assert [(t.subject, t.to_state, t.event) for t in out] == [
        ("a", State.STOPPED, Event.TRANSITION),
        ("c", State.UP, Event.RESTART),
    ]
    assert twins.columnar.hosts["b"].interval_s == 2.0
    twins.bundle("r1", 7.0, beat("b", 7, interval_ms=2000), beat("c", 2))
    assert twins.columnar.plain_rows == taken + 2  # then plain again


def test_a_flapping_host_takes_the_full_path_until_it_settles() -> None:
    twins = Twins(Policy(misses=1, flap_start=3, flap_stop=1, flap_window_s=30.0))
    t = 0.0
    for _ in range(3):  # up, then silent past its timeout, then back: flapping
        t += 1.0
        twins.bundle("r1", t, beat("a", int(t * 10), age_ms=0), beat("b", int(t * 10), age_ms=0))
        t += 3.0
        twins.bundle("r1", t, beat("b", int(t * 10), age_ms=0))
    assert twins.columnar.hosts["a"].flapping
    taken = twins.columnar.plain_rows
    t += 0.5
    twins.bundle("r1", t, beat("a", int(t * 10), age_ms=0))
    t += 0.5
    twins.bundle("r1", t, beat("a", int(t * 10), age_ms=0))
    assert twins.columnar.plain_rows == taken


def test_news_through_a_relay_that_is_not_the_hosts_path_takes_the_full_path() -> None:
    twins = Twins()
    steady(twins, hosts=("a",))
    taken = twins.columnar.plain_rows
    twins.bundle("r2", 5.2, beat("a", 5, age_ms=300))  # a second path, older news: noted, not followed
    assert twins.columnar.hosts["a"].via == "r1"
    twins.bundle("r1", 6.0, beat("a", 6))
    assert twins.columnar.plain_rows == taken + 1
    twins.bundle("r2", 9.5, beat("a", 9))  # r1 went quiet about it; much fresher through r2: it moves
    assert twins.columnar.hosts["a"].via == "r2"
    twins.bundle("r2", 10.5, beat("a", 10))
    assert twins.columnar.plain_rows == taken + 2  # and its new relay's columns take it


def test_a_host_forgotten_and_its_slot_reused_is_never_confused_with_the_newcomer() -> None:
    twins = Twins()
    steady(twins, hosts=("a", "b"))
    for d in (twins.columnar, twins.listed):
        assert d.forget_host("a")
    twins.bundle("r1", 6.0, beat("b", 6), beat("z", 1))  # z takes a's old slot
    twins.bundle("r1", 7.0, beat("b", 7), beat("z", 2))
    assert twins.columnar.hosts["z"].seq == 2
    assert "a" not in twins.columnar.hosts


def test_an_unplain_policy_reads_every_row_one_by_one() -> None:
    twins = Twins(Policy(misses=3, adaptive=True))
    steady(twins)
    assert twins.columnar.plain_rows == 0


def test_beats_keep_every_field_of_the_entries() -> None:
    tables = Tables(listed_one_in=10**9)
    entries = (beat("x", None, 5, 2500), beat("y", 7, 0, 1000, STOPPING))
    listed, columnar = tables.split(Bundle("r1", "b", 1, 1000, entries))
    assert columnar.beats is not None
    assert columnar.hosts == ()
    assert list(columnar.beats.entries()) == list(listed.hosts) == list(entries)
    assert columnar.entry_count() == 2
    grown = tables.split(Bundle("r1", "b", 2, 1000, (beat("w", 1),)))[1]
    same = tables.split(Bundle("r1", "b", 3, 1000, (beat("x", 1),)))[1]
    assert grown.beats is not None
    assert same.beats is not None
    assert grown.beats.ids is same.beats.ids is not columnar.beats.ids  # a new table object only when it grows


def test_a_slot_left_and_taken_by_another_host_of_the_same_table_is_never_read_as_the_old_host() -> None:
    """a leaves r1 for r2 and q (long in r1's id table, heard through r2) takes a's old slot in r1:
    a's next row in r1's unchanged table must not be read as q's."""
    twins = Twins()
    for t in (1.0, 2.0, 3.0):
        twins.bundle("r1", t, beat("a", 100 + int(t)), beat("b", int(t)))
        twins.bundle("r2", t + 0.1, beat("q", int(t), age_ms=0))
    for t in (4.0, 5.0):  # r1 lists q too, with older news than r2's: q stays with r2
        twins.bundle("r1", t, beat("a", 100 + int(t)), beat("b", int(t)), beat("q", 1, age_ms=2900))
        twins.bundle("r2", t + 0.1, beat("q", int(t), age_ms=0))
    twins.bundle("r1", 6.0, beat("b", 6), beat("q", 1, age_ms=3900))  # r1 stops hearing a...
    twins.bundle("r2", 6.5, beat("a", 106, age_ms=0))  # ...which r2 hears, much fresher: a moves to r2
    assert twins.columnar.hosts["a"].via == "r2"
    twins.bundle("r1", 7.5, beat("b", 7), beat("q", 7, age_ms=0))  # q is fresher through r1: it moves in
    assert twins.columnar.hosts["q"].via == "r1"
    assert twins.columnar.hosts["q"].slot == 0  # a's old slot
    twins.bundle("r1", 8.5, beat("a", 108, age_ms=0), beat("b", 8), beat("q", 8, age_ms=0))
    assert twins.columnar.hosts["q"].seq == 8


def test_stale_beats_of_a_waiting_host_move_in_place_and_a_fresh_one_makes_it_up() -> None:
    """A monitor behind its input reads every beat older than its timeout: within grace, the host waits
    (`unknown`, scheduled) and each such beat moves its evidence in place, as the full path would."""
    twins = Twins()
    for d in (twins.columnar, twins.listed):
        d.regain_sight(9.0)  # behind: grace from 9 s
    twins.bundle("r1", 10.0, beat("a", 1, age_ms=8000))  # heard at 2 s: too old for `up`, within grace
    assert twins.columnar.hosts["a"].state is State.UNKNOWN
    taken = twins.columnar.plain_rows
    twins.bundle("r1", 11.0, beat("a", 2, age_ms=8000))  # heard at 3 s: still stale, still waiting
    assert twins.columnar.plain_rows == taken + 1
    assert (twins.columnar.hosts["a"].last_seen, twins.columnar.hosts["a"].scheduled) == (3.0, 12.0)
    out = twins.bundle("r1", 11.5, beat("a", 3))  # fresh
    assert [(t.subject, t.from_state, t.to_state) for t in out] == [("a", State.UNKNOWN, State.UP)]
    assert twins.columnar.plain_rows == taken + 1


def test_a_stale_beat_past_the_grace_takes_the_full_path() -> None:
    twins = Twins()
    for d in (twins.columnar, twins.listed):
        d.regain_sight(9.0)
    twins.bundle("r1", 10.0, beat("a", 1, age_ms=8000))  # waiting until 12 s
    taken = twins.columnar.plain_rows
    out = twins.bundle("r1", 13.0, beat("a", 2, age_ms=9000))  # heard at 4 s: past the grace as well
    assert twins.columnar.plain_rows == taken
    assert [(t.subject, t.to_state) for t in out] == [("a", State.DOWN)]
