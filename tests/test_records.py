"""One record per concept: the API's bodies carry the fields of the records the store and the view share,
and the journal gives back the records it was given."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel

from relaybeat.api.bodies import (
    TRANSITION_RENAMED,
    TRANSITION_UNSHOWN,
    HostOut,
    RelayOut,
    TransitionOut,
    host_body,
    relay_body,
    transition_body,
)
from relaybeat.monitor.journal import decode, encode
from relaybeat.monitor.records import Change, HostRow, RelayRow, TransitionRow
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.view import HostView, RelayView

AT = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def names(record: type) -> set[str]:
    return {f.name for f in fields(record)}


def shown(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def host_view() -> HostView:
    return HostView(
        id="web-1",
        state=State.UP,
        since=AT,
        last_seen=AT,
        relay="r1",
        interval_s=1.0,
        seq=3,
        flapping=False,
        path=("r1",),
        timeout_s=3.0,
        deadline=AT,
    )


def relay_view() -> RelayView:
    return RelayView(
        id="r1",
        state=State.UP,
        since=AT,
        last_seen=None,
        parent=None,
        boot="b",
        seq=None,
        flush_s=1.0,
        flapping=True,
        timeout_s=3.0,
        hosts=2,
        children=("r2",),
    )


def test_the_host_and_relay_views_are_the_stored_rows_plus_what_the_view_adds() -> None:
    assert names(HostRow) < names(HostView)
    assert names(RelayRow) < names(RelayView)


def test_the_host_and_relay_bodies_have_exactly_the_views_fields() -> None:
    assert shown(HostOut) == names(HostView) == set(host_body(host_view()))
    assert shown(RelayOut) == names(RelayView) == set(relay_body(relay_view()))
    HostOut.model_validate(host_body(host_view()))
    RelayOut.model_validate(relay_body(relay_view()))


def test_the_transition_body_has_the_rows_fields_as_the_api_names_them() -> None:
    row = TransitionRow(
        id=7, kind=Kind.HOST, subject="web-1", from_state=State.UP, to_state=State.DOWN, at=AT, reason="no beat"
    )
    expected = {TRANSITION_RENAMED.get(name, name) for name in names(TransitionRow) - TRANSITION_UNSHOWN}
    assert shown(TransitionOut) == expected == set(transition_body(row))
    TransitionOut.model_validate(transition_body(row))


def test_a_change_is_its_row_and_a_path() -> None:
    assert names(Change) == names(TransitionRow) | {"path"}


def test_the_journal_gives_back_the_changes_and_state_rows_it_was_given() -> None:
    host = HostRow(
        id="web-1", state=State.DOWN, since=AT, last_seen=None, relay="r1", interval_s=1.5, seq=None, flapping=True
    )
    relay = RelayRow(
        id="r1", state=State.UP, since=AT, last_seen=AT, parent="r0", boot="b1", seq=9, flush_s=2.0, flapping=False
    )
    common: dict[str, Any] = {"from_state": State.UP, "at": AT, "reason": "why", "maintenance": False}
    changes = [
        Change(
            kind=Kind.HOST, subject="web-1", to_state=State.DOWN, relay="r1", key="k-4", path=("r1", "r0"), **common
        ),
        Change(
            kind=Kind.RELAY, subject="r1", to_state=State.UP, event=Event.RESTART, key="k-5", path=("r0",), **common
        ),
        Change(kind=Kind.HOST, subject="gone", to_state=State.DOWN, key="k-6", **common),
    ]
    decided = decode(encode("k-", 4, changes, [host, relay, None]))
    assert [d.change for d in decided] == changes
    assert [d.state for d in decided] == [host, relay, None]


def test_the_journal_keeps_a_hosts_source_and_reads_rows_journaled_before_it_existed() -> None:
    host = HostRow(
        id="plug-2", state=State.DOWN, since=AT, last_seen=AT, relay="r1", interval_s=1.0, seq=None, flapping=False,
        source="tasmota",
    )  # fmt: skip
    change = Change(kind=Kind.HOST, subject="plug-2", from_state=State.UP, to_state=State.DOWN, at=AT, reason="r")
    line = encode("k-", 1, [change], [host])
    assert [d.state for d in decode(line)] == [host]
    older = orjson.loads(line)
    older[2][0][-1].pop()  # the state row as journaled before hosts had a source
    assert [d.state for d in decode(orjson.dumps(older))] == [dataclasses.replace(host, source=None)]


def test_rows_spelled_out_on_the_hot_path_carry_every_field_of_their_source() -> None:
    """`Change.decided` and `HostRow.of` name their fields one by one (they are on the hot path): each
    field either comes from the source by name or is one of the few the stamp supplies."""
    from relaybeat.monitor.detector import HostTrack
    from relaybeat.monitor.states import Transition

    t = Transition(Kind.HOST, "h1", State.UNKNOWN, State.UP, 5.0, "beat received", "r1", Event.RESTART)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    change = Change.decided(t, at, ("r1",), True, "k1")
    for f in fields(Transition):
        assert getattr(change, f.name) == (at if f.name == "at" else getattr(t, f.name)), f.name
    assert (change.path, change.maintenance, change.key) == (("r1",), True, "k1")

    host = HostTrack("h1", State.UP, 5.0, 6.0)
    host.via, host.interval_s, host.seq, host.flapping, host.source = "r1", 2.5, 7, True, "ping"
    row = HostRow.of(host, lambda t: datetime.fromtimestamp(t, UTC))
    for f in fields(HostRow):
        want = {"since": datetime.fromtimestamp(5.0, UTC), "last_seen": datetime.fromtimestamp(6.0, UTC)}.get(
            f.name, host.via if f.name == "relay" else getattr(host, f.name, None)
        )
        assert getattr(row, f.name) == want, f.name
