"""A relay paused past its Last Will comes back soon after it resumes (issue 12, item 5), real processes
on a private single NATS server (MQTT in JetStream: the broker that showed it).

SIGSTOP the relay until the broker gave up on it (keepalive expired, its will published: the monitor
has it `down`, "said offline"), then SIGCONT: its upstream session is dead, and the relay must see
that and reconnect at once. It used to wait out aiomqtt's 10 s timeout on the QoS 1 publish that was
in flight, or on a reconnect whose socket the event loop never read (back 10.2-10.4 s after resuming,
EBADF or ENOENT in its log); the issue asks for 2 s. The bound here is generous (a
busy box); the time is printed.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from relaybeat.relay.ports import pick_free
from tests.processes import NatsCluster, Topology, wait_until

pytestmark = pytest.mark.e2e

BOUND_S = 5.0  # the old behaviour took 10.2-10.4 s


def test_a_relay_paused_past_its_will_is_back_soon_after_it_resumes(tmp_path: Path) -> None:
    nats = NatsCluster(tmp_path, nodes=1)
    topo = Topology(tmp_path, "relaybeat/")
    try:
        nats.wait_ready()
        # misses 30: the relay's timeout (30 s) is far beyond its will (the broker's 1.5 x keepalive of
        # 3 s), so the `down` below is the will's, and the relay's return is not waited out by a timeout.
        topo.monitor(nats.url(0), pick_free("127.0.0.1"), misses=30)
        site = pick_free("127.0.0.1")
        relay = topo.relay("r1", nats.url(0), serve=site, flush=1.0)
        topo.leaf("web-1", f"mqtt://127.0.0.1:{site}", interval=1.0)
        topo.wait_state("hosts", "web-1", "up", timeout=30)
        topo.wait_state("relays", "r1", "up", timeout=10)

        backs = []
        for _ in range(3):
            relay.process.send_signal(signal.SIGSTOP)
            try:
                wait_until(
                    lambda: topo.state("relays", "r1") == "down",
                    30,
                    "the relay's will",
                    service=topo.services["monitor"],
                )
                time.sleep(1.0)  # well past it: the broker closed the relay's connection
            finally:
                relay.process.send_signal(signal.SIGCONT)
            resumed = time.monotonic()
            topo.wait_state("relays", "r1", "up", timeout=30)
            backs.append(time.monotonic() - resumed)
        print(f"\nrelay paused past its will: up again {', '.join(f'{s:.2f}' for s in backs)} s after SIGCONT")

        reasons = [reason for _, to, reason in topo.transitions("r1") if to == "down"]
        assert len(reasons) == 3, reasons
        assert all("said offline" in r for r in reasons), reasons
        assert max(backs) < BOUND_S, backs
        relay.assert_running()
        # The late registrations of a closed socket were the cause: the event loop said so each time.
        assert "Exception in callback" not in relay.log(), relay.log()[-3000:]
    finally:
        topo.close()
        nats.close()
