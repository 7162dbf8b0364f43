"""`relaybeat up` works on embedded defaults from a clean directory and exits cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import api_get, wait_until

pytestmark = pytest.mark.e2e


def test_relaybeat_up_serves_a_dozen_live_hosts_and_exits_cleanly(tmp_path: Path, free_port: int) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "relaybeat", "up", "--api-port", str(free_port), "--duration", "12",
         "--db", f"sqlite:///{tmp_path / 'demo.db'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{free_port}"
        hosts = wait_until(
            lambda: (body := api_get(api, "/api/v1/hosts")) and body["total"] == 12 and body, 30, "12 demo hosts"
        )
        wait_until(lambda: all(h["state"] == "up" for h in api_get(api, "/api/v1/hosts")["items"]), 10, "all up")
        assert {h["relay"] for h in hosts["items"]} == {"relay-a", "relay-b"}
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output
    assert "relaybeat is up." in output
    assert f"http://127.0.0.1:{free_port}" in output
    assert "relaybeat demo stopped cleanly." in output
