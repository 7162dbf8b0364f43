"""Real processes for end-to-end tests: start `relaybeat ...` subcommands, wait on conditions, read the API."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class Service:
    """A `relaybeat` subcommand running as its own process, its output kept in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "relaybeat", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no goodbye, no will sent by the process itself."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}"
            ) from None
        finally:
            self._log.close()

    def assert_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last saw {last!r}")


def api_get(base: str, path: str) -> Any:
    response = httpx.get(base + path, timeout=5)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


class Topology:
    """Brokers, relays, a monitor and leaves as separate processes, all on free loopback ports.

    Every topic lives under `prefix`, so tests sharing one external broker never see each other.
    """

    def __init__(self, log_dir: Path, prefix: str) -> None:
        self.log_dir = log_dir
        self.prefix = prefix
        self.services: dict[str, Service] = {}
        self.db = log_dir / "relaybeat.db"
        self.api = ""
        self.monitor_id = f"monitor-{os.getpid()}-{time.monotonic_ns() % 10**9}"

    def start(self, name: str, args: list[str]) -> Service:
        if name in self.services and self.services[name].process.poll() is None:
            raise AssertionError(f"{name} is already running")
        self.services[name] = Service(name, args, self.log_dir)
        return self.services[name]

    def broker(self, name: str, port: int) -> str:
        service = self.start(name, ["broker", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"])
        wait_until(lambda: port_open(port) or service.assert_running(), 20, f"{name} to listen")
        return f"mqtt://127.0.0.1:{port}"

    def mosquitto(self, name: str, port: int) -> str:
        conf = self.log_dir / f"{name}.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        service = Service.__new__(Service)
        service.name, service.log_path, service._log, service.process = name, self.log_dir / f"{name}.log", log, process
        self.services[name] = service
        wait_until(lambda: port_open(port) or service.assert_running(), 20, f"{name} to listen")
        return f"mqtt://127.0.0.1:{port}"

    def relay(self, relay_id: str, upstream: str, *, serve: int | None = None, local: str | None = None,
              flush: float = 0.5) -> Service:  # fmt: skip
        where = ["--local", "embedded", "--serve", f"127.0.0.1:{serve}"] if serve else ["--local", str(local)]
        service = self.start(
            relay_id,
            ["relay", "--id", relay_id, *where, "--upstream", upstream, "--flush", str(flush),
             "--prefix", self.prefix, "--log-level", "warning"],
        )  # fmt: skip
        if serve:
            wait_until(lambda: port_open(serve) or service.assert_running(), 20, f"{relay_id}'s broker")
        return service

    def monitor(self, broker: str, port: int, misses: int = 3) -> Service:
        self.api = f"http://127.0.0.1:{port}"
        service = self.start(
            "monitor",
            ["monitor", "--broker", broker, "--db", f"sqlite:///{self.db}", "--listen", f"127.0.0.1:{port}",
             "--misses", str(misses), "--prefix", self.prefix, "--client-id", self.monitor_id,
             "--log-level", "warning"],
        )  # fmt: skip
        wait_until(lambda: api_get(self.api, "/healthz") or service.assert_running(), 30, "the monitor's API")
        return service

    def leaf(self, host_id: str, broker: str, interval: float = 0.5, name: str | None = None) -> Service:
        return self.start(
            name or host_id,
            ["leaf", "--id", host_id, "--broker", broker, "--interval", str(interval), "--prefix", self.prefix,
             "--log-level", "warning"],
        )  # fmt: skip

    def state(self, kind: str, subject: str) -> str | None:
        body = api_get(self.api, f"/api/v1/{kind}/{subject}")
        return None if body is None else str(body["state"])

    def wait_state(self, kind: str, subject: str, state: str, timeout: float = 15) -> None:
        wait_until(lambda: self.state(kind, subject) == state, timeout, f"{kind} {subject} {state}")

    def transitions(self, subject: str, event: str = "transition") -> list[tuple[str, str, str]]:
        query = "SELECT from_state, to_state, reason FROM transitions WHERE subject = ? AND event = ? ORDER BY id"
        with sqlite3.connect(self.db) as connection:
            return list(connection.execute(query, (subject, event)))

    def moves(self, subject: str) -> list[tuple[str, str]]:
        return [(f, t) for f, t, _ in self.transitions(subject)]

    def close(self) -> None:
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
            service._log.close()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0
