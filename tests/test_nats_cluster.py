"""Broker lists on a private 3-node NATS cluster with MQTT on every node (issue 12), real processes.

The monitor is given the nodes as `n1,n3,n2`, the relay's upstream as `n2,n3,n1`. kill -9 the
monitor's node (then start it again: JetStream, which keeps MQTT sessions, needs two of three nodes),
then the relay's node: the monitor hears through its spare session (already connected to another
node) while its main one moves on to the next node with its persistent session, the relay sends
through its spare session while its main one reconnects, and nothing turns `down` or `unreachable`
that is not; detection resumes (the monitor hears bundles again) within 5 s of the monitor's node
dying (the issue's bound), and a leaf that dies afterwards is still found `down`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relaybeat.relay.ports import pick_free
from tests.processes import NatsCluster, Topology, api_get, wait_until

pytestmark = pytest.mark.e2e

LEAVES = ("web-1", "web-2", "probe")
# The relay's node killed: bundles heard again within this (its spare session; 10.7 to 18.2 s before it,
# while its reconnect waited for JetStream). Generous: the issue asks for 5 s.
RELAY_NODE_BOUND_S = 10.0
# The monitor's node killed: bundles heard again within this (its spare session; 1.8 to 7.8 s before it,
# while its persistent session waited for JetStream). The bound.
MONITOR_NODE_BOUND_S = 5.0


def bundles(api: str) -> int:
    return int(api_get(api, "/healthz")["received"].get("bundles", 0))


def resumed_s(topo: Topology, killed: float, seen: int) -> float:
    """Seconds from a node's kill until the monitor is connected and heard two more bundles."""
    wait_until(
        lambda: api_get(topo.api, "/healthz")["broker_connected"] and bundles(topo.api) >= seen + 2,
        30,
        "the monitor to hear bundles again",
        service=topo.services["monitor"],
    )
    return time.monotonic() - killed


def test_killing_the_monitors_node_then_the_relays_node_raises_no_false_alarm(tmp_path: Path) -> None:
    nats = NatsCluster(tmp_path)
    topo = Topology(tmp_path, "relaybeat/")
    try:
        nats.wait_ready()
        monitor_brokers = ",".join(nats.url(i) for i in (0, 2, 1))
        relay_brokers = ",".join(nats.url(i) for i in (1, 2, 0))
        # misses 6: room for a busy box. When the monitor's node dies its spare session hears meanwhile;
        # the relay's bundles (QoS 0) go on through the relay's spare session when its node dies.
        topo.monitor(monitor_brokers, pick_free("127.0.0.1"), misses=6)
        site = pick_free("127.0.0.1")
        topo.relay("r1", relay_brokers, serve=site, flush=1.0)
        for leaf in LEAVES:
            topo.leaf(leaf, f"mqtt://127.0.0.1:{site}", interval=1.0)
        for leaf in LEAVES:
            topo.wait_state("hosts", leaf, "up", timeout=30)
        topo.wait_state("relays", "r1", "up", timeout=10)
        time.sleep(2.0)

        # The main session's node: the list's first, unless it did not answer in time at start-up (its
        # JetStream not ready yet) and the session went on to the next one (1 run in 8 did).
        main_node = [nats.url(i) for i in range(3)].index(api_get(topo.api, "/healthz")["broker"])
        seen = bundles(topo.api)
        nats.kill(main_node)  # the monitor's node
        first = resumed_s(topo, time.monotonic(), seen)
        time.sleep(7.0)  # longer than a relay's timeout (6 s): a false alarm would show by now
        nats.restart(main_node)  # a 3-node JetStream keeps going with one node down, not two
        nats.wait_ready()
        time.sleep(3.0)  # its JetStream rejoins (about 2 s: ../shared/BROKERS.md)

        seen = bundles(topo.api)
        nats.kill(1)  # the relay's node
        second = resumed_s(topo, time.monotonic(), seen)
        time.sleep(7.0)
        print(f"\nNATS cluster: bundles heard again {first:.1f} s after the monitor's node died, "
              f"{second:.1f} s after the relay's node died")  # fmt: skip

        assert "bundles go through the spare session" in topo.services["r1"].log()
        assert "the spare session hears in its place" in topo.services["monitor"].log()
        assert api_get(topo.api, "/healthz")["spare_takeovers"] >= 1
        assert first < MONITOR_NODE_BOUND_S, first
        assert second < RELAY_NODE_BOUND_S, second

        topo.services["probe"].kill()  # detection still works: a dead leaf is found down
        topo.wait_state("hosts", "probe", "down", timeout=30)
        for leaf in ("web-1", "web-2"):
            assert topo.moves(leaf) == [("unknown", "up")], leaf
        assert topo.moves("probe") == [("unknown", "up"), ("up", "down")]
        assert topo.moves("r1") == [("unknown", "up")]
    finally:
        topo.close()
        nats.close()
