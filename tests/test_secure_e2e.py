"""The whole path with authentication and topic policy on both brokers of the path, for both broker
kinds: the embedded broker from broker_config/amqtt.toml with a password file, and Mosquitto from
broker_config/mosquitto.conf + acl (ports and paths moved into the test's directory).

leaf --beat--> site broker --> relay-a --bundle--> central broker --> monitor (client id = its user)

Attacks, each shown rejected:
(b) a leaf with a wrong password never gets in, and its host never appears;
(c) a leaf publishing another host's beat: dropped by the broker, the other host never appears;
(d) forged bundles: a leaf user publishing on relay-a's bundle topic (dropped by the broker), a relay
    user publishing on relay-a's topic (dropped), and a relay user claiming relay-a's id on its own
    topic (delivered, refused by the monitor as `relay_mismatch`, counted in /healthz);
(e) a leaf claiming relay-a's client id on the central broker: refused (embedded) or renamed to its
    user (Mosquitto, use_username_as_clientid), so relay-a is never kicked off and never reported down.
"Never appears" is always checked after something published later by the same client has arrived.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from relaybeat.broker_config.passwords import add_user
from relaybeat.relay.ports import pick_free
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, Topics, encode_bundle
from tests.processes import (
    Topology,
    api_get,
    mosquitto_passwords,
    require_mosquitto,
    shipped_acl,
    shipped_amqtt_config,
    shipped_mosquitto_config,
    wait_until,
)

pytestmark = pytest.mark.e2e

PASSWORDS = {
    "h1": "pw-h1",
    "h2": "pw-h2",
    "mallory": "pw-mallory",  # a leaf user that tries to speak for others
    "eve": "pw-eve",  # another one
    "relay-a": "pw-relay-a",
    "relay-b": "pw-relay-b",  # a relay user that tries to pass as relay-a
    "monitor": "pw-monitor",
}
RELAYS = ("relay-a", "relay-b")
MONITORS = ("monitor",)
TOPICS = Topics("relaybeat/")  # the shipped ACL names relaybeat/


@dataclass(frozen=True)
class Brokers:
    kind: str
    site_port: int
    central_port: int

    def site(self, user: str, password: str | None = None) -> str:
        return _url(self.site_port, user, password)

    def central(self, user: str, password: str | None = None) -> str:
        return _url(self.central_port, user, password)


def _url(port: int, user: str, password: str | None) -> str:
    return f"mqtt://{quote(user, safe='')}:{quote(password or PASSWORDS[user], safe='')}@127.0.0.1:{port}"


@pytest.fixture(params=["embedded", "mosquitto"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Topology, Brokers]]:
    """A site and a central broker of one kind, both with the shipped policy and the users above."""
    kind: str = request.param
    topo = Topology(tmp_path, TOPICS.prefix)
    brokers = Brokers(kind, pick_free("127.0.0.1"), pick_free("127.0.0.1"))
    try:
        if kind == "embedded":
            passwd = tmp_path / "passwd"
            for user, password in PASSWORDS.items():
                add_user(passwd, user, password)
            config = shipped_amqtt_config(tmp_path, passwd, RELAYS, MONITORS)
            topo.broker("site", brokers.site_port, config, wait=False)
            topo.broker("central", brokers.central_port, config, wait=False)
            topo.wait_listening("site", brokers.site_port)
            topo.wait_listening("central", brokers.central_port)
        else:
            require_mosquitto()
            passwd, acl = tmp_path / "passwd", tmp_path / "acl"
            mosquitto_passwords(passwd, PASSWORDS)
            acl.write_text(shipped_acl(RELAYS, MONITORS))
            for name, port in (("site", brokers.site_port), ("central", brokers.central_port)):
                workdir = tmp_path / name
                workdir.mkdir()
                topo.mosquitto(name, port, shipped_mosquitto_config(workdir, port, passwd, acl))
        yield topo, brokers
    finally:
        topo.close()


def publish_as(port: int, user: str, messages: list[tuple[str, bytes]], client_id: str | None = None) -> None:
    """Connect as `user` (its right password), publish each message at QoS 1 in order, each
    acknowledged by the broker (which acknowledges what its policy drops, too), then disconnect."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv311)
    client.username_pw_set(user, PASSWORDS[user])
    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        outcome["reason"] = reason
        connected.set()

    client.on_connect = on_connect
    # From another loopback address: the wrong-password leaf on 127.0.0.1 uses up that address's
    # failed-login allowance on the embedded broker (by design), which would refuse us as well.
    client.connect("127.0.0.1", port, keepalive=10, bind_address="127.0.0.2")
    client.loop_start()
    try:
        assert connected.wait(10), f"{user}: no CONNACK"
        assert not outcome["reason"].is_failure, f"{user} refused: {outcome['reason']}"
        for topic, payload in messages:
            info = client.publish(topic, payload, qos=1)
            info.wait_for_publish(timeout=10)
            assert info.is_published(), f"{user}: {topic} not acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


