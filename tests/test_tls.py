"""TLS (mqtts://) for leaf, relay and monitor, with a throwaway CA made by the `openssl` CLI.

TLS options travel inside the broker URL (`mqtts://host:port?ca=...&cert=...&key=...`, see
relay/mqtt.py), so every command that takes a broker URL takes them. The broker's certificate is
always verified, host name included.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import pick_free
from tests.processes import Topology, api_get, require_mosquitto, wait_until

# ------------------------------------------------------------------------------ a throwaway PKI


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA that signed everything below
    server_cert: Path  # for 127.0.0.1 (subjectAltName IP:127.0.0.1), signed by `ca`
    server_key: Path
    client_cert: Path  # a client certificate (CN=relaybeat-client), signed by `ca`
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _new_ca(folder: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN=relaybeat test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _new_leaf_cert(folder: Path, name: str, subject: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n{extensions}\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (apt install openssl)")
    folder = tmp_path_factory.mktemp("pki")
    _new_ca(folder, "ca")
    _new_ca(folder, "other-ca")
    _new_leaf_cert(folder, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    _new_leaf_cert(folder, "client", "/CN=relaybeat-client", "extendedKeyUsage=clientAuth")
    return PKI(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem", folder / "client.key",
        folder / "other-ca.pem",
    )  # fmt: skip


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    topology = Topology(tmp_path, f"tls{uuid.uuid4().hex[:8]}/")
    try:
        yield topology
    finally:
        topology.close()


def tls_broker_config(folder: Path, pki: PKI) -> Path:
    """A broker TOML for `relaybeat broker --config`: TLS on, anonymous (the port comes from --bind)."""
    config = folder / "tls-broker.toml"
    config.write_text(f'[broker]\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n')
    return config


async def connect_error(url: str, timeout_s: float = 3.0) -> str:
    """Connect with `url` (as our services do) and return why it failed; fails if it connects."""
    broker = BrokerURL.parse(url)
    client = aiomqtt.Client(broker.host, broker.port, tls_context=broker.tls_context(), timeout=timeout_s)
    try:
        async with client:
            pass
    except aiomqtt.MqttError as exc:
        return str(exc)
    msg = f"{url} connected, but must be refused"
    raise AssertionError(msg)


# ---------------------------------------------------------------------------------- end to end


def test_leaf_relay_and_monitor_over_mqtts_bring_a_host_up_and_unverified_clients_are_refused(
    topo: Topology, pki: PKI, tmp_path: Path
) -> None:
    config = tls_broker_config(tmp_path, pki)
    site_port, central_port, api_port = (pick_free("127.0.0.1") for _ in range(3))
    site = topo.broker("site", site_port, config, wait=False)
    central = topo.broker("central", central_port, config, wait=False)
    assert site.startswith("mqtts://")
    assert central.startswith("mqtts://")
    topo.wait_listening("site", site_port)
    topo.wait_listening("central", central_port)
    trust = f"?ca={pki.ca}"

    # Leaves that trust only the system CAs, or another CA, refuse the broker's certificate.
    no_ca = topo.leaf("web-no-ca", site)
    other_ca = topo.leaf("web-other-ca", f"{site}?ca={pki.other_ca}")
    relay = topo.relay("r1", central + trust, local=site + trust)
    leaf = topo.leaf("web-tls", site + trust)
    topo.monitor(central + trust, api_port)
    topo.wait_state("hosts", "web-tls", "up", timeout=30)  # many processes starting: slow on a busy box
    seen = api_get(topo.api, "/api/v1/hosts/web-tls")
    assert (seen["relay"], seen["path"]) == ("r1", ["r1"])  # through the relay, both hops over TLS
    assert topo.moves("web-tls") == [("unknown", "up")]
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in no_ca.log(), 20, "the no-CA leaf to be refused")
    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in other_ca.log(), 20, "the other-CA leaf to be refused")

    async def refusals() -> list[str]:
        return list(
            await asyncio.gather(
                # the certificate is for 127.0.0.1, not localhost: host names are checked too
                connect_error(f"mqtts://localhost:{site_port}{trust}"),
                # no TLS at all: the TLS ports do not speak plain MQTT
                connect_error(f"mqtt://127.0.0.1:{site_port}", timeout_s=2.0),
                connect_error(f"mqtt://127.0.0.1:{central_port}", timeout_s=2.0),
            )
        )

    wrong_host, plain_site, plain_central = asyncio.run(refusals())
    assert "Hostname mismatch" in wrong_host, wrong_host
    assert plain_site
    assert plain_central

    # Two bundles later the verified leaf is still up; the refused leaves were never heard of.
    seq = api_get(topo.api, "/api/v1/relays/r1")["seq"]
    wait_until(lambda: api_get(topo.api, "/api/v1/relays/r1")["seq"] >= seq + 2, 20, "two more bundles from r1")
    assert api_get(topo.api, "/api/v1/hosts/web-no-ca") is None
    assert api_get(topo.api, "/api/v1/hosts/web-other-ca") is None
    assert topo.state("hosts", "web-tls") == "up"
    relay.assert_running()
    assert leaf.stop() == 0


def test_client_certificate_in_the_url_is_presented_to_a_broker_that_requires_one(
    topo: Topology, pki: PKI, tmp_path: Path
) -> None:
    require_mosquitto()
    port, api_port = pick_free("127.0.0.1"), pick_free("127.0.0.1")
    config = (
        "per_listener_settings false\nallow_anonymous false\npersistence false\n"
        f"log_dest file {tmp_path / 'mosquitto-tls.log'}\nconnection_messages true\n"
        f"listener {port} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"  # the certificate is the credential
    )
    topo.mosquitto("mosquitto-tls", port, config)
    with_cert = f"mqtts://127.0.0.1:{port}?ca={pki.ca}&cert={pki.client_cert}&key={pki.client_key}"
    without_cert = f"mqtts://127.0.0.1:{port}?ca={pki.ca}"

    no_cert = topo.leaf("web-no-cert", without_cert)
    topo.leaf("web-cert", with_cert)
    topo.monitor(with_cert, api_port)
    topo.wait_state("hosts", "web-cert", "up", timeout=30)

    # Without a client certificate the broker ends the TLS session: the leaf never gets in. (Under
    # TLS 1.3 that alert comes after the handshake; paho logs it at once, aiomqtt gives up connecting
    # at its timeout and retries.)
    wait_until(lambda: "CERTIFICATE_REQUIRED" in no_cert.log(), 20, "the certificate-less leaf to be refused")
    last = api_get(topo.api, "/api/v1/hosts/web-cert")["seq"]
    wait_until(lambda: api_get(topo.api, "/api/v1/hosts/web-cert")["seq"] >= last + 2, 20, "two more beats")
    assert api_get(topo.api, "/api/v1/hosts/web-no-cert") is None


# ------------------------------------------------------------------------------ URL parsing


def test_tls_options_in_the_url_are_parsed_and_shown_without_the_password(pki: PKI) -> None:
    url = BrokerURL.parse(f"mqtts://web%2D1:s%40cret@127.0.0.1?ca={pki.ca}&cert={pki.client_cert}&key={pki.client_key}")
    assert (url.host, url.port, url.tls) == ("127.0.0.1", 8883, True)
    assert (url.username, url.password) == ("web-1", "s@cret")
    assert (url.ca_file, url.cert_file, url.key_file) == (str(pki.ca), str(pki.client_cert), str(pki.client_key))
    shown = str(url)
    assert "s@cret" not in shown
    assert "s%40cret" not in shown
    assert "***" in shown
    assert shown.startswith("mqtts://web-1:***@127.0.0.1:8883?ca=")
    assert "s@cret" not in repr(url)
    again = BrokerURL.parse(shown.replace("***", "x"))
    assert (again.ca_file, again.cert_file, again.key_file) == (url.ca_file, url.cert_file, url.key_file)
    context = url.tls_context()
    assert context is not None
    assert context.check_hostname
    assert context.verify_mode.name == "CERT_REQUIRED"
    assert BrokerURL.parse("mqtt://h").tls_context() is None
    assert BrokerURL.parse("mqtt://h").port == 1883


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqtt://u:hunter2@h?ca={ca}", "need mqtts://"),
        ("mqtts://u:hunter2@h?cafile={ca}", "unknown option 'cafile'"),
        ("mqtts://u:hunter2@h?ca={ca}&ca={ca}", "given twice"),
        ("mqtts://u:hunter2@h?ca=", "needs a file path"),
        ("mqtts://u:hunter2@h?key={ca}", "'key' needs 'cert'"),
        ("mqtts://u:hunter2@h?ca=/nonexistent/ca.pem", "is not a readable file"),
        ("mqtts://u:hunter2@h?ca={bad}", "cannot use its TLS files"),
        ("mqtts://u:hunter2@h?cert={ca}", "cannot use its TLS files"),  # a CA is not a key pair
        ("mqtts://u:hunter2@h/path", "has a path"),
        ("http://u:hunter2@h", "must start with mqtt://"),
        ("mqtt://u:hunter2@h:99999", "bad port"),
    ],
)
def test_bad_tls_options_are_named_and_the_password_never_shown(
    pki: PKI, tmp_path: Path, url: str, message: str
) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=message) as caught:
        BrokerURL.parse(url.format(ca=pki.ca, bad=bad))
    assert "hunter2" not in str(caught.value)
