"""Liveness decisions under real failures, with real processes: each test kills or restarts something
and asserts the exact transitions that reached SQL (issue "Make every liveness decision right").
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaybeat.relay.ports import pick_free
from tests.conftest import CentralBroker
from tests.processes import Topology, api_get, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def topo(tmp_path: Path, central_broker: CentralBroker) -> Iterator[Topology]:
    topology = Topology(tmp_path, central_broker.prefix)
    try:
        yield topology
    finally:
        topology.close()


def ports(n: int) -> list[int]:
    return [pick_free("127.0.0.1") for _ in range(n)]


def test_killed_monitor_restarts_from_sql_without_duplicates_or_false_downs(
    topo: Topology, central_broker: CentralBroker
) -> None:
    site, api = ports(2)
    topo.relay("r1", central_broker.url, serve=site)
    monitor = topo.monitor(central_broker.url, api)
    topo.leaf("alive", f"mqtt://127.0.0.1:{site}")
    topo.leaf("dies", f"mqtt://127.0.0.1:{site}")
    topo.wait_state("hosts", "alive", "up")
    topo.wait_state("hosts", "dies", "up")

    monitor.kill()
    topo.services["dies"].kill()  # dies while nobody watches
    time.sleep(2.0)
    topo.monitor(central_broker.url, api)
    assert topo.state("hosts", "alive") == "up"  # restored from SQL, not re-discovered
    topo.wait_state("hosts", "dies", "down", timeout=10)
    time.sleep(2.0)  # several timeouts of the surviving host: no storm of false downs

    assert topo.moves("alive") == [("unknown", "up")]
    assert topo.moves("dies") == [("unknown", "up"), ("up", "down")]
    assert topo.moves("r1") == [("unknown", "up")]


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_broker_restart_is_blindness_not_an_outage(tmp_path: Path, kind: str) -> None:
    if kind == "mosquitto" and not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (apt install mosquitto)")
    topo = Topology(tmp_path, "rb/")
    try:
        central, site, api = ports(3)
        start_broker = topo.broker if kind == "embedded" else topo.mosquitto
        url = start_broker("central", central)
        topo.relay("r1", url, serve=site, flush=1.0)
        topo.monitor(url, api)
        topo.leaf("h1", f"mqtt://127.0.0.1:{site}")
        topo.wait_state("hosts", "h1", "up")

        topo.services["central"].kill()
        wait_until(lambda: api_get(topo.api, "/healthz")["status"] == "degraded", 10, "monitor degraded")
        assert api_get(topo.api, "/healthz")["broker_connected"] is False
        time.sleep(4.0)  # longer than the relay's timeout (1 s × 3) and the host's (0.5 s × 3)
        assert topo.state("relays", "r1") == "up"
        assert topo.state("hosts", "h1") == "up"

        start_broker("central", central)
        wait_until(lambda: api_get(topo.api, "/healthz")["broker_connected"], 15, "monitor reconnected")
        time.sleep(5.0)  # past the grace period: relay and host are seen again, so nothing turns down
        assert topo.moves("r1") == [("unknown", "up")]
        assert topo.moves("h1") == [("unknown", "up")]
        assert api_get(topo.api, "/healthz")["status"] == "ok"
    finally:
        topo.close()


def test_leaf_restart_records_a_restart_event_without_an_outage(topo: Topology, central_broker: CentralBroker) -> None:
    site, api = ports(2)
    topo.relay("r1", central_broker.url, serve=site)
    topo.monitor(central_broker.url, api)
    # A 2 s interval gives a 6 s timeout: room for a Python process to restart on a loaded machine.
    leaf = topo.leaf("web-1", f"mqtt://127.0.0.1:{site}", interval=2.0)
    wait_until(lambda: (api_get(topo.api, "/api/v1/hosts/web-1") or {}).get("seq", 0) >= 2, 15, "a few beats")

    leaf.kill()
    topo.leaf("web-1", f"mqtt://127.0.0.1:{site}", interval=2.0)  # back with seq 1, within its timeout
    restarts = wait_until(lambda: topo.transitions("web-1", "restart"), 10, "a restart event")
    assert len(restarts) == 1
    assert restarts[0][2].startswith("leaf restarted (seq ")
    assert restarts[0][2].endswith("→ 1)")
    wait_until(lambda: api_get(topo.api, "/api/v1/hosts/web-1")["seq"] >= 3, 15, "beats after the restart")
    assert topo.moves("web-1") == [("unknown", "up")]


def test_relay_failover_keeps_a_host_up_and_moves_it_to_the_surviving_relay(
    topo: Topology, central_broker: CentralBroker
) -> None:
    site, api = ports(2)
    site_url = topo.broker("site", site)
    topo.relay("r1", central_broker.url, local=site_url)
    topo.relay("r2", central_broker.url, local=site_url)
    topo.monitor(central_broker.url, api)
    topo.leaf("web-1", site_url)
    topo.wait_state("hosts", "web-1", "up")
    wait_until(lambda: topo.state("relays", "r1") == "up" and topo.state("relays", "r2") == "up", 10, "relays up")
    time.sleep(1.5)  # three flushes: both relays have now reported web-1
    first = api_get(topo.api, "/api/v1/hosts/web-1")["relay"]
    other = "r2" if first == "r1" else "r1"

    topo.services[first].kill()
    topo.wait_state("relays", first, "down")
    wait_until(lambda: api_get(topo.api, "/api/v1/hosts/web-1")["relay"] == other, 10, f"web-1 via {other}")
    time.sleep(3.0)  # several host timeouts: no flapping, no outage
    assert topo.moves("web-1") == [("unknown", "up")]
    assert api_get(topo.api, "/api/v1/hosts/web-1")["relay"] == other


def test_three_level_tree_middle_relay_death_marks_its_subtree_unreachable(
    topo: Topology, central_broker: CentralBroker
) -> None:
    p1, p2, p3, api = ports(4)
    topo.relay("r1", central_broker.url, serve=p1)
    topo.relay("r2", f"mqtt://127.0.0.1:{p1}", serve=p2)
    topo.relay("r3", f"mqtt://127.0.0.1:{p2}", serve=p3)
    topo.monitor(central_broker.url, api)
    for host, port in (("h1", p1), ("h2", p2), ("h3", p3)):
        topo.leaf(host, f"mqtt://127.0.0.1:{port}")
    for host in ("h1", "h2", "h3"):
        topo.wait_state("hosts", host, "up")
    assert api_get(topo.api, "/api/v1/hosts/h3")["path"] == ["r3", "r2", "r1"]
    assert api_get(topo.api, "/api/v1/relays/r3")["parent"] == "r2"

    topo.services["r2"].kill()
    topo.wait_state("hosts", "h3", "unreachable")
    topo.wait_state("hosts", "h2", "unreachable")
    time.sleep(1.0)
    assert topo.state("relays", "r2") == "down"
    assert topo.state("relays", "r3") == "unreachable"
    assert topo.state("hosts", "h1") == "up"
    assert topo.transitions("h3")[-1] == ("up", "unreachable", "relay r2 down")
    assert topo.transitions("h2")[-1] == ("up", "unreachable", "relay r2 down")
    assert topo.transitions("r3")[-1] == ("up", "unreachable", "relay r2 down")
    assert topo.moves("r2") == [("unknown", "up"), ("up", "down")]
    assert topo.moves("h1") == [("unknown", "up")]


def test_leaf_sigterm_sends_stopping_so_a_planned_stop_is_not_an_outage(
    topo: Topology, central_broker: CentralBroker
) -> None:
    site, api = ports(2)
    topo.relay("r1", central_broker.url, serve=site)
    topo.monitor(central_broker.url, api)
    leaf = topo.leaf("web-1", f"mqtt://127.0.0.1:{site}")
    topo.wait_state("hosts", "web-1", "up")
    assert leaf.stop() == 0  # SIGTERM
    topo.wait_state("hosts", "web-1", "stopped", timeout=10)
    time.sleep(2.0)  # well past its timeout (0.5 s × 3): stopped stays stopped, never down
    assert topo.transitions("web-1") == [
        ("unknown", "up", "beat received"),
        ("up", "stopped", "leaf said it is stopping"),
    ]


def test_a_relay_that_loses_its_site_broker_is_one_outage_not_one_page_per_host(
    topo: Topology, central_broker: CentralBroker
) -> None:
    site, api = ports(2)
    site_url = topo.broker("site", site)
    topo.relay("r1", central_broker.url, local=site_url)
    topo.monitor(central_broker.url, api)
    for host in ("web-1", "web-2"):
        topo.leaf(host, site_url)
    for host in ("web-1", "web-2"):
        topo.wait_state("hosts", host, "up")

    topo.services["site"].kill()  # the relay can no longer hear its leaves: it must stop vouching for them
    topo.wait_state("relays", "r1", "down")
    for host in ("web-1", "web-2"):
        topo.wait_state("hosts", host, "unreachable")
        assert topo.moves(host) == [("unknown", "up"), ("up", "unreachable")]
