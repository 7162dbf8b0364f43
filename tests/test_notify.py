"""The pure notification core: incidents, filters, maintenance, reminders, the message and its signature.

Time is an argument (`Change.at`, `remind(now=...)`), so nothing here sleeps or patches a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relaybeat.monitor.notify import (
    BAD_STATES,
    AlertBook,
    Change,
    Notice,
    NoticeType,
    Plan,
    Target,
    incident_of,
    plan,
    remind,
    render,
    signature,
)
from relaybeat.monitor.states import Event, Kind, State

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
UP, DOWN, UNREACHABLE, UNKNOWN, STOPPED = State.UP, State.DOWN, State.UNREACHABLE, State.UNKNOWN, State.STOPPED
HOST, RELAY = Kind.HOST, Kind.RELAY
OPS = Target("ops")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def host(
    subject: str,
    a: State,
    b: State,
    t: float = 0,
    relay: str | None = "r1",
    path: tuple[str, ...] | None = None,
    **kw: object,
) -> Change:
    path = (relay,) if path is None and relay is not None else (path or ())
    return Change(
        kind=HOST,
        subject=subject,
        from_state=a,
        to_state=b,
        at=at(t),
        reason=f"{a}->{b}",
        relay=relay,
        path=path,
        **kw,  # type: ignore[arg-type]
    )


def relay(subject: str, a: State, b: State, t: float = 0, parent: str | None = None, **kw: object) -> Change:
    path = () if parent is None else (parent,)
    return Change(
        kind=RELAY,
        subject=subject,
        from_state=a,
        to_state=b,
        at=at(t),
        reason=f"{a}->{b}",
        relay=parent,
        path=path,
        **kw,  # type: ignore[arg-type]
    )


def relay_death(t: float = 0, hosts: tuple[str, ...] = ("a", "b", "c")) -> list[Change]:
    """What the detector writes when r1 dies: r1 down, then each of its hosts unreachable blaming r1."""
    return [relay("r1", UP, DOWN, t), *(host(h, UP, UNREACHABLE, t) for h in hosts)]


def relay_back(t: float, hosts: dict[str, State]) -> list[Change]:
    return [relay("r1", DOWN, UP, t), *(host(h, UNREACHABLE, s, t) for h, s in hosts.items())]


def step(book: AlertBook, changes: list[Change], targets: list[Target] | None = None) -> Plan:
    result = plan(changes, targets or [OPS], book)
    book.apply(result)
    return result


def subjects(notice: Notice) -> list[str]:
    return [item.subject for item in notice.items]


# --- incidents ----------------------------------------------------------------------------------


def test_a_relay_death_is_one_outage_listing_the_relay_and_all_its_hosts() -> None:
    book = AlertBook()
    result = step(book, relay_death())
    [notice] = result.notices
    assert (notice.type, notice.incident, notice.target) == (NoticeType.OUTAGE, "relay:r1", "ops")
    assert subjects(notice) == ["r1", "a", "b", "c"]
    assert notice.still_open == 4
    assert {alert.incident for alert in book.alerts()} == {"relay:r1"}
    assert len(book) == 4
    body = orjson.loads(render(notice, "k1"))
    assert body["hosts"] == ["a", "b", "c"]
    assert body["relay"] == "r1"
    assert body["id"] == "k1"
    assert body["summary"].startswith("relay r1 down; 3 hosts unreachable: a (unreachable), b (unreachable)")
    assert [s["to"] for s in body["subjects"]] == ["down", "unreachable", "unreachable", "unreachable"]


def test_recovery_of_a_relay_is_one_message_and_closes_every_alert() -> None:
    book = AlertBook()
    step(book, relay_death())
    result = step(book, relay_back(60, {"a": UP, "b": UP, "c": UNKNOWN}))
    [notice] = result.notices
    assert (notice.type, notice.incident, notice.still_open) == (NoticeType.RECOVERY, "relay:r1", 0)
    assert notice.started_at == at(0)
    assert notice.at == at(60)
    assert subjects(notice) == ["r1", "a", "b", "c"]
    assert len(book) == 0
    body = orjson.loads(render(notice, "k2"))
    assert body["resolved"] is True
    assert body["type"] == "recovery"
    assert body["summary"] == "relay r1 recovered (up); 3 hosts back: a (up), b (up), c (unknown)"


def test_hosts_that_go_unreachable_later_join_the_same_incident() -> None:
    book = AlertBook()
    step(book, relay_death(hosts=("a", "b")))
    [late] = step(book, [host("d", UP, UNREACHABLE, 5)]).notices
    assert (late.type, late.incident, subjects(late), late.still_open) == (NoticeType.OUTAGE, "relay:r1", ["d"], 4)
    assert late.started_at == at(0)  # the incident began when r1 died
    [back] = step(book, relay_back(60, {"a": UP, "b": UP, "d": UP})).notices
    assert subjects(back) == ["r1", "a", "b", "d"]
    assert back.started_at == at(0)
    assert back.still_open == 0


def test_a_host_down_on_its_own_is_its_own_incident() -> None:
    book = AlertBook()
    [a, b] = step(book, [host("a", UP, DOWN), host("b", UP, DOWN)]).notices
    assert (a.incident, b.incident) == ("host:a", "host:b")
    assert orjson.loads(render(a, "k"))["summary"] == "host a down: up->down"
    [back] = step(book, [host("a", DOWN, UP, 9)]).notices
    assert (back.type, back.incident, subjects(back)) == (NoticeType.RECOVERY, "host:a", ["a"])


def test_a_relay_behind_a_dead_relay_is_part_of_its_outage() -> None:
    changes = [
        relay("r1", UP, DOWN),
        relay("r2", UP, UNREACHABLE, parent="r1"),
        host("x", UP, UNREACHABLE, path=("r2", "r1")),
    ]
    changes[2] = replace(changes[2], relay="r1")  # hosts behind r2 blame the nearest dead relay: r1
    [notice] = step(AlertBook(), changes).notices
    assert notice.incident == "relay:r1"
    assert subjects(notice) == ["r1", "r2", "x"]
    assert incident_of(changes[1]) == "relay:r1"


def test_unreachable_then_down_closes_the_relay_incident_and_opens_the_hosts_own() -> None:
    book = AlertBook()
    step(book, relay_death(hosts=("a",)))
    recovery, outage = step(book, relay_back(60, {"a": DOWN})).notices
    assert (recovery.type, recovery.incident, recovery.items[1].to_state) == (NoticeType.RECOVERY, "relay:r1", DOWN)
    assert (outage.type, outage.incident) == (NoticeType.OUTAGE, "host:a")
    assert [(a.incident, a.state) for a in book.alerts()] == [("host:a", DOWN)]


def test_messages_of_one_batch_keep_their_order_for_an_incident() -> None:
    book = AlertBook()
    flap = [host("a", UP, DOWN, 0), host("a", DOWN, UP, 1), host("a", UP, DOWN, 2)]
    result = step(book, flap)
    assert [n.type for n in result.notices] == [NoticeType.OUTAGE, NoticeType.RECOVERY, NoticeType.OUTAGE]
    assert [n.still_open for n in result.notices] == [1, 0, 1]
    assert [n.started_at for n in result.notices] == [at(0), at(0), at(2)]  # the second outage is a new one
    assert [a.since for a in book.alerts()] == [at(2)]


def test_events_that_are_not_state_changes_send_nothing() -> None:
    restart = replace(host("a", UP, UP), event=Event.RESTART)
    flapping = replace(host("a", DOWN, DOWN), event=Event.FLAPPING_START)
    assert not step(AlertBook(), [restart, flapping, host("a", UNKNOWN, UP)])


# --- filters ------------------------------------------------------------------------------------


def test_state_filter_sends_only_those_states_and_their_recoveries() -> None:
    book, downs = AlertBook(), Target("downs", states=frozenset({DOWN}))
    [notice] = step(book, relay_death(), [downs]).notices
    assert subjects(notice) == ["r1"]
    assert not step(book, [host("z", UP, UNREACHABLE, relay="r9")], [downs])
    [back] = step(book, relay_back(9, {"a": UP, "b": UP, "c": UP}), [downs]).notices
    assert subjects(back) == ["r1"]  # told of r1 only, so hears of r1 only


def test_host_glob_filter_applies_to_hosts_and_kinds_filter_to_relays() -> None:
    db = Target("db", hosts=("db-*",), kinds=frozenset({HOST}))
    dbr = Target("dbr", hosts=("db-*",))
    result = plan(relay_death(hosts=("db-1", "web-1", "db-2")), [db, dbr, OPS], AlertBook())
    assert {n.target: subjects(n) for n in result.notices} == {
        "db": ["db-1", "db-2"],
        "dbr": ["r1", "db-1", "db-2"],
        "ops": ["r1", "db-1", "web-1", "db-2"],
    }
    assert not plan([host("DB-1", UP, DOWN)], [db], AlertBook())  # globs are case-sensitive


def test_relay_filter_takes_the_relay_its_subtree_and_every_host_behind_them() -> None:
    site = Target("site", relays=("r2",))
    changes = [
        host("a", UP, DOWN, relay="r1", path=("r1",)),
        host("b", UP, DOWN, relay="r2", path=("r2",)),
        host("c", UP, DOWN, relay="r3", path=("r3", "r2")),
        relay("r2", UP, DOWN),
        relay("r3", UP, DOWN, parent="r2"),
        relay("r4", UP, DOWN, parent="r1"),
    ]
    result = plan(changes, [site], AlertBook())
    assert [subjects(n) for n in result.notices] == [["b"], ["c"], ["r2"], ["r3"]]


# --- maintenance --------------------------------------------------------------------------------


def test_maintenance_sends_nothing_either_way() -> None:
    book = AlertBook()
    quiet = [replace(c, maintenance=True) for c in relay_death()]
    assert not step(book, quiet)
    assert not step(book, [replace(c, maintenance=True) for c in relay_back(9, {"a": UP, "b": UP, "c": UP})])


def test_an_outage_that_started_in_maintenance_sends_no_recovery_after_it() -> None:
    book = AlertBook()
    step(book, [replace(host("a", UP, DOWN), maintenance=True)])
    assert not step(book, [host("a", DOWN, UP, 60)])


def test_a_recovery_is_sent_to_whoever_was_told_even_in_maintenance() -> None:
    book = AlertBook()
    step(book, [host("a", UP, DOWN)])
    [back] = step(book, [replace(host("a", DOWN, UP, 60), maintenance=True)]).notices
    assert back.type is NoticeType.RECOVERY
    assert len(book) == 0


# --- reminders ----------------------------------------------------------------------------------


def test_reminders_come_every_interval_per_open_incident() -> None:
    nag = Target("nag", remind_every_s=60)
    book = AlertBook()
    step(book, [*relay_death(hosts=("a", "b")), host("x", UP, DOWN, relay="r2")], [nag, OPS])
    state = {(HOST, "a"): UNREACHABLE, (HOST, "b"): UNREACHABLE, (RELAY, "r1"): DOWN, (HOST, "x"): DOWN}

    def current(kind: Kind, subject: str) -> State | None:
        return state.get((kind, subject))

    assert not remind(book, [nag, OPS], at(59.9), current)
    due = remind(book, [nag, OPS], at(60), current)
    assert sorted((n.target, n.type, n.incident) for n in due.notices) == [
        ("nag", NoticeType.REMINDER, "host:x"),
        ("nag", NoticeType.REMINDER, "relay:r1"),
    ]
    [outage] = [n for n in due.notices if n.incident == "relay:r1"]
    assert sorted(subjects(outage)) == ["a", "b", "r1"]
    assert outage.started_at == at(0)
    body = orjson.loads(render(outage, "k"))
    assert body["summary"].startswith("relay r1 outage still open since 2026-03-01T12:00:00.000Z")
    assert all(s["from"] is None for s in body["subjects"])
    book.apply(due)
    assert not remind(book, [nag, OPS], at(119), current)
    state[HOST, "b"] = UP  # decided, not yet written: left alone, not reminded of
    [again] = [n for n in remind(book, [nag], at(120), current).notices if n.incident == "relay:r1"]
    assert sorted(subjects(again)) == ["a", "r1"]


def test_alerts_of_forgotten_subjects_close_without_a_message() -> None:
    book = AlertBook()
    step(book, [host("gone", UP, DOWN)])
    result = remind(book, [OPS], at(1), lambda kind, subject: None)
    assert not result.notices
    assert result.closed == (("ops", HOST, "gone"),)
    book.apply(result)
    assert len(book) == 0


# --- the signature ------------------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"id":"k"}'
    expected = hmac.new(b"s3cret", b"1767225600." + body, hashlib.sha256).hexdigest()
    assert signature("s3cret", 1767225600, body) == f"sha256={expected}"
    # Golden: what a receiver's own HMAC code must agree with, byte for byte.
    golden = "sha256=be29806c7711e67d8084664c2672e926b7bcf8aa4573f00521c423f46cccf5a6"
    assert signature(b"s3cret", 1767225600, body) == golden
    assert signature("other", 1767225600, body) != signature("s3cret", 1767225600, body)
    assert signature("s3cret", 1767225601, body) != signature("s3cret", 1767225600, body)


# --- properties ---------------------------------------------------------------------------------

SUBJECTS = [
    (RELAY, "r1", ()),
    (RELAY, "r2", ("r1",)),
    (HOST, "a", ("r1",)),
    (HOST, "b", ("r2", "r1")),
    (HOST, "db-1", ("r2", "r1")),
]
HOST_MOVES = {UNKNOWN: [UP, DOWN, STOPPED, UNREACHABLE], UP: [DOWN, STOPPED, UNREACHABLE], DOWN: [UP, STOPPED],
              STOPPED: [UP, DOWN], UNREACHABLE: [UP, DOWN, STOPPED, UNKNOWN]}  # fmt: skip
RELAY_MOVES = {UNKNOWN: [UP, DOWN, UNREACHABLE], UP: [DOWN, UNREACHABLE], DOWN: [UP], UNREACHABLE: [UP, DOWN]}

targets_strategy = st.lists(
    st.builds(
        Target,
        name=st.sampled_from(["t1", "t2", "t3"]),
        states=st.sampled_from([BAD_STATES, frozenset({DOWN}), frozenset({UNREACHABLE})]),
        hosts=st.sampled_from([("*",), ("db-*",), ("a", "b")]),
        relays=st.sampled_from([(), ("r2",), ("r1",)]),
        kinds=st.sampled_from([frozenset(Kind), frozenset({HOST}), frozenset({RELAY})]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda t: t.name,
)
moves = st.lists(
    st.lists(
        st.tuples(st.integers(0, len(SUBJECTS) - 1), st.integers(0, 3), st.booleans(), st.sampled_from(["r1", "r2"])),
        min_size=1,
        max_size=8,
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(targets=targets_strategy, batches=moves)
def test_alerts_follow_a_reference_model_and_every_outage_pairs_with_one_recovery(
    targets: list[Target], batches: list[list[tuple[int, int, bool, str]]]
) -> None:
    book = AlertBook()
    state = {(kind, name): UNKNOWN for kind, name, _ in SUBJECTS}
    last: dict[tuple[Kind, str], Change] = {}
    sent: Counter[tuple[str, str, NoticeType]] = Counter()  # (target, subject, type) -> items sent
    for t, batch in enumerate(batches):
        changes = []
        for index, choice, maintenance, blame in batch:
            kind, name, path = SUBJECTS[index]
            options = (HOST_MOVES if kind is HOST else RELAY_MOVES)[state[kind, name]]
            to = options[choice % len(options)]
            blamed = blame if to is UNREACHABLE else (path[0] if path else None)
            change = Change(
                kind=kind,
                subject=name,
                from_state=state[kind, name],
                to_state=to,
                at=at(t),
                reason="",
                relay=blamed,
                path=path,
                maintenance=maintenance,
            )
            changes.append(change)
            state[kind, name] = to
            last[kind, name] = change
        before = {(a.target, a.kind, a.subject) for a in book.alerts()}
        result = plan(changes, targets, book)
        book.apply(result)

        # Messages of one (target, incident) never repeat a type back to back within a batch.
        for target in targets:
            for incident in {n.incident for n in result.notices}:
                kinds = [n.type for n in result.notices if (n.target, n.incident) == (target.name, incident)]
                assert all(x is not y for x, y in itertools.pairwise(kinds))
        # The last message of each (target, incident) reports what the book now says.
        final = {(n.target, n.incident): n.still_open for n in result.notices}
        for (target_name, incident), still_open in final.items():
            assert book.count(target_name, incident) == still_open
        # A recovery item was an alert before the batch or opened earlier in it.
        opened_in_batch = {
            (n.target, i.kind, i.subject) for n in result.notices if n.type is NoticeType.OUTAGE for i in n.items
        }
        for notice in result.notices:
            for item in notice.items:
                sent[notice.target, item.subject, notice.type] += 1
                if notice.type is NoticeType.RECOVERY:
                    assert (notice.target, item.kind, item.subject) in before | opened_in_batch
            assert len(orjson.loads(render(notice, "k"))["subjects"]) == len(notice.items)
            assert notice.started_at <= min(item.at for item in notice.items) <= notice.at

        # The book is the reference model: open iff the change into the current state was wanted.
        for target in targets:
            for kind, name, _ in SUBJECTS:
                latest = last.get((kind, name))
                alert = book.get((target.name, kind, name))
                wanted = latest is not None and latest.to_state in BAD_STATES and target.wants(latest)
                assert (alert is not None) == wanted
                if alert is not None and latest is not None:
                    assert (alert.state, alert.incident, alert.since) == (
                        latest.to_state,
                        incident_of(latest),
                        latest.at,
                    )

    # Every outage item is closed by exactly one recovery item, or still open.
    for target in targets:
        for kind, name, _ in SUBJECTS:
            opened = sent[target.name, name, NoticeType.OUTAGE]
            recovered = sent[target.name, name, NoticeType.RECOVERY]
            assert opened - recovered == (1 if book.get((target.name, kind, name)) else 0)


@settings(max_examples=200, deadline=None)
@given(
    hosts=st.lists(st.from_regex(r"[a-z]{1,3}-[0-9]{1,2}", fullmatch=True), min_size=1, max_size=30, unique=True),
    targets=targets_strategy,
)
def test_a_relay_death_is_at_most_one_message_per_target(hosts: list[str], targets: list[Target]) -> None:
    result = plan(relay_death(hosts=tuple(hosts)), targets, AlertBook())
    per_target = Counter(n.target for n in result.notices)
    assert all(count == 1 for count in per_target.values())
    for target in targets:
        told = [i.subject for n in result.notices if n.target == target.name for i in n.items]
        assert told == [c.subject for c in relay_death(hosts=tuple(hosts)) if target.wants(c)]
