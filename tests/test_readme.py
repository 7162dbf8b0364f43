"""The README stays true: its wire-contract table and its example SQL queries are checked against the
code, and its curl and CLI examples run, as written, against a running demo."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from rich.console import Console
from sqlalchemy import text

from relaybeat.config import load_config
from relaybeat.demo import run_demo
from relaybeat.monitor.states import Event, Kind, State, state_diagram
from relaybeat.monitor.store import Batch, Store, TransitionRow
from relaybeat.relay.ports import pick_free
from relaybeat.relay.watch import PRESETS
from relaybeat.relay.wire import (
    Beat,
    Bundle,
    HostEntry,
    LeafStatus,
    Topics,
    Vouch,
    WatchedEntry,
    decode_bundle,
    encode_beat,
    encode_bundle,
)
from tests.wire_inputs import indexed_fields, table_keyframe_fields, v2_fields

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
    watched = (WatchedEntry("plug-2", Vouch.DOWN, 0, "tasmota", "tele/plug-2/LWT said Offline"),)
    bundle = orjson.loads(
        encode_bundle(
            Bundle("r1", "b", 1, 1000, (HostEntry("h", 1, 2, 3000, LeafStatus.OK),), (child,), watched=watched)
        )
    )
    for field in [*beat, *bundle, *bundle["children"][0]]:
        assert f"`{field}`" in wire, field
    assert "`[id, seq, age_ms, interval_ms, status]`" in wire
    assert "`[id, state, age_ms, source, reason]`" in wire
    assert all(f'`"{status.value}"`' in wire for status in LeafStatus)
    assert all(f'`"{vouch.value}"`' in wire for vouch in Vouch)


def test_readme_names_each_watch_preset_with_its_topics() -> None:
    section = _section("Watched sources")
    for name, source in PRESETS.items():
        assert f"| `{name}` |" in section, name
        assert all(f"`{topic}`" in section for topic in source.filters), name


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
        await store.write(Batch(transitions=rows))
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


# --- the README's examples, pasted as written against a running demo ---------------------------------

README_API = "localhost:8000"  # where the README's examples point; the demo here runs on a free port


def readme_commands(block_lang: str, starts: tuple[str, ...]) -> list[str]:
    """Every command of the README's ```{block_lang} blocks that starts with one of `starts`, as a
    shell runs it (continuation lines joined; comment-only lines left out)."""
    commands: list[str] = []
    for block in re.findall(rf"```{block_lang}\n(.*?)```", README, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            text = line.removeprefix("$ ") if block_lang == "console" else line
            if text.startswith(starts):
                commands.append(text)
    return commands


@dataclass
class Demo:
    url: str
    output: io.StringIO


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    """`relaybeat up --config FILE` (run_demo) in this event loop on free ports, on its embedded
    brokers; FILE holds the README's status page ("the page above" of its example)."""
    pages = [block for block in re.findall(r"```toml\n(.*?)```", README, re.S) if "[[api.status_page]]" in block]
    assert pages
    config = tmp_path / "relaybeat.toml"
    config.write_text("\n".join(pages))
    api = load_config(config, {}).api.settings()
    output = io.StringIO()
    stop = asyncio.Event()
    api_port = pick_free("127.0.0.1")
    running = asyncio.create_task(
        run_demo(stop, f"sqlite:///{tmp_path / 'demo.db'}", pick_free("127.0.0.1"), api_port,
                 console=Console(file=output, width=200), api=api)
    )  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    try:
        async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(60):
            while True:
                if running.done():
                    running.result()
                with contextlib.suppress(httpx.TransportError):
                    hosts = (await http.get("/api/v1/hosts")).json()
                    if hosts["total"] == 12 and all(h["state"] == "up" for h in hosts["items"]):
                        break
                await asyncio.sleep(0.2)
        yield Demo(url, output)
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


def test_every_curl_url_with_a_query_is_quoted() -> None:
    """An unquoted `&` sends the rest of the line to the background in a shell."""
    for command in readme_commands("sh", ("curl",)):
        for url in re.findall(r"(?<!['\"])\blocalhost:8000/\S*\?\S*", command):
            pytest.fail(f"quote this URL: {url}")


