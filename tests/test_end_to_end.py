"""The whole path with real processes: leaves → relay (own embedded broker) → central broker → monitor →
SQL → HTTP API. Beats come from `mosquitto_pub`, a client we did not write, and from our leaf agent.

Runs on SQLite always, and on PostgreSQL too when RELAYBEAT_TEST_DB_URL is set (in a fresh schema);
the central broker is Mosquitto when RELAYBEAT_TEST_MQTT_URL is set (CI sets both), else an embedded one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.publish
import pytest

from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.processes import History, Service, api_get, port_open, wait_until

pytestmark = pytest.mark.e2e


def publish_beat(port: int, topic: str) -> None:
    """An empty beat, as `mosquitto_pub -n -t <topic>` sends it (paho when mosquitto_pub is missing)."""
    if shutil.which("mosquitto_pub"):
        command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-n", "-t", topic]
        subprocess.run(command, check=True, timeout=10)
    else:
        paho.mqtt.publish.single(topic, b"", hostname="127.0.0.1", port=port)


def state_of(api: str, kind: str, subject: str) -> Any:
    body = api_get(api, f"/api/v1/{kind}/{subject}")
    return None if body is None else body["state"]


def test_beat_through_relay_goes_up_then_down_in_api_and_sql_and_dead_relay_makes_hosts_unreachable(
    central_broker: CentralBroker, db_url: str, tmp_path: Path
) -> None:
    prefix = central_broker.prefix
    relay_port, api_port = pick_free("127.0.0.1"), pick_free("127.0.0.1")
    api = f"http://127.0.0.1:{api_port}"
    history = History(db_url)
    transitions = history.rows
    started = datetime.now(UTC)
    monitor = Service(
        "monitor",
        ["monitor", "--broker", central_broker.url, "--db", db_url, "--listen", f"127.0.0.1:{api_port}",
         "--misses", "3", "--prefix", prefix, "--client-id", f"monitor-{uuid.uuid4().hex[:8]}"],
        tmp_path,
    )  # fmt: skip
    relay = Service(
        "relay",
        ["relay", "--id", "r1", "--local", "embedded", "--serve", f"127.0.0.1:{relay_port}",
         "--upstream", central_broker.url, "--flush", "0.5", "--default-interval", "1", "--prefix", prefix],
        tmp_path,
    )  # fmt: skip
    leaf: Service | None = None
    try:
        wait_until(lambda: api_get(api, "/healthz"), 30, "the monitor's API", service=monitor)
        wait_until(lambda: port_open(relay_port), 30, "the relay's embedded broker", service=relay)
        wait_until(lambda: state_of(api, "relays", "r1") == "up", 30, "relay r1 up")

        # 1. Empty beats from mosquitto_pub (the relay's default interval: 1 s) make web-1 up.
        topic = f"{prefix}beat/web-1"
        for _ in range(3):
            publish_beat(relay_port, topic)
            time.sleep(0.3)
        wait_until(lambda: state_of(api, "hosts", "web-1") == "up", 10, "web-1 up")
        seen = api_get(api, "/api/v1/hosts/web-1")
        assert (seen["relay"], seen["interval_s"], seen["path"]) == ("r1", 1.0, ["r1"])

        # 2. Its beats stop: down within interval × misses + 1 s, and the transition is a row in SQL.
        publish_beat(relay_port, topic)
        last_beat = time.monotonic()
        wait_until(lambda: state_of(api, "hosts", "web-1") == "down", 10 + 3, "web-1 down")
        assert time.monotonic() - last_beat >= 1.0 * 3 - 1.0  # not before its deadline; how late, the reason says
        rows = wait_until(lambda: rows if len(rows := transitions("web-1")) == 2 else None, 5, "rows in SQL")
        assert [(f, t) for f, t, _ in rows] == [("unknown", "up"), ("up", "down")]
        assert rows[-1][2].startswith("no beat for 3.")
        assert rows[-1][2].endswith("(interval 1 s × 3)")
        # Timestamps are UTC on either database: aware in SQL, ISO with an offset in the API, and now.
        stored = [row.at for row in history.records("web-1")]
        assert all(at.utcoffset() == timedelta(0) for at in stored)
        assert started - timedelta(seconds=1) <= stored[0] <= stored[1] <= datetime.now(UTC) + timedelta(seconds=1)
        shown = [item["at"] for item in reversed(api_get(api, "/api/v1/hosts/web-1/transitions")["items"])]
        assert all(at.endswith("Z") for at in shown), shown
        assert [datetime.fromisoformat(at) for at in shown] == [at.replace(microsecond=at.microsecond // 1000 * 1000)
                                                                for at in stored]  # fmt: skip

        # 3. Our leaf agent beats through the relay; kill -9 the relay: its hosts turn unreachable, not down.
        leaf = Service(
            "leaf",
            ["leaf", "--id", "web-2", "--broker", f"mqtt://127.0.0.1:{relay_port}", "--interval", "0.5",
             "--prefix", prefix],
            tmp_path,
        )  # fmt: skip
        # a leaf process takes seconds to start on a busy box: generous waits cost nothing when it is quick
        wait_until(lambda: state_of(api, "hosts", "web-2") == "up", 60, "web-2 up")
        relay.kill()
        wait_until(lambda: state_of(api, "hosts", "web-2") == "unreachable", 30, "web-2 unreachable")
        assert state_of(api, "relays", "r1") == "down"
        assert state_of(api, "hosts", "web-1") == "down"  # it was dead before its relay: it stays down
        web2 = wait_until(lambda: rows if len(rows := transitions("web-2")) == 2 else None, 5, "web-2 rows")
        assert web2[-1] == ("up", "unreachable", "relay r1 down")
        assert transitions("r1")[-1][:2] == ("up", "down")

        # 4. Unknown ids are a 404; SIGTERM stops the leaf and the monitor cleanly.
        assert api_get(api, "/api/v1/hosts/nope") is None
        assert leaf.stop() == 0
        assert monitor.stop() == 0
    finally:
        for service in (leaf, relay, monitor):
            if service is not None and service.process.poll() is None:
                service.process.kill()
                service.process.wait(10)
        history.close()
