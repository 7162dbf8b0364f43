"""The deployment file and the command line: bad values stop start-up with a message naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relaybeat.config import ConfigError, load_config

EXAMPLE = Path(__file__).parent.parent / "relaybeat.example.toml"


def test_example_file_loads_and_builds_the_policy() -> None:
    config = load_config(EXAMPLE)
    policy = config.detector.policy()
    assert policy.misses_for("wan-7") == 6
    assert policy.misses_for("web-1") == 3
    assert config.monitor.db == "sqlite:///relaybeat.db"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[detector]\nmises = 3\n", "detector.mises: Extra inputs are not permitted"),
        ("[detector]\nmisses = 0\n", "detector.misses: Input should be greater than or equal to 1"),
        ("[detector]\nmisses = '3'\n", "detector.misses: Input should be a valid integer"),
        ("[detector]\nflap_start = 3\nflap_stop = 3\n", "flap_stop (3) must be below flap_start (3)"),
        ("[monitor]\nprefix = 'no-slash'\n", "monitor.prefix"),
        ("[[detector.misses_override]]\nhosts = 'db-*'\n", "detector.misses_override.0.misses: Field required"),
        ("[monitr]\n", "monitr: Extra inputs are not permitted"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_monitor_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "relaybeat.toml"
    path.write_text("[detector]\nmisses = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "relaybeat", "monitor", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "detector.misses" in result.stderr and "greater than or equal to 1" in result.stderr


def test_taken_port_is_a_clear_error(free_port: int) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "relaybeat", "up", "--api-port", str(free_port), "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"127.0.0.1:{free_port} is already in use" in result.stderr


def test_db_upgrade_command_creates_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    for command in (["db", "upgrade"], ["db", "check"], ["db", "downgrade"], ["db", "upgrade"]):
        result = subprocess.run(
            [sys.executable, "-m", "relaybeat", *command, "--db", f"sqlite:///{db}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    import sqlite3

    with sqlite3.connect(db) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"transitions", "hosts", "relays"} <= tables
