"""Real processes for benchmarks: private brokers, the monitor, relays; their CPU, memory and sockets.

A `Lab` owns a temporary directory and every process started through it, and ends them all on
close (SIGTERM, then SIGKILL after a timeout). Each child also gets SIGKILL if the benchmark
itself dies (PR_SET_PDEATHSIG), so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from relaybeat.relay.ports import pick_free
from tests.processes import wait_until  # the harnesses' one poll-until (raises AssertionError)

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
T = TypeVar("T")


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """One child process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=_die_with_parent,
        )
        self.ps = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> bool:
        """False while running (so `check() or ready()` reads well); raises if the process exited."""
        if not self.alive():
            msg = f"{self.name} exited with {self.popen.returncode}:\n{self.log()[-2000:]}"
            raise RuntimeError(msg)
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def bytes_from(self, port: int) -> dict[int, int]:
        """Bytes this process has received so far on each of its TCP connections to 127.0.0.1:`port`
        (keyed by its local port, so a reconnect shows), as the kernel counts them."""
        return {
            c.laddr.port: tcp_bytes_received(c.laddr.port, port)
            for c in self.ps.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port
        }

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGCONT)
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)


_BYTES_RECEIVED = re.compile(r"\bbytes_received:(\d+)")


def tcp_bytes_received(local_port: int, remote_port: int) -> int:
    """TCP payload bytes received so far on the loopback connection 127.0.0.1:local_port ->
    127.0.0.1:remote_port: the kernel's own counter (tcp_info.tcpi_bytes_received, as `ss -ti` shows
    it), exact, without TCP/IP headers. 0 if there is no such connection."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", "src", f"127.0.0.1:{local_port}", "dst", f"127.0.0.1:{remote_port}"],
        capture_output=True, text=True, timeout=10, check=True,
    ).stdout  # fmt: skip
    return sum(int(m) for m in _BYTES_RECEIVED.findall(out))


def bytes_between(before: dict[int, int], after: dict[int, int]) -> float:
    """Bytes received between two `Proc.bytes_from` readings; NaN if the connections changed
    (a reconnect: the counter of the connection that went away is lost)."""
    if not before or before.keys() != after.keys():
        return float("nan")
    return float(sum(after.values()) - sum(before.values()))


class Broker:
    def __init__(self, kind: str, proc: Proc, port: int) -> None:
        self.kind = kind
        self.proc = proc
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"

    def connections(self) -> int:
        """Established client connections to the broker's listening port, counted from the kernel."""
        return sum(
            1
            for c in self.proc.ps.net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
        )


class Monitor:
    def __init__(self, proc: Proc, api: str, db_url: str) -> None:
        self.proc = proc
        self.api = api
        self.db_url = db_url
        self.http = httpx.Client(base_url=api, timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = self.get("/healthz")
        return body

    def count(self, **params: Any) -> int:
        return int(self.get("/api/v1/hosts", limit=1, **params)["total"])

    def relay(self, relay_id: str) -> dict[str, Any] | None:
        response = self.http.get(f"/api/v1/relays/{relay_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


class Lab:
    """A temporary directory and the processes of one benchmark run."""

    def __init__(self, name: str = "bench") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"relaybeat-{name}-"))
        self.procs: list[Proc] = []
        self.closers: list[Callable[[], None]] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        self.close(keep=kind is not None)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.dir, env)
        self.procs.append(proc)
        return proc

    def relaybeat(self, name: str, args: list[str]) -> Proc:
        return self.start(name, [sys.executable, "-m", "relaybeat", *args, "--log-level", "warning"])

    def broker(self, kind: str, name: str = "broker", extra_conf: str = "") -> Broker:
        """`extra_conf`: more mosquitto configuration (e.g. a bridge)."""
        port = pick_free()
        if kind == "mosquitto":
            conf = self.dir / f"{name}.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
                "max_queued_messages 0\nmax_inflight_messages 100\nmax_connections -1\nsys_interval 1\n" + extra_conf
            )
            proc = self.start(name, [MOSQUITTO, "-c", str(conf)])
        elif kind == "embedded":
            proc = self.relaybeat(name, ["broker", "--bind", f"127.0.0.1:{port}"])
        else:
            msg = f"unknown broker kind {kind!r}: mosquitto or embedded"
            raise ValueError(msg)
        wait_until(lambda: proc.check() or port_open(port), 30, f"{name} to listen")
        return Broker(kind, proc, port)

    def monitor(
        self,
        broker: Broker,
        prefix: str,
        db_url: str | None = None,
        misses: int = 3,
        extra: list[str] | None = None,
        wrap: list[str] | None = None,
        name: str = "monitor",
    ) -> Monitor:
        port = pick_free()
        db_url = db_url or f"sqlite:///{self.dir / (name + '.db')}"
        args = ["monitor", "--broker", broker.url, "--db", db_url, "--listen", f"127.0.0.1:{port}",
                "--misses", str(misses), "--prefix", prefix, "--client-id", f"{name}-{os.getpid()}-{port}",
                "--journal", str(self.dir / f"{name}-{port}.journal"),  # not in the current directory
                "--log-level", "warning", *(extra or [])]  # fmt: skip
        if wrap:
            proc = self.start(name, [sys.executable, *wrap, "-m", "relaybeat", *args])
        else:
            proc = self.start(name, [sys.executable, "-m", "relaybeat", *args])
        monitor = Monitor(proc, f"http://127.0.0.1:{port}", db_url)
        self.closers.append(monitor.http.close)
        wait_until(lambda: proc.check() or monitor.health(), 60, f"{name}'s API")
        return monitor

    def relay(self, relay_id: str, local: Broker, upstream: Broker, prefix: str, flush_s: float = 1.0) -> Proc:
        return self.relaybeat(
            relay_id,
            ["relay", "--id", relay_id, "--local", local.url, "--upstream", upstream.url, "--flush", f"{flush_s:g}",
             "--prefix", prefix, "--no-children"],
        )  # fmt: skip

    def close(self, keep: bool = False) -> None:
        """End every process; keep the directory (logs, databases) when something went wrong."""
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.signal(signal.SIGCONT)
                proc.stop(10)
        if keep:
            print(f"(logs kept in {self.dir})", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def sample_cpu(procs: list[Proc]) -> float:
    return sum(p.cpu_s() for p in procs if p.alive())
