"""relaybeat on a private RabbitMQ node (3.10, `rabbitmq_mqtt`), real processes (README: "Running on
NATS or RabbitMQ").

Leaves beat to the test's site broker (`central_broker`: the system Mosquitto under a unique prefix, or
an embedded broker); their relay's upstream and the monitor are on RabbitMQ. All hosts `up`; a leaf
killed → `down`; the relay killed (kill -9) → its hosts `unreachable` through its Last Will, delivered
live by RabbitMQ. Then the README's known limitation: retained statuses are not delivered to the
monitor's wildcard subscription, so a monitor started after a relay died learns it only by the
relay's timeout (`no bundle for ...`), not from the retained `offline` (a monitor resuming its
persistent session does get the will queued in it meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.processes import PrivateRabbitMQ, Topology

pytestmark = pytest.mark.e2e

LEAVES = ("web-1", "web-2", "probe")


@pytest.fixture
def rabbit(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ(tmp_path / "rabbitmq")
    try:
        node.wait_ready()
        yield node
    finally:
        node.close()


def test_relaybeat_on_rabbitmq(tmp_path: Path, rabbit: PrivateRabbitMQ, central_broker: CentralBroker) -> None:
    topo = Topology(tmp_path, central_broker.prefix)
    try:
        topo.monitor(rabbit.url, pick_free("127.0.0.1"))
        topo.relay("r1", rabbit.url, local=central_broker.url, flush=1.0)
        for leaf in LEAVES:
            topo.leaf(leaf, central_broker.url, interval=1.0)
        for leaf in LEAVES:
            topo.wait_state("hosts", leaf, "up", timeout=40)
        topo.wait_state("relays", "r1", "up", timeout=20)

        topo.services["probe"].kill()  # a leaf dies (kill -9, no `stopping` beat): its beats stop
        topo.wait_state("hosts", "probe", "down", timeout=30)

        topo.services["r1"].kill()  # kill -9: only the broker can tell, by the relay's Last Will
        topo.wait_state("relays", "r1", "down", timeout=30)
        for leaf in ("web-1", "web-2"):
            topo.wait_state("hosts", leaf, "unreachable", timeout=30)
        assert topo.transitions("r1")[-1][2] == "relay r1 said offline (status topic / last will)"

        # The relay back, then the monitor stopped, the relay killed meanwhile, a monitor started again.
        topo.relay("r1", rabbit.url, local=central_broker.url, flush=1.0)
        topo.wait_state("relays", "r1", "up", timeout=30)
        for leaf in ("web-1", "web-2"):
            topo.wait_state("hosts", leaf, "up", timeout=30)
        topo.services["monitor"].stop()
        topo.services["r1"].kill()  # its will `offline` is retained on RabbitMQ, node-local, and not
        # delivered to the wildcard `.../relay/+/status`. A fresh client id: the old persistent session
        # would hand over the will queued for it while the monitor was away (seen on RabbitMQ 3.10.8).
        topo.monitor(rabbit.url, pick_free("127.0.0.1"), client_id=f"{topo.monitor_id}-new")
        topo.wait_state("relays", "r1", "down", timeout=40)
        reason = topo.transitions("r1")[-1][2]
        assert reason.startswith("no bundle for "), reason  # by its timeout, not by the retained status
    finally:
        topo.close()
