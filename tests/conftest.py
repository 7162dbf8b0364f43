"""Shared fixtures: free ports, and the real MQTT broker the end-to-end tests talk to.

RELAYBEAT_TEST_MQTT_URL=mqtt://127.0.0.1:1883 points the end-to-end tests at an existing broker
(Mosquitto in CI); unset, each test starts `relaybeat broker` (embedded amqtt) on a free port.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.ports import pick_free
from tests.processes import Service, wait_until

MQTT_ENV = "RELAYBEAT_TEST_MQTT_URL"


@pytest.fixture
def free_port() -> int:
    return pick_free("127.0.0.1")


@dataclass(frozen=True)
class CentralBroker:
    url: str
    prefix: str  # unique per test, so tests sharing one Mosquitto never see each other's messages
    kind: str


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def central_broker(tmp_path: Path) -> Iterator[CentralBroker]:
    prefix = f"rbt{uuid.uuid4().hex[:8]}/"
    external = os.environ.get(MQTT_ENV)
    if external:
        yield CentralBroker(external, prefix, "external")
        return
    port = pick_free("127.0.0.1")
    broker = Service("central-broker", ["broker", "--bind", f"127.0.0.1:{port}", "--log-level", "warning"], tmp_path)
    try:
        wait_until(lambda: port_open(port) or broker.assert_running(), 15, "the embedded broker to listen")
        yield CentralBroker(f"mqtt://127.0.0.1:{port}", prefix, "embedded")
    finally:
        broker.stop()
