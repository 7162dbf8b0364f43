"""Reports: medians with ranges, a printed table, JSON with the machine's description, PNG plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from bench.procs import MOSQUITTO, REPO

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median and range of repeated measurements."""
    got = [float(v) for v in values]
    if not got:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    got = sorted(values)
    out: dict[str, float] = {"n": len(got)}
    if not got:
        return out
    for p in points:
        rank = min(len(got) - 1, max(0, round(p / 100 * (len(got) - 1))))
        out[f"p{p:g}"] = got[rank]
    out["min"] = got[0]
    out["max"] = got[-1]
    return out


def num(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:,.{digits}f}"


def med(s: dict[str, float], digits: int = 0) -> str:
    """`median [min–max]` as the README and BENCHMARKS.md quote figures."""
    if not s.get("n"):
        return "–"
    if s["n"] == 1:
        return num(s["median"], digits)
    return f"{num(s['median'], digits)} [{num(s['min'], digits)}–{num(s['max'], digits)}]"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mosquitto = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=5).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        mosquitto = []
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mosquitto": mosquitto[0] if mosquitto else "",
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "relay", "monitor", "api", "relaybeat")),
        "loadavg": os.getloadavg(),
    }


@dataclass
class Report:
    """What one scenario measured: figures (JSON), printed tables, plots."""

    scenario: str
    args: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    before: dict[str, Any] = field(default_factory=machine)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.text.append(text)

    def save(self, out: Path, figures: dict[str, Figure] | None = None) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        body = {
            "scenario": self.scenario,
            "args": self.args,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "machine": self.before,
            "loadavg_after": os.getloadavg(),
            "results": self.data,
            "table": "\n\n".join(self.text),
        }
        stem = self.scenario + ("_embedded" if self.args.get("broker") == "embedded" else "")
        path = out / f"{stem}.json"
        path.write_text(json.dumps(body, indent=1, default=str) + "\n")
        for name, figure in (figures or {}).items():
            figure.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)
        print(f"saved {path}" + (f" and {len(figures)} plot(s)" if figures else ""), flush=True)
        return path


def render_profile(session: Path) -> dict[str, str]:
    """A saved pyinstrument session rendered as HTML (flame-style, interactive) and as text."""
    files = {}
    for renderer, suffix in (("html", "html"), ("text", "txt")):
        target = session.with_suffix(f".{suffix}")
        subprocess.run(
            [sys.executable, "-m", "pyinstrument", "--load", str(session), "-r", renderer, "-o", str(target)],
            check=True,
            timeout=120,
        )
        files[renderer] = str(target)
    return files


def figure(rows: int = 1, cols: int = 1, width: float = 9, height: float = 4) -> tuple[Figure, Any]:
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    return fig, axes
