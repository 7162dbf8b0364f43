"""Every start-up failure of every command is one line that says what to do, exit status 2, no
traceback; `--debug` or RELAYBEAT_LOG_LEVEL=debug print the traceback too (relaybeat/cli.py's
`_Commands` is the one place that turns a `RelaybeatError` into that line).

The database cases run the commands in this process (typer's CliRunner, real SQLite files and a
real PostgreSQL server where one is needed); the broker cases run real processes, since those
commands keep retrying by design (a service may start before its broker) and say so in one line.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url
from typer.testing import CliRunner, Result

from relaybeat import cli
from relaybeat.relay.ports import pick_free
from tests.conftest import PG_ENV, PG_HOW
from tests.processes import Service, api_get, wait_until

NO_DEBUG = {"RELAYBEAT_LOG_LEVEL": None, "RELAYBEAT_CONFIG": None, "RELAYBEAT_DB": None}


def relaybeat(*args: str, **env: str | None) -> Result:
    return CliRunner().invoke(cli.app, list(args), env=NO_DEBUG | env)


def one_line(result: Result) -> str:
    """The single `error: ...` line of a failed start, after checking exit status 2 and no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def monitor_args(db: str, folder: Path, listen: str = "127.0.0.1:0") -> list[str]:
    return ["monitor", "--db", db, "--listen", listen, "--broker", "mqtt://127.0.0.1:1", "--log-level", "error",
            "--journal", str(folder / "monitor.journal")]  # fmt: skip


@pytest.mark.parametrize("command", ["db", "monitor"])
def test_a_postgresql_database_that_does_not_exist(command: str, tmp_path: Path) -> None:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_HOW)
    name = f"relaybeat_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    args = ["db", "upgrade", "--db", url] if command == "db" else monitor_args(url, tmp_path)
    line = one_line(relaybeat(*args))
    assert f'database "{name}" does not exist' in line
    assert f"createdb {name}" in line


@pytest.mark.parametrize("command", ["db", "monitor", "up"])
def test_a_missing_sqlite_directory(command: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-dir' / 'x.db'}"
    commands = {"db": ["db", "upgrade", "--db", url], "up": ["up", "--db", url]}
    args = commands.get(command) or monitor_args(url, tmp_path)
    line = one_line(relaybeat(*args))
    assert f"no directory {tmp_path / 'no-such-dir'}" in line


@pytest.mark.parametrize("command", ["db", "monitor"])
def test_a_refused_database_connection_never_shows_the_password(command: str, free_port: int, tmp_path: Path) -> None:
    url = f"postgresql+psycopg://relaybeat:s3cret-pw@127.0.0.1:{free_port}/relaybeat"
    args = ["db", "upgrade", "--db", url] if command == "db" else monitor_args(url, tmp_path)
    line = one_line(relaybeat(*args))
    assert f"postgresql+psycopg://relaybeat:***@127.0.0.1:{free_port}/relaybeat" in line
    assert "Connection refused; is the database server running on that host and port?" in line
    assert "s3cret-pw" not in line


@pytest.mark.parametrize("command", ["db", "monitor"])
def test_an_unknown_database_url_scheme(command: str, tmp_path: Path) -> None:
    url = "mysql://relaybeat@db.example/relaybeat"
    args = ["db", "upgrade", "--db", url] if command == "db" else monitor_args(url, tmp_path)
    line = one_line(relaybeat(*args))
    assert "unsupported database URL scheme 'mysql': use sqlite:///PATH or postgresql://" in line


def test_downgrading_to_a_revision_that_does_not_exist(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert relaybeat("db", "upgrade", "--db", url).exit_code == 0
    line = one_line(relaybeat("db", "downgrade", "--db", url, "--revision", "0009"))
    assert "'0009'" in line
    assert "knows the revisions base, 0001, 0002" in line


@pytest.mark.parametrize("command", ["monitor", "up"])
def test_a_port_in_use_for_the_api(command: str, listening: int, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    args = (
        monitor_args(db, tmp_path, f"127.0.0.1:{listening}")
        if command == "monitor"
        else ["up", "--api-port", str(listening)]
    )
    line = one_line(relaybeat(*args))
    assert line == f"error: 127.0.0.1:{listening} is already in use (another broker or server?). Choose another port."


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--debug", "db", "upgrade"], {}), (["db", "upgrade"], {"RELAYBEAT_LOG_LEVEL": "debug"})],
    ids=["--debug", "RELAYBEAT_LOG_LEVEL=debug"],
)
def test_debug_shows_the_traceback_before_the_line(args: list[str], env: dict[str, str]) -> None:
    result = relaybeat(*args, "--db", "mysql://relaybeat@db.example/relaybeat", **env)
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "relaybeat.errors.SettingsError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: unsupported database URL scheme 'mysql'")


def test_a_broker_that_refuses_or_an_unknown_host_is_one_line_and_the_service_keeps_trying(
    tmp_path: Path, free_port: int
) -> None:
    """A monitor or leaf started before its broker waits for it: one WARNING that says what to do (the
    rest of the outage is summarised once a minute, tests/test_reconnect_log.py), never a traceback."""
    refused = f"mqtt://127.0.0.1:{pick_free('127.0.0.1')}"  # nothing listens there (not the API's port)
    monitor = Service("monitor", ["monitor", "--broker", refused, "--db", f"sqlite:///{tmp_path / 'm.db'}",
                                  "--listen", f"127.0.0.1:{free_port}"], tmp_path)  # fmt: skip
    leaf = Service("leaf", ["leaf", "--id", "h1", "--broker", "mqtt://no-such-host.invalid:1883"], tmp_path)
    try:
        wait_until(lambda: api_get(f"http://127.0.0.1:{free_port}", "/healthz"), 60, "the API", service=monitor)
        said = "Is the broker running on that host and port?"
        wait_until(lambda: said in monitor.log(), 30, "the monitor's warning", service=monitor)
        wait_until(lambda: "Unknown host: check the broker URL." in leaf.log(), 60, "the leaf's warning", service=leaf)
        assert api_get(f"http://127.0.0.1:{free_port}", "/healthz")["broker_connected"] is False
    finally:
        codes = (monitor.stop(), leaf.stop())
    assert codes == (0, 0)
    for service, url in ((monitor, refused), (leaf, "mqtt://no-such-host.invalid:1883")):
        log = service.log()
        assert "Traceback" not in log, log
        lines = [line for line in log.splitlines() if f"broker {url} unavailable" in line]
        assert len(lines) == 1, lines
        assert "Retrying; a summary every 60 s until it is back." in lines[0]
