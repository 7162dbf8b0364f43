"""`relaybeat up` works on embedded defaults from a clean directory and exits cleanly; its deployment
file (`--config`) and the RELAYBEAT_API_* variables apply, so a demo can be written to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import wait_until

pytestmark = pytest.mark.e2e

WRITE_TOKEN = "demo-write-token-0123456789"  # from the file
READ_TOKEN = "demo-read-token-0123456789"  # from RELAYBEAT_API_TOKENS


def test_relaybeat_up_serves_a_dozen_live_hosts_and_exits_cleanly(tmp_path: Path, free_port: int) -> None:
    config = tmp_path / "relaybeat.toml"
    config.write_text(f'[api]\nwrite_tokens = ["{WRITE_TOKEN}"]\n')
    env = {**os.environ, "RELAYBEAT_API_TOKENS": READ_TOKEN}
    demo = subprocess.Popen(
        [sys.executable, "-m", "relaybeat", "up", "--api-port", str(free_port), "--duration", "12",
         "--db", f"sqlite:///{tmp_path / 'demo.db'}", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{free_port}", timeout=5)
        read = {"Authorization": f"Bearer {READ_TOKEN}"}

        def hosts() -> dict[str, object] | None:
            body: dict[str, object] = api.get("/api/v1/hosts", headers=read).json()
            return body if body.get("total") == 12 else None

        listed = wait_until(hosts, 30, "12 demo hosts")
        assert {h["relay"] for h in listed["items"]} == {"relay-a", "relay-b"}  # type: ignore[attr-defined]
        assert api.get("/api/v1/hosts").status_code == 401  # RELAYBEAT_API_TOKENS protects reads
        window = {"host": "db-1", "duration_s": 60, "reason": "demo"}
        assert api.post("/api/v1/maintenance", json=window, headers=read).status_code == 403
        written = api.post("/api/v1/maintenance", json=window, headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
        assert written.status_code == 201, written.text  # the file's write token
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output
    assert "relaybeat is up." in output
    assert f"http://127.0.0.1:{free_port}" in output
    assert "Writes: use your write token" in output
    assert "Reads need a token too" in output
    assert "export RELAYBEAT_API_WRITE_TOKENS" not in output  # one was configured: none is made
    assert WRITE_TOKEN not in output
    assert "relaybeat demo stopped cleanly." in output
