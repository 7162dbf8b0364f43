"""The wheel installs under its own name and runs from an empty directory.

Builds the wheel from this checkout, installs it (without dependencies) into a fresh virtualenv
that borrows the test environment's third-party packages, and runs `relaybeat up` there from an
empty directory: the code that runs must be the wheel's, not this checkout's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.processes import api_get, wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_NAMES = {"relay", "monitor", "api", "migrations", "broker_config", "tests", "bench"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check", "-w", str(out),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (found,) = out.glob("relaybeat-*.whl")
    return found


def test_the_wheel_holds_only_the_relaybeat_namespace_and_ships_configs_and_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"relaybeat"}, f"the wheel installs top-level names {sorted(top)}"
    for wanted in (
        "relaybeat/relay/wire.py",
        "relaybeat/monitor/detector.py",
        "relaybeat/api/dashboard.html",
        "relaybeat/migrations/env.py",
        "relaybeat/migrations/versions/0001_initial.py",
        "relaybeat/broker_config/mosquitto.conf",
        "relaybeat/broker_config/acl",
        "relaybeat/broker_config/amqtt.toml",
        "relaybeat/relaybeat.example.toml",
    ):
        assert wanted in names, f"{wanted} is missing from the wheel"
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert not TOP_LEVEL_NAMES & top


def test_relaybeat_up_runs_from_the_wheel_in_a_fresh_virtualenv(wheel: Path, tmp_path: Path, free_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAYBEAT_", "PYTHONPATH"))}
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        env=env, text=True).strip())  # fmt: skip
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    # Third-party packages from the test environment, after the fresh site-packages: a plain path
    # entry (its .pth files, including this checkout's editable finder, are not run).
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.check_output([str(python), "-c", "import relaybeat.relay.wire as w; print(w.__file__)"],
                                    cwd=empty, env=env, text=True).strip()  # fmt: skip
    assert Path(where).is_relative_to(site), f"relaybeat.relay came from {where}, not the wheel"
    demo = subprocess.Popen(
        [str(env_dir / "bin" / "relaybeat"), "up", "--api-port", str(free_port), "--duration", "8"],
        cwd=empty, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{free_port}"
        wait_until(lambda: api_get(api, "/api/v1/hosts")["total"] == 12, 60, "the demo's 12 hosts")
        output, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, output
    assert "relaybeat demo stopped cleanly." in output
