"""`relaybeat status`, `history` and `watch`, run as real processes against a real monitor's API.

The monitor (fed through its own `take`, writing to SQLite) and its API run in the test's event
loop under uvicorn; each command is `python -m relaybeat ...` in a subprocess, as a person runs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Response
from typer.testing import CliRunner, Result

from relaybeat import cli, people
from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.ports import pick_free
from tests.fakes import FakeClock
from tests.monitors import Feed, Served, new_monitor, served_monitor, serving

BASE_ENV = {k: v for k, v in os.environ.items() if k not in {"RELAYBEAT_API", "RELAYBEAT_API_TOKEN", "NO_COLOR"}}
BASE_ENV |= {"COLUMNS": "200", "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color", "FORCE_COLOR": ""}
BASE_ENV.pop("FORCE_COLOR")
RED_DOWN = re.compile(r"\x1b\[[0-9;]*31m\s*down")


@pytest.fixture
async def served(served: Served) -> Served:
    """The served monitor of conftest.py, holding web-1 (down), web-2 and db-1 (up) behind r1."""
    await served.feed.up("web-1", "web-2", "db-1")
    await served.feed.down("web-1")
    return served


async def relaybeat(*args: str, color: bool = False, **env: str) -> tuple[int, str, str]:
    environment = BASE_ENV | ({"FORCE_COLOR": "1"} if color else {}) | env
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaybeat", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environment,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def rows(out: str) -> list[str]:
    """Table rows' first cells: the subjects listed."""
    return re.findall(r"^│ ([A-Za-z0-9._-]+) ", out, re.MULTILINE)


async def test_status_lists_relays_and_hosts_worst_first_in_color(served: Served) -> None:
    code, out, err = await relaybeat("status", "--api", served.url, color=True)
    assert code == 0, err
    assert RED_DOWN.search(out), out  # down is red
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "relaybeat at " + served.url in plain
    assert "ok" in plain
    assert rows(plain) == ["r1", "web-1", "db-1", "web-2"]  # the relay, then hosts: down first, then by id
    assert re.search(r"web-1 +│ down", plain)
    assert re.search(r"db-1 +│ up", plain)


async def test_status_filters_by_state_relay_and_search(served: Served) -> None:
    _, out, _ = await relaybeat("status", "--api", served.url, "--state", "up")
    assert rows(out) == ["db-1", "web-2"]  # no relay table when filtering hosts
    _, out, _ = await relaybeat("status", "--api", served.url, "--search", "WEB")
    assert rows(out) == ["web-1", "web-2"]
    _, out, _ = await relaybeat("status", "--api", served.url, "--relay", "r1", "--limit", "1")
    assert rows(out) == ["r1", "web-1"]
    assert "… and 2 more" in out
    code, out, _ = await relaybeat("status", "--api", served.url, "--relay", "r9")
    assert code == 0
    assert "no host matches" in out
    code, _, err = await relaybeat("status", "--api", served.url, "--state", "sleeping")
    assert code == 2
    assert "use one of down, unreachable" in err


async def test_status_reads_the_api_from_the_environment_and_says_what_to_do_when_it_is_down(served: Served) -> None:
    code, out, _ = await relaybeat("status", RELAYBEAT_API=served.url)
    assert code == 0
    assert "web-1" in out
    closed = f"http://127.0.0.1:{pick_free('127.0.0.1')}"
    for command in (["status"], ["history", "web-1"], ["watch"]):
        code, _, err = await relaybeat(*command, RELAYBEAT_API=closed)
        assert code == 2, command
        assert f"cannot reach {closed}" in err, err
        assert "is `relaybeat monitor` running? use --api URL" in err, err
    code, _, err = await relaybeat("status", "--api", "localhost:8000")
    assert code == 2
    assert "is not a URL" in err


async def test_history_shows_transitions_oldest_first_and_names_unknown_subjects(served: Served) -> None:
    code, out, err = await relaybeat("history", "web-1", "--api", served.url)
    assert code == 0, err
    assert out.index("unknown → up") < out.index("up → down")
    assert "no beat for 3.0 s" in out
    code, out, _ = await relaybeat("history", "r1", "--api", served.url)  # a relay id works too
    assert code == 0
    assert "relay r1" in out
    assert "unknown → up" in out
    code, _, err = await relaybeat("history", "nope", "--api", served.url)
    assert code == 2
    assert "no host or relay 'nope'" in err
    assert "relaybeat status --search nope" in err