def bundle(relay: str, host: str, boot: str = "forged") -> bytes:
    """A well-formed bundle from `relay` saying `host` beat just now."""
    return encode_bundle(Bundle(relay, boot, 1, 500, (HostEntry(host, 1, 0, 500, LeafStatus.OK),)))


def test_authenticated_path_works_and_bad_credentials_spoofed_beats_and_forged_bundles_are_rejected(
    secured: tuple[Topology, Brokers],
) -> None:
    topo, brokers = secured
    api_port = pick_free("127.0.0.1")

    # Started first, so that their attempts come before everything the test waits on below.
    wrong_password = topo.leaf("h2", brokers.site("h2", "not-the-password"))  # (b)
    impostor = topo.leaf("victim", brokers.site("eve"), name="impostor")  # (c) eve's login, victim's id
    squatter = topo.leaf("relay-a", brokers.central("h2"), name="squatter")  # (e) h2's login, relay-a's id

    # (a) leaf -> site -> relay-a -> central -> monitor, every hop with its own credentials.
    topo.relay("relay-a", brokers.central("relay-a"), local=brokers.site("relay-a"))
    topo.leaf("h1", brokers.site("h1"))
    topo.monitor(brokers.central("monitor"), api_port, client_id="monitor")
    topo.wait_state("hosts", "h1", "up", timeout=30)  # many processes starting: slow on a busy box
    h1 = api_get(topo.api, "/api/v1/hosts/h1")
    assert (h1["relay"], h1["path"]) == ("relay-a", ["relay-a"])
    assert topo.state("relays", "relay-a") == "up"
    relay_a = api_get(topo.api, "/api/v1/relays/relay-a")

    # (b) The broker refuses the wrong password; the leaf keeps retrying and never says the password.
    wait_until(lambda: "Not authorized" in wrong_password.log(), 20, "h2 refused")
    assert "not-the-password" not in wrong_password.log()

    # (c) mallory beats for `victim`, then for itself: mallory arrives (through relay-a), victim never.
    publish_as(brokers.site_port, "mallory", [(TOPICS.beat("victim"), b""), (TOPICS.beat("mallory"), b"")])
    topo.wait_state("hosts", "mallory", "up", timeout=20)
    assert api_get(topo.api, "/api/v1/hosts/mallory")["relay"] == "relay-a"
    impostor.assert_running()
    squatter.assert_running()
    if brokers.kind == "embedded":  # the client id must be the user: refused at CONNECT (Mosquitto drops the beats)
        assert "Not authorized" in impostor.log()
        assert "Not authorized" in squatter.log()

    # (d) A leaf user publishes a bundle on relay-a's topic, then beats straight to the central broker.
    publish_as(brokers.central_port, "eve", [(TOPICS.bundle("relay-a"), bundle("relay-a", "ghost-1")),
                                             (TOPICS.beat("eve"), b"")])  # fmt: skip
    topo.wait_state("hosts", "eve", "up", timeout=20)

    # ... a relay user claims relay-a's id on its own topic, then publishes on relay-a's topic, then
    # sends an honest bundle of its own.
    publish_as(
        brokers.central_port,
        "relay-b",
        [
            (TOPICS.bundle("relay-b"), bundle("relay-a", "ghost-2")),  # delivered; the monitor refuses it
            (TOPICS.bundle("relay-a"), bundle("relay-a", "ghost-3")),  # the broker drops it
            (TOPICS.bundle("relay-b"), bundle("relay-b", "h-of-relay-b", boot="honest")),
        ],
    )
    wait_until(lambda: api_get(topo.api, "/api/v1/hosts/h-of-relay-b"), 20, "relay-b's honest bundle")
    rejected = wait_until(
        lambda: (r := topo.healthz()["rejected"]).get("relay_mismatch", 0) >= 1 and r, 20, "relay_mismatch counted"
    )
    assert rejected["relay_mismatch"] == 1, rejected

    # Two more bundles from relay-a: everything above has long been through the pipeline.
    seq = api_get(topo.api, "/api/v1/relays/relay-a")["seq"]
    wait_until(lambda: api_get(topo.api, "/api/v1/relays/relay-a")["seq"] >= seq + 2, 20, "two more bundles")
    for never in ("h2", "victim", "ghost-1", "ghost-2", "ghost-3"):
        assert api_get(topo.api, f"/api/v1/hosts/{never}") is None, never
        assert topo.transitions(never) == [], never
    after = api_get(topo.api, "/api/v1/relays/relay-a")
    assert after["boot"] == relay_a["boot"] != "forged"  # no forged bundle was taken as relay-a's
    assert after["state"] == "up"
    assert after["hosts"] == 2
    assert topo.moves("h1") == [("unknown", "up")]
    assert topo.moves("relay-a") == [("unknown", "up")]  # (e) never kicked off: no "offline", no reconnect
    assert topo.healthz()["broker_connected"] is True
