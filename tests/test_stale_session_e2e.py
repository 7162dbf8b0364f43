"""A monitor inheriting a stale persistent session (issue 12, item 4), with real processes on a
private Mosquitto: monitor A (fixed client id) stops; relay r keeps publishing bundles into A's
queued session, then dies (kill -9: its will fires); seconds later monitor B starts with the same
client id and gets the whole replay. The dead relay and its hosts must not turn `up`, and nothing
spurious pages (no recovery, no "leaf restarted").

Shorter than the issue's 20 s: relay flush 0.2 s and leaves every 0.5 s, so the backlog is ~15
bundles old by several relay timeouts when B reads it. The relay sends its bundles at QoS 1
(`--bundle-qos 1`): at the default 0 a broker queues none for an absent session, so nothing is replayed.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from relaybeat.relay.ports import pick_free
from tests.processes import Receiver, Topology, api_get, wait_until

HOSTS = ("h1", "h2")


def retained_status(port: int, topic: str) -> str:
    """The relay's retained status on the broker, as a fresh subscriber gets it ("" if none yet)."""
    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda _c, _u, message: got.append(bytes(message.payload))
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        wait_until(lambda: got, 5, "the retained status")
    except AssertionError:
        return ""
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0].decode()


def history(api: str) -> list[dict[str, Any]]:
    body: dict[str, Any] = api_get(api, "/api/v1/transitions?limit=1000")
    return list(body["items"])


def bundles_received(api: str) -> float:
    response = httpx.get(api + "/metrics", timeout=5)
    response.raise_for_status()
    for line in response.text.splitlines():
        if line.startswith("relaybeat_bundles_received_total "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("database", ["fresh", "same"])
def test_a_monitor_inheriting_a_stale_session_never_shows_the_dead_relay_up(tmp_path: Path, database: str) -> None:
    prefix, tag = f"stale{uuid.uuid4().hex[:6]}/", uuid.uuid4().hex[:6]
    relay_id, client_id = f"r-{tag}", f"monitor-{tag}"
    receiver = Receiver()
    (tmp_path / "a").mkdir()
    first = second = Topology(tmp_path / "a", prefix)
    try:
        port = pick_free("127.0.0.1")
        broker = first.mosquitto("broker", port)
        hooks = receiver.config(tmp_path)
        first.monitor(broker, pick_free("127.0.0.1"), client_id=client_id, extra=hooks)
        serve = pick_free("127.0.0.1")
        first.relay(relay_id, broker, serve=serve, flush=0.2, extra=("--hold-first-s", "0", "--bundle-qos", "1"))
        for host in HOSTS:
            first.leaf(host, f"mqtt://127.0.0.1:{serve}")
        for host in HOSTS:
            first.wait_state("hosts", host, "up", 30)

        before = max((row["id"] for row in history(first.api)), default=0) if database == "same" else 0
        assert first.services["monitor"].stop() == 0  # its session stays on the broker, queueing for it
        time.sleep(3.0)  # the relay keeps publishing into that queue: ~15 bundles
        first.services[relay_id].kill()  # kill -9: the broker fires its will after 1.5 keepalives (3 s)
        status = f"{prefix}relay/{relay_id}/status"
        # its will: `offline <boot> <session>`
        wait_until(lambda: retained_status(port, status).startswith("offline "), 30, "the relay's will")
        time.sleep(2.0)  # the backlog is now well past every timeout (relay 0.6 s, hosts 1.5 s)

        if database == "fresh":  # a new monitor on its own database: it knows nothing of r
            (tmp_path / "b").mkdir()
            second = Topology(tmp_path / "b", prefix)
        started = time.monotonic()
        second.monitor(broker, pick_free("127.0.0.1"), client_id=client_id, extra=hooks)
        wait_until(lambda: bundles_received(second.api) >= 5, 20, "the replayed backlog")
        time.sleep(max(0.0, started + 6.0 - time.monotonic()))  # grace and every deadline have passed

        rows = [row for row in history(second.api) if row["id"] > before]
        assert [r for r in rows if r["to"] == "up"] == [], rows  # neither the relay nor a host turns up
        assert [r for r in rows if r["event"] == "restart"] == [], rows  # no "leaf restarted"
        posted = [body["type"] for _, body in receiver.posts]
        if database == "fresh":
            assert rows == []  # it never saw r alive: no evidence, no state, no page
            assert posted == []
            assert api_get(second.api, f"/api/v1/relays/{relay_id}") is None
        else:  # it knew r up: r is down (it is dead), its hosts unreachable: one true outage, no recovery
            assert second.state("relays", relay_id) == "down"
            assert {second.state("hosts", h) for h in HOSTS} == {"unreachable"}
            assert "recovery" not in posted
    finally:
        second.close()
        if second is not first:
            first.close()
        receiver.close()