async def test_status_pages_through_more_hosts_than_one_request_returns(tmp_path: Path) -> None:
    async with served_monitor(tmp_path) as running:
        running.feed.known.update({f"h{n:05}": 0 for n in range(10_050)})
        await running.feed.send()
        code, out, err = await relaybeat("status", "--api", running.url)
    assert code == 0, err
    assert "10,050 hosts shown" in out
    assert "… and 10,000 more" in out


async def read_line(stream: asyncio.StreamReader, contains: str, within_s: float = 20.0) -> str:
    """The next line containing `contains` (earlier lines are skipped, and kept in the error)."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(within_s):
            while line := (await stream.readline()).decode():
                if contains in line:
                    return line
                seen.append(line)
    except TimeoutError:
        pass
    msg = f"no line with {contains!r} within {within_s} s; saw {seen}"
    raise AssertionError(msg)


async def test_watch_prints_live_transitions_and_resumes_after_the_api_restarts(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'watch.db'}")
    await store.upgrade()
    clock = FakeClock()
    monitor = new_monitor(store, clock)
    feed = Feed(monitor, clock)
    port = pick_free("127.0.0.1")
    watcher = None
    try:
        await feed.up("a", "b", "c")
        async with serving(create_app(monitor), port) as url:
            watcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relaybeat", "watch", "--api", url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=BASE_ENV,
            )  # fmt: skip
            assert watcher.stdout
            assert watcher.stderr
            await read_line(watcher.stderr, "watching")
            await feed.down("a")
            line = await read_line(watcher.stdout, " a ")
            assert "host" in line
            assert "up → down" in line
            assert "no beat for" in line
            assert "via r1" in line

        # the API goes away (a monitor restart); meanwhile b goes down; the watcher must not miss it
        await read_line(watcher.stderr, "the stream ended")
        await feed.down("b")
        async with serving(create_app(monitor), port):
            await read_line(watcher.stderr, "reconnected", within_s=30)
            line = await read_line(watcher.stdout, " b ")
            assert "up → down" in line
            await feed.down("c")
            assert "up → down" in await read_line(watcher.stdout, " c ")
            watcher.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(watcher.wait(), 15) == 0
            rest = (await watcher.stdout.read()).decode()
            assert " a " not in rest  # nothing twice
    finally:
        if watcher is not None and watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        await store.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a script's background job


@pytest.mark.parametrize(
    ("stop", "started_ignoring_sigint"), [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "sigint"]
)
async def test_watch_filters_by_state_and_replays_from_an_id(
    served: Served, stop: signal.Signals, started_ignoring_sigint: bool
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaybeat", "watch", "--api", served.url, "--after-id", "0", "--state", "down",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=BASE_ENV,
        preexec_fn=_ignore_sigint if started_ignoring_sigint else None,
    )  # fmt: skip
    assert process.stdout
    try:
        first = await read_line(process.stdout, "up → down")  # web-1's down: the newest row, so the replay is done
        process.send_signal(stop)
        out, err = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err
    assert first.split()[2] == "web-1"
    assert out.strip() == b""
    assert "stopped" in err.decode()


async def test_status_quality_shows_the_detectors_own_figures(served: Served) -> None:
    """web-1 died (a real death, detected 10 s after its last beat): no false alarm, P_A 100 %."""
    code, out, err = await relaybeat("status", "--quality", "--api", served.url)
    assert code == 0, err
    assert "detector quality from" in out
    assert re.search(r"all hosts +│ 3 +│ 1 +│ 1 +│ 0 +│ 10\.0 s", out), out
    assert "hosts via r1" in out
    assert "no false alarm proved in the window" in out


# --- errors a person can act on: other servers, bad flags, tokens ---------------------------------
# These run the commands in a worker thread of this process (typer's CliRunner): the API they talk
# to is served by this test's event loop, and no interpreter start is paid per command.

READ_TOKEN = "read-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"


async def in_process(*args: str, **env: str | None) -> Result:
    environment = {"RELAYBEAT_API": None, "RELAYBEAT_API_TOKEN": None, "COLUMNS": "200"} | env
    return await asyncio.to_thread(CliRunner().invoke, cli.app, list(args), env=environment)


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def other_server(status: int, body: str, media_type: str) -> FastAPI:
    """Some web server that is not relaybeat: the same answer for every path."""
    other = FastAPI()

    @other.get("/{path:path}")
    async def anything(path: str) -> Response:
        return Response(body, status_code=status, media_type=media_type)

    return other


@pytest.mark.parametrize(
    ("status", "body", "media_type"),
    [
        (200, "<html>It works!</html>", "text/html"),
        (404, "Not Found", "text/plain"),
        (200, '{"ok": 1}', "application/json"),
    ],
    ids=["html", "404", "json"],
)
async def test_commands_pointed_at_another_web_server_say_so_in_one_line(
    status: int, body: str, media_type: str
) -> None:
    async with serving(other_server(status, body, media_type)) as url:
        for command in (["status"], ["history", "web-1"], ["watch"]):
            line = one_error_line(await in_process(*command, "--api", url))
            assert f"{url} does not look like a relaybeat monitor" in line, line
            assert "point --api (or RELAYBEAT_API) at the monitor's API" in line
            assert "no host or relay" not in line


async def test_state_and_since_are_checked_before_anything_is_asked() -> None:
    closed = f"http://127.0.0.1:{pick_free('127.0.0.1')}"
    for command in (["watch", "--state", "bogus"], ["status", "--state", "bogus"]):
        line = one_error_line(await in_process(*command, "--api", closed))
        assert line == "error: --state 'bogus': use one of down, unreachable, unknown, stopped, up"
    line = one_error_line(await in_process("history", "web-1", "--since", "yesterday", "--api", closed))
    assert line == "error: --since 'yesterday': use an ISO 8601 time with a zone, e.g. 2026-11-29T00:00:00Z"
    naive = one_error_line(await in_process("history", "web-1", "--since", "2026-11-29T00:00:00", "--api", closed))
    assert "with a zone" in naive


async def test_a_missing_token_and_a_refused_token_are_told_apart(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'tokens.db'}")
    try:
        await store.upgrade()
        monitor = new_monitor(store, FakeClock())
        protected = ApiSettings(read_open=False, read_tokens=(READ_TOKEN,), write_tokens=(WRITE_TOKEN,))
        async with serving(create_app(monitor, protected)) as url:
            for command in (["status"], ["history", "web-1"], ["watch"]):
                line = one_error_line(await in_process(*command, "--api", url))
                assert line == f"error: {url} needs a token for reads: use --token or set RELAYBEAT_API_TOKEN"
                line = one_error_line(await in_process(*command, "--api", url, RELAYBEAT_API_TOKEN="x" * 20))
                assert line == f"error: {url} did not accept the token (HTTP 401): check --token or RELAYBEAT_API_TOKEN"
            result = await in_process("status", "--api", url, "--token", READ_TOKEN)
            assert result.exit_code == 0, result.output
    finally:
        await store.close()


def test_a_403_names_what_the_token_may_not_do() -> None:
    api = people.Api("http://monitor.example:8000", WRITE_TOKEN)
    request = httpx.Request("DELETE", "http://monitor.example:8000/api/v1/hosts/web-1")
    refused = httpx.Response(403, json={"error": "forbidden", "detail": "this token may read but not write"},
                             request=request)  # fmt: skip
    with pytest.raises(people.ApiError) as caught:
        api.check(refused)
    assert str(caught.value) == (
        "the token is not allowed to DELETE /api/v1/hosts/web-1 on http://monitor.example:8000 "
        "(HTTP 403: this token may read but not write)"
    )
    invalid = httpx.Response(422, json={"detail": [{"loc": ["query", "since"], "msg": "Input should be a datetime"}]},
                             request=request)  # fmt: skip
    with pytest.raises(people.ApiError, match=r"HTTP 422: since: Input should be a datetime$"):
        api.check(invalid)
