"""Real processes for end-to-end tests: start `relaybeat ...` subcommands (and Mosquitto), wait on
conditions, read the API and the database (SQLite or PostgreSQL, through SQLAlchemy), and run a
private PostgreSQL server that a test may stop and start."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Engine, create_engine, select

from relaybeat.broker_config.settings import load_broker_settings
from relaybeat.monitor.tables import TransitionModel
from relaybeat.relay.ports import pick_free

T = TypeVar("T")


class Service:
    """A `relaybeat` subcommand (or another `command`) as its own process, run in `log_dir`, its output
    kept in a log file there."""

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        *,
        command: Sequence[str] = (sys.executable, "-m", "relaybeat"),
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=log_dir,  # whatever a process writes by a relative default (a journal, say) stays in the test's folder
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
            msg = f"{self.name} did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}"
            raise AssertionError(msg) from None
        finally:
            self._log.close()

    def close_log(self) -> None:
        self._log.close()

    def assert_running(self) -> None:
        if self.process.poll() is not None:
            msg = f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
            raise AssertionError(msg)


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05, *, service: Service | None = None
) -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds, or at
    once (with its log) if `service` exits meanwhile."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if result:
                return result
            last = result
        if service is not None:
            service.assert_running()
        time.sleep(every)
    msg = f"timed out after {timeout} s waiting for {what}; last saw {last!r}"
    raise AssertionError(msg)


def api_get(base: str, path: str) -> Any:
    response = httpx.get(base + path, timeout=5)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


class Topology:
    """Brokers, relays, a monitor and leaves as separate processes, all on free loopback ports.

    Every topic lives under `prefix`, so tests sharing one external broker never see each other.
    The monitor stores into `db_url` (a SQLite file in `log_dir` unless given, e.g. the `postgres_url`
    fixture's fresh schema); `transitions()` reads it back on either database.
    """

    def __init__(self, log_dir: Path, prefix: str, db_url: str | None = None) -> None:
        self.log_dir = log_dir
        self.prefix = prefix
        self.services: dict[str, Service] = {}
        self.db_url = db_url or f"sqlite:///{log_dir / 'relaybeat.db'}"
        self.api = ""
        self.monitor_id = f"monitor-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self._history: History | None = None

    def start(self, name: str, args: list[str], *, command: Sequence[str] | None = None) -> Service:
        if name in self.services and self.services[name].process.poll() is None:
            msg = f"{name} is already running"
            raise AssertionError(msg)
        if name in self.services:
            self.services[name].close_log()
        if command is None:
            self.services[name] = Service(name, args, self.log_dir)
        else:
            self.services[name] = Service(name, args, self.log_dir, command=command)
        return self.services[name]

    def broker(self, name: str, port: int, config: Path | None = None, *, wait: bool = True) -> str:
        """`relaybeat broker` on `port`, optionally from a broker TOML; returns its mqtt:// or mqtts:// URL.
        With `wait=False`, call `wait_listening` before using it (to start several at once)."""
        tls = config is not None and load_broker_settings(config).tls
        args = ["broker", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"]
        self.start(name, [*args, "--config", str(config)] if config else args)
        if wait:
            self.wait_listening(name, port)
        return f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}"

    def wait_listening(self, name: str, port: int, timeout: float = 20) -> None:
        service = self.services[name]
        wait_until(lambda: port_open(port), timeout, f"{name} to listen on {port}", service=service)

    def mosquitto(self, name: str, port: int, config: str | None = None) -> str:
        """Mosquitto on `port`: anonymous and plain unless `config` (a whole mosquitto.conf) says otherwise."""
        conf = self.log_dir / f"{name}.conf"
        text = config or f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        if os.geteuid() == 0 and not re.search(r"^user ", text, re.M):
            text += "user root\n"  # else it drops to user mosquitto, who cannot read the test's files
        conf.write_text(text)
        binary = mosquitto_binary()
        if binary is None:
            msg = "mosquitto is not installed (apt install mosquitto)"
            raise AssertionError(msg)
        service = self.start(name, ["-c", str(conf)], command=[binary])
        wait_until(lambda: port_open(port), 20, f"{name} to listen", service=service)
        return f"mqtt://127.0.0.1:{port}"

    def relay(self, relay_id: str, upstream: str, *, serve: int | None = None, local: str | None = None,
              flush: float = 0.5, extra: Sequence[str] = ("--hold-first-s", "0")) -> Service:  # fmt: skip
        """`extra`: more flags; by default the first bundle is not held (tests that want it say so)."""
        where = ["--local", "embedded", "--serve", f"127.0.0.1:{serve}"] if serve else ["--local", str(local)]
        service = self.start(
            relay_id,
            ["relay", "--id", relay_id, *where, "--upstream", upstream, "--flush", str(flush),
             "--prefix", self.prefix, "--log-level", "warning", *extra],
        )  # fmt: skip
        if serve:
            wait_until(lambda: port_open(serve), 20, f"{relay_id}'s broker", service=service)
        return service

    def monitor(
        self, broker: str, port: int, misses: int = 3, client_id: str | None = None, extra: Sequence[str] = ()
    ) -> Service:
        """The monitor on `broker`, its API on `port`; `client_id` defaults to a unique one (on an
        authenticating broker it must be the monitor's username: broker_config/README.md)."""
        self.api = f"http://127.0.0.1:{port}"
        service = self.start(
            "monitor",
            ["monitor", "--broker", broker, "--db", self.db_url, "--listen", f"127.0.0.1:{port}",
             "--misses", str(misses), "--prefix", self.prefix, "--client-id", client_id or self.monitor_id,
             "--journal", str(self.log_dir / "monitor.journal"), "--log-level", "warning", *extra],
        )  # fmt: skip
        wait_until(lambda: api_get(self.api, "/healthz"), 30, "the monitor's API", service=service)
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

    def healthz(self) -> dict[str, Any]:
        body: dict[str, Any] = api_get(self.api, "/healthz")
        return body

    def transitions(self, subject: str, event: str = "transition") -> list[tuple[str, str, str]]:
        """(from, to, reason) rows of `subject` in the monitor's database, oldest first."""
        if self._history is None:
            self._history = History(self.db_url)
        return self._history.rows(subject, event)

    def moves(self, subject: str) -> list[tuple[str, str]]:
        return [(f, t) for f, t, _ in self.transitions(subject)]

    def close(self) -> None:
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
            service.close_log()
        if self._history is not None:
            self._history.close()


class History:
    """Reads the `transitions` table of a monitor's database (SQLite or PostgreSQL) with a small
    synchronous engine; timestamps come back as aware UTC on both (through the model's types)."""

    def __init__(self, db_url: str) -> None:
        self.engine: Engine = create_engine(db_url)

    def records(self, subject: str, event: str = "transition") -> list[Any]:
        t = TransitionModel
        query = (
            select(t.from_state, t.to_state, t.reason, t.at, t.relay)
            .where(t.subject == subject, t.event == event)
            .order_by(t.id)
        )
        with self.engine.connect() as connection:
            return list(connection.execute(query))

    def rows(self, subject: str, event: str = "transition") -> list[tuple[str, str, str]]:
        return [(str(r.from_state), str(r.to_state), r.reason) for r in self.records(subject, event)]

    def close(self) -> None:
        self.engine.dispose()


class Receiver:
    """A webhook receiver: every POST's body and Idempotency-Key."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.headers["Idempotency-Key"], json.loads(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def config(self, folder: Path) -> list[str]:
        """The monitor's flags for a deployment file (written in `folder`) whose one webhook is this
        receiver, told of `down` and `unreachable`, retrying after 0.2 s."""
        path = folder / "relaybeat.toml"
        path.write_text(
            f'[notify]\nretry_min_s = 0.2\n[[notify.webhooks]]\nname = "ops"\nurl = "{self.url}"\n'
            'states = ["down", "unreachable"]\n'
        )
        return ["--config", str(path)]

    def kinds(self) -> Counter[tuple[str, str]]:
        return Counter((body["type"], body["incident"]) for _, body in self.posts)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------------- Mosquitto

CONFIG_DIR = Path(__file__).resolve().parent.parent / "broker_config"


def mosquitto_binary() -> str | None:
    """Where `mosquitto` is (it lives in /usr/sbin on Debian, often not on a user's PATH), or None."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def require_mosquitto() -> str:
    """The `mosquitto` binary; skips the test without one, but fails it when RELAYBEAT_TEST_MQTT_URL
    is set (CI, where Mosquitto must be there)."""
    binary = mosquitto_binary()
    if binary is None:
        if os.environ.get("RELAYBEAT_TEST_MQTT_URL"):
            pytest.fail("RELAYBEAT_TEST_MQTT_URL is set but the mosquitto binary is not installed")
        pytest.skip("mosquitto is not installed (apt install mosquitto mosquitto-clients)")
    return binary


def shipped_mosquitto_config(workdir: Path, port: int, password_file: Path, acl_file: Path, *, extra: str = "") -> str:
    """broker_config/mosquitto.conf with its listener, files and paths moved into `workdir` (one
    directory per Mosquitto: its persistence file and its log, `mosquitto.log`, live there)."""
    overrides = {
        "password_file": str(password_file),
        "acl_file": str(acl_file),
        "listener": f"{port} 127.0.0.1",
        "persistence_location": f"{workdir}/",
        "log_dest": f"file {workdir / 'mosquitto.log'}",
    }
    lines, replaced = [], set()
    for line in (CONFIG_DIR / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in overrides:
            line = f"{key} {overrides[key]}"
            replaced.add(key)
        lines.append(line)
    if replaced != set(overrides):
        msg = f"broker_config/mosquitto.conf no longer sets {sorted(set(overrides) - replaced)}"
        raise AssertionError(msg)
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to user mosquitto, who cannot read the test's files
    return "\n".join([*lines, extra]) + "\n"


def shipped_acl(relays: Sequence[str], monitors: Sequence[str]) -> str:
    """broker_config/acl with its example `user relay-a` / `user monitor` blocks repeated for each
    relay and monitor username given (the shipped lines, names swapped)."""
    text = (CONFIG_DIR / "acl").read_text()
    blocks = re.findall(r"^user (\S+)\n((?:topic .*\n?)+)", text, re.M)
    found = {user: body for user, body in blocks}
    if "relay-a" not in found or "monitor" not in found:
        msg = "broker_config/acl no longer has the example `user relay-a` and `user monitor` blocks"
        raise AssertionError(msg)
    head = text[: text.index("user relay-a")]
    out = [head]
    for name in relays:
        out.append(f"user {name}\n" + found["relay-a"].replace("relay-a", name))
    for name in monitors:
        out.append(f"user {name}\n" + found["monitor"])
    return "\n".join(out)


def shipped_amqtt_config(folder: Path, password_file: Path, relays: Sequence[str], monitors: Sequence[str]) -> Path:
    """broker_config/amqtt.toml with a password file and these relay and monitor users, written to
    `folder` (the port comes from `relaybeat broker --bind`)."""
    overrides = {
        "password_file": f'"{password_file}"',
        "relays": "[" + ", ".join(f'"{name}"' for name in relays) + "]",
        "monitors": "[" + ", ".join(f'"{name}"' for name in monitors) + "]",
    }
    lines, replaced = [], set()
    for line in (CONFIG_DIR / "amqtt.toml").read_text().splitlines():
        found = re.match(r"#?\s*(\w+)\s*=", line)
        if found and found.group(1) in overrides:
            line = f"{found.group(1)} = {overrides[found.group(1)]}"
            replaced.add(found.group(1))
        lines.append(line)
    if replaced != set(overrides):
        msg = f"broker_config/amqtt.toml no longer sets {sorted(set(overrides) - replaced)}"
        raise AssertionError(msg)
    config = folder / "amqtt.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def mosquitto_passwords(path: Path, passwords: dict[str, str]) -> None:
    """A Mosquitto password file (PBKDF2-SHA512), with `mosquitto_passwd`."""
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")
    if tool is None:
        msg = "mosquitto_passwd is not installed (apt install mosquitto)"
        raise AssertionError(msg)
    for index, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if index == 0 else []
        subprocess.run([tool, *create, "-b", str(path), user, password], check=True, capture_output=True)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------- private PostgreSQL


class PrivatePostgres:
    """A PostgreSQL server of our own on a free loopback port, for tests that cut the database and
    bring it back (never the system server on 5432). `start()`, `stop()` (`pg_ctl stop -m fast`:
    every connection is cut at once), `close()` (stop and delete everything). initdb refuses root, so
    as root the server runs as the `postgres` user. Skips the test if PostgreSQL is not installed."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            pytest.skip("PostgreSQL server binaries not found (apt install postgresql)")
        self._bin = found[-1].parent
        self.port = pick_free("127.0.0.1")
        self.dir = Path(tempfile.mkdtemp(prefix="relaybeat-pg-"))  # not under pytest's root-only tmp
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            shutil.chown(self.dir, self._user)
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def _pg(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [str(self._bin / tool), *args],
            user=self._user,
            cwd=self.dir,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "HOME": str(self.dir)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            msg = f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}{log}"
            raise AssertionError(msg)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w", "start")
        self.running = True

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def close(self) -> None:
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------- NATS cluster


class NatsCluster:
    """A private NATS cluster (3 nodes unless `nodes` says otherwise; 1: a single server, no cluster
    routes) with JetStream and an MQTT listener on every node, each node with its own free ports and
    a fresh store_dir under `folder` (../shared/BROKERS.md). Skips the test if `nats-server` is not
    installed. `kill(i)` is kill -9 of node i; `close()` kills what is left."""

    def __init__(self, folder: Path, nodes: int = 3) -> None:
        binary = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")
        if binary is None:
            pytest.skip("nats-server is not installed (apt install nats-server)")
        self.folder = folder
        ports = [[pick_free("127.0.0.1") for _ in range(4)] for _ in range(nodes)]  # client, http, mqtt, route
        self.mqtt_ports = [p[2] for p in ports]
        self.http_ports = [p[1] for p in ports]
        routes = ", ".join(f"nats-route://127.0.0.1:{p[3]}" for p in ports)
        self.services: list[Service] = []
        self._binary = binary
        for i, (client, http, mqtt, route) in enumerate(ports, 1):
            conf = folder / f"nats-{i}.conf"
            conf.write_text(
                f"server_name: c{i}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\n"
                f"jetstream {{ store_dir: {folder / f'store-{i}'} }}\nmqtt {{ listen: 127.0.0.1:{mqtt} }}\n"
                + (f"cluster {{ name: c1\n  listen: 127.0.0.1:{route}\n  routes: [{routes}] }}\n" if nodes > 1 else "")
            )
            self.services.append(Service(f"nats-{i}", ["-c", str(conf)], folder, command=[binary]))

    def url(self, i: int) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_ports[i]}"

    def wait_ready(self, timeout: float = 30) -> None:
        for i, (http, mqtt) in enumerate(zip(self.http_ports, self.mqtt_ports, strict=True)):

            def ready(http: int = http, mqtt: int = mqtt) -> bool:
                url = f"http://127.0.0.1:{http}/healthz?js-enabled-only=true"
                return httpx.get(url, timeout=2).status_code == 200 and port_open(mqtt)

            wait_until(ready, timeout, f"NATS node {i + 1}", service=self.services[i])

    def kill(self, i: int) -> None:
        self.services[i].kill()

    def restart(self, i: int) -> None:
        """Node i again, on its ports and store_dir: it rejoins the cluster (wait_ready before use)."""
        self.services[i].close_log()
        conf = self.folder / f"nats-{i + 1}.conf"
        self.services[i] = Service(f"nats-{i + 1}", ["-c", str(conf)], self.folder, command=[self._binary])

    def close(self) -> None:
        for service in self.services:
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
            service.close_log()


# ------------------------------------------------------------------------------------ RabbitMQ

RABBITMQ_SBIN = Path("/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8/sbin")


class PrivateRabbitMQ:
    """A private RabbitMQ node (3.10, `rabbitmq_mqtt` plugin) on free loopback ports, every file under
    `folder` (../shared/BROKERS.md); never the system node on 5672. Fails (not skips) if RabbitMQ is
    missing: CI has it. Its own process group, so `close()` (rabbitmqctl stop under the same HOME, then
    kill -9 of the group) leaves no Erlang process behind."""

    def __init__(self, folder: Path, sbin: Path = RABBITMQ_SBIN) -> None:
        self.server, self.ctl = sbin / "rabbitmq-server", sbin / "rabbitmqctl"
        if not self.server.exists():
            msg = f"RabbitMQ is not installed: {self.server} is missing (apt install rabbitmq-server)"
            raise AssertionError(msg)
        self.folder = folder
        amqp, dist, self.mqtt_port = (pick_free("127.0.0.1") for _ in range(3))
        self.node = f"rbt{os.getpid()}x{time.monotonic_ns() % 10**6}@localhost"
        (folder / "home").mkdir(parents=True, exist_ok=True)
        (folder / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\nmqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n"
        )
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(amqp), "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"), "RABBITMQ_CONF_ENV_FILE": "/dev/null",
            "HOME": str(folder / "home"),
        }  # fmt: skip
        self.log_path = folder / "rabbitmq.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(self.server)], stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=folder,
            start_new_session=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                msg = f"RabbitMQ exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}"
                raise AssertionError(msg)
            return port_open(self.mqtt_port)

        wait_until(ready, timeout, "the private RabbitMQ's MQTT listener", every=0.5)

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                subprocess.run(
                    [str(self.ctl), "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=60, check=False
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # any Erlang child left behind
            self.process.wait(10)
            self._log.close()
