#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.11+.

    python3 dev.py demo     # creates .venv if needed (relaybeat only), then runs `relaybeat up`
    python3 dev.py test     # creates .venv if needed (with the test tools), then runs pytest (options follow)
    python3 dev.py lint     # ruff, ruff format --check, mypy --strict
    python3 dev.py bench    # the benchmark smoke size

`demo` installs only what relaybeat needs to run; the others install the `test` extra (pytest, ruff,
mypy, the benchmark tools) too. The virtualenv is brought up to date when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".relaybeat-installed"


def ensure_venv(extra: str | None) -> None:
    """.venv with relaybeat installed (editable), plus the optional dependencies `extra` if given.

    The stamp file holds the hash of pyproject.toml it was installed from, then the extra, if any."""
    if sys.version_info < (3, 11):  # noqa: UP036 - this file may run under an older python3
        sys.exit(f"relaybeat needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    stamp = STAMP.read_text().split() if STAMP.exists() else []
    if stamp[:1] == [wanted] and (extra is None or extra in stamp[1:]):
        return
    if not (BIN / "python").exists():
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    extras = sorted({*stamp[1:], extra} - {None}) if stamp[:1] == [wanted] else ([extra] if extra else [])
    target = f".[{','.join(extras)}]" if extras else "."
    what = "relaybeat" + (f" with its {', '.join(extras)} tools" if extras else "")
    print(f"installing {what} into .venv (once; again when pyproject.toml changes)", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    run([*pip, "-e", target])
    STAMP.write_text(" ".join([wanted, *extras]))


def run(command: list[str]) -> None:
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        sys.exit(code)


def main(argv: list[str]) -> None:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task not in {"demo", "test", "lint", "bench"}:
        sys.exit(__doc__)
    ensure_venv(None if task == "demo" else "test")
    if task == "demo":
        run([str(BIN / "relaybeat"), "up", *rest])
    elif task == "test":
        run([str(BIN / "python"), "-m", "pytest", *rest])
    elif task == "lint":
        run([str(BIN / "ruff"), "check", "."])
        run([str(BIN / "ruff"), "format", "--check", "."])
        run([str(BIN / "mypy")])
    elif task == "bench":
        run([str(BIN / "python"), "-m", "bench", "--smoke", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