async def test_the_readme_curl_examples_work_as_written_against_the_demo(demo: Demo) -> None:
    """Every `curl` line of the README, in order, in one shell that pasted the demo's `export` line
    (the README's token variable is the one the demo prints), only host:port replaced."""
    exported = re.search(r"^\s*(export RELAYBEAT_API_WRITE_TOKENS=\S+)$", demo.output.getvalue(), re.M)
    assert exported, demo.output.getvalue()
    commands = readme_commands("sh", ("curl", "H="))
    assert len(commands) >= 25
    # each command's status and curl's exit code; streams (-N) end after 2 s
    wrapper = (
        'curl() { local t=10; case " $* " in *" -sN "*) t=2;; esac; '
        'command curl --max-time $t -w \'\\n<<<http %{http_code}\\n\' "$@"; echo "<<<exit $?"; }'
    )
    script = "\n".join(
        [wrapper, exported.group(1)]
        + [
            f"echo '<<<command {n}'\n{c.replace(README_API, demo.url.removeprefix('http://'))}"
            for n, c in enumerate(commands)
        ]
    )
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, out.decode()[-3000:]
    answers = out.decode().split("<<<command ")[1:]
    assert len(answers) == len(commands)
    for command, answer in zip(commands, answers, strict=True):
        if command.startswith("H="):
            continue
        statuses = [int(s) for s in re.findall(r"<<<http (\d+)", answer)]
        exits = [int(s) for s in re.findall(r"<<<exit (\d+)", answer)]
        if "| grep" in command:  # the /metrics example: its lines, filtered
            assert 'relaybeat_subjects{kind="host",state="up"} 12.0' in answer, answer
            continue
        assert exits == [28 if " -sN " in command else 0], (command, answer)
        (status,) = statuses
        documented = (
            {404} if "old-web-9" in command else {409} if ("/ack" in command or "-X DELETE" in command) else set()
        )
        assert status < 400 or status in documented, (command, answer)
        if " -sN " in command:
            assert ": relaybeat transitions" in answer, answer
    written = [c for c in commands if '"$H"' in c and "-d " in c]
    assert written, "the README has write examples"


async def test_the_readme_cli_examples_work_against_the_demo(demo: Demo) -> None:
    """`relaybeat status|history|watch` as the README writes them, with RELAYBEAT_API pointing at the demo."""
    commands = readme_commands("console", ("relaybeat status", "relaybeat history", "relaybeat watch"))
    assert any(c.startswith("relaybeat watch") for c in commands)
    assert any(c.startswith("relaybeat status") for c in commands)
    env = {**os.environ, "RELAYBEAT_API": demo.url, "COLUMNS": "200"}
    for command in commands:
        args = shlex.split(command)[1:]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relaybeat", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert process.stderr
        if args[0] == "watch":
            line = await asyncio.wait_for(process.stderr.readline(), 60)
            assert line.decode().startswith(f"watching {demo.url}/api/v1/events"), line
            process.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, (command, err.decode())
        if args[0] == "status":
            assert f"relaybeat at {demo.url}" in out.decode()


@pytest.mark.parametrize(
    ("heading", "writer"),
    [
        ("### Indexed deltas, byte by byte", indexed_fields),
        ("### Keyframes by table, byte by byte", table_keyframe_fields),
    ],
)
def test_indexed_tables_name_every_field_in_the_order_the_code_writes_them(
    heading: str, writer: Callable[[], list[tuple[str, bytes]]]
) -> None:
    """Against tests/wire_inputs.py's writers of an indexed delta and of a keyframe by table, which
    tests/test_compact.py checks against the code both ways."""
    wire = _section("Wire contract")
    table = wire[wire.index(heading) :]
    table = table[: table.index("\n\n", table.index("| bytes |"))]
    rows = re.findall(r"^\| ([^|]+) \| `([a-z_]+)` \|", table, re.M)
    fields = [(name, raw) for name, raw in writer() if not name.startswith("child.")]
    assert [name for _, name in rows] == [name for name, _ in fields]
    for width, name in rows:
        if width.strip() == "1":
            assert len(dict(fields)[name]) == 1, name
