"""Relays stop and restart cleanly (issue 12, item 5), with real processes: a relay stopped by SIGTERM
is `stopped`, pages nobody and makes no host `unreachable`; a relay restarted under live leaves holds
its first keyframe until they beat, so its hosts go straight back to `up`.

Leaves beat every 0.5 s (timeout 1.5 s), relays flush every 0.5 s (timeout 1.5 s). Every wait is
bounded generously; no assertion depends on how fast the box is.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.processes import Receiver, Topology, api_get, wait_until

HOSTS = ("h1", "h2")


def ids(central_broker: CentralBroker) -> tuple[str, str]:
    """Relay ids unique to this test: a relay's upstream client id is its id, and tests share a broker."""
    tag = central_broker.prefix.strip("/")
    return f"r1-{tag}", f"r2-{tag}"


def moves(topo: Topology, kind: str, subject: str) -> list[tuple[str, str]]:
    """(from, to) of a subject's state changes, oldest first, read through the API."""
    body: dict[str, Any] = api_get(topo.api, f"/api/v1/{kind}s/{subject}/transitions?limit=1000")
    rows = [r for r in reversed(body["items"]) if r["event"] == "transition"]
    return [(r["from"], r["to"]) for r in rows]


def test_a_relay_stopped_by_sigterm_is_stopped_pages_nobody_and_its_hosts_go_unknown(
    tmp_path: Path, central_broker: CentralBroker
) -> None:
    receiver = Receiver()
    topo = Topology(tmp_path, central_broker.prefix)
    r1, r2 = ids(central_broker)
    try:
        topo.monitor(central_broker.url, pick_free("127.0.0.1"), extra=receiver.config(tmp_path))
        stopping, control = pick_free("127.0.0.1"), pick_free("127.0.0.1")
        relay = topo.relay(r1, central_broker.url, serve=stopping)
        topo.relay(r2, central_broker.url, serve=control)
        for host in HOSTS:
            topo.leaf(host, f"mqtt://127.0.0.1:{stopping}")
        topo.leaf("c1", f"mqtt://127.0.0.1:{control}")
        for host in (*HOSTS, "c1"):
            topo.wait_state("hosts", host, "up", 30)

        assert relay.stop() == 0  # SIGTERM: `stopped`, retained, then a clean disconnect
        topo.wait_state("relays", r1, "stopped", 15)
        for host in HOSTS:  # no news past their timeout (1.5 s): unknown, neither down nor unreachable
            topo.wait_state("hosts", host, "unknown", 15)
        time.sleep(3.0)  # long past every timeout, the relay's and the hosts': nothing more may happen

        # The control: a relay that dies (kill -9, its will) does page, so the receiver is listening.
        topo.services[r2].kill()
        wait_until(lambda: receiver.kinds()[("outage", f"relay:{r2}")] >= 1, 30, "the outage POST for r2")
        assert moves(topo, "relay", r1) == [("unknown", "up"), ("up", "stopped")]
        for host in HOSTS:
            assert moves(topo, "host", host) == [("unknown", "up"), ("up", "unknown")]
        assert topo.state("relays", r1) == "stopped"
        about = Counter(item["id"] for _, body in receiver.posts for item in body["subjects"])
        assert set(about) <= {r2, "c1"}, receiver.posts  # nothing about r1 or its hosts
    finally:
        topo.close()
        receiver.close()


def test_a_relay_restarted_under_live_leaves_brings_its_hosts_straight_back_up(
    tmp_path: Path, central_broker: CentralBroker
) -> None:
    topo = Topology(tmp_path, central_broker.prefix)
    r1, _ = ids(central_broker)
    try:
        topo.monitor(central_broker.url, pick_free("127.0.0.1"))
        local = topo.broker("local", pick_free("127.0.0.1"))  # the leaves' broker outlives the relay
        hold = ("--hold-first-s", "2")  # four leaf intervals
        topo.relay(r1, central_broker.url, local=local, extra=hold)
        for host in HOSTS:
            topo.leaf(host, local)
        for host in HOSTS:
            topo.wait_state("hosts", host, "up", 30)

        topo.services[r1].kill()  # kill -9: its will makes it down and its hosts unreachable
        for host in HOSTS:
            topo.wait_state("hosts", host, "unreachable", 15)
        time.sleep(3.0)  # past the hosts' timeout (1.5 s): without the hold they would come back `unknown`
        topo.relay(r1, central_broker.url, local=local, extra=hold)
        topo.wait_state("relays", r1, "up", 30)
        for host in HOSTS:
            topo.wait_state("hosts", host, "up", 15)
        time.sleep(2.0)  # whatever a premature bundle would have caused has happened by now

        for host in HOSTS:
            assert moves(topo, "host", host) == [("unknown", "up"), ("up", "unreachable"), ("unreachable", "up")]
    finally:
        topo.close()
