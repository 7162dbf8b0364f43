"""The README stays true: its wire-contract table and its example SQL queries are checked against the code."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
from sqlalchemy import text

from relaybeat.monitor.states import Event, Kind, State, state_diagram
from relaybeat.monitor.store import Store, TransitionRow
from relaybeat.relay.wire import Beat, Bundle, HostEntry, LeafStatus, Topics, decode_bundle, encode_beat, encode_bundle
from tests.wire_inputs import indexed_fields, v2_fields

README = (Path(__file__).parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def test_wire_table_topics_match_the_code() -> None:
    wire = _section("Wire contract")
    topics = Topics()
    built_topics = (topics.beat("<host>"), topics.bundle("<relay>"), topics.relay_status("<relay>"))
    for built in (*built_topics, topics.relay_resync("<relay>")):
        assert f"`{built}`" in wire


def test_wire_table_names_every_field_the_code_writes() -> None:
    wire = _section("Wire contract")
    beat = orjson.loads(encode_beat(Beat(1, 2.0, LeafStatus.STOPPING, {"a": 1})))
    child = Bundle("r3", "b", 1, 1000, (), (), age_ms=5)
    bundle = orjson.loads(
        encode_bundle(Bundle("r1", "b", 1, 1000, (HostEntry("h", 1, 2, 3000, LeafStatus.OK),), (child,)))
    )
    for field in [*beat, *bundle, *bundle["children"][0]]:
        assert f"`{field}`" in wire, field
    assert "`[id, seq, age_ms, interval_ms, status]`" in wire
    assert all(f'`"{status.value}"`' in wire for status in LeafStatus)


def test_readme_example_bundle_decodes() -> None:
    example = re.search(r"```json\n(.*?)```", _section("Wire contract"), re.S)
    assert example is not None
    bundle = decode_bundle(example.group(1).replace("\n", "").encode())
    assert bundle.entry_count() == 3
    assert bundle.children[0].relay == "r3"


async def test_readme_sql_queries_run_and_answer(db_url: str) -> None:
    queries = re.findall(r"```sql\n(.*?)```", _section("SQL schema"), re.S)
    assert len(queries) == 2
    store = await Store.open(db_url)
    try:
        await store.upgrade()
        t0 = datetime(2026, 11, 20, tzinfo=UTC)
        rows = [
            TransitionRow(
                kind=Kind.HOST, subject="web-1", from_state=State.UP, to_state=State.DOWN, at=t0, reason="no beat"
            ),
            TransitionRow(
                kind=Kind.HOST,
                subject="web-1",
                from_state=State.DOWN,
                to_state=State.UP,
                at=t0 + timedelta(minutes=5),
                reason="beat received",
            ),
            TransitionRow(
                kind=Kind.HOST,
                subject="web-1",
                from_state=State.UP,
                to_state=State.DOWN,
                at=t0 + timedelta(hours=1),
                reason="no beat",
            ),
            TransitionRow(
                kind=Kind.HOST, subject="db-1", from_state=State.UP, to_state=State.DOWN, at=t0, reason="no beat"
            ),
            TransitionRow(
                kind=Kind.HOST,
                subject="db-1",
                from_state=State.DOWN,
                to_state=State.DOWN,
                at=t0,
                reason="leaf restarted",
                event=Event.RESTART,
            ),
            TransitionRow(
                kind=Kind.HOST,
                subject="old",
                from_state=State.UP,
                to_state=State.DOWN,
                at=t0 - timedelta(days=30),
                reason="no beat",
            ),
        ]
        await store.write(rows, (), ())
        async with store._engine.connect() as connection:
            top = (await connection.execute(text(queries[0]))).all()
            outages = (await connection.execute(text(queries[1]))).all()
        assert [tuple(r) for r in top] == [("web-1", 2), ("db-1", 1)]
        ended = [(r[0], r[2] is not None) for r in outages]
        assert ended == [("old", False), ("web-1", True), ("db-1", False), ("web-1", False)]
    finally:
        await store.close()


def test_readme_state_diagrams_are_generated_from_the_transition_table() -> None:
    states = _section("States and timing")
    for kind in Kind:
        assert f"```mermaid\n{state_diagram(kind)}\n```" in states, f"regenerate the {kind} diagram"


def test_version_2_tables_name_every_field_in_the_order_the_code_writes_them() -> None:
    """The README's byte-by-byte tables, against tests/wire_inputs.py's writer (which the wire tests
    check against the code): same fields, same order, same widths."""
    wire = _section("Wire contract")
    start = wire.index("### Version 2, byte by byte")
    table = wire[start : wire.index("\n### ", start)]
    found = re.findall(r"^\| ([^|]+) \| `([a-z_]+)`( column)? \|", table, re.M)
    columns = {"seq": "seqs", "age_ms": "ages", "interval_ms": "intervals", "status": "statuses"}
    rows = [(width, columns[name] if column else name) for width, name, column in found]
    names = [name for _, name in rows]
    fields = v2_fields()
    top = [name for name, _ in fields if not name.startswith("child.")]
    assert names == [*top[:2], *top[2:]], (names, top)
    widths = {name: len(raw) for name, raw in fields if not name.startswith("child.")}
    for width, name in rows:
        fixed = {"1": 1, "4": 4, "8": 8}.get(width.strip())
        if fixed is not None:
            assert widths[name] == fixed, name
    assert all(f'`{code}` `"{status.value}"`' in table for code, status in enumerate(LeafStatus))


def test_indexed_delta_table_names_every_field_in_the_order_the_code_writes_them() -> None:
    """Against tests/wire_inputs.py's writer of an indexed delta, which tests/test_compact.py checks
    against the code both ways."""
    wire = _section("Wire contract")
    table = wire[wire.index("### Indexed deltas, byte by byte") :]
    rows = re.findall(r"^\| ([^|]+) \| `([a-z_]+)` \|", table, re.M)
    fields = [(name, raw) for name, raw in indexed_fields() if not name.startswith("child.")]
    assert [name for _, name in rows] == [name for name, _ in fields]
    for width, name in rows:
        if width.strip() == "1":
            assert len(dict(fields)[name]) == 1, name
