"""API access control against a real monitor and SQLite store: open or token-protected reads, writes
that always need a write token, CORS only when asked for, and tokens that never leak."""

from __future__ import annotations

import hmac
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaybeat.api.app import create_app
from relaybeat.api.auth import ApiSettings, Tokens
from relaybeat.config import ConfigError, load_config
from relaybeat.monitor.detector import Policy
from relaybeat.monitor.service import Monitor, MonitorSettings
from relaybeat.monitor.store import Store
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.wire import Bundle, HostEntry, LeafStatus, encode_bundle

READ = "read-token-0123456789abcdef"
WRITE = "write-token-fedcba9876543210"
OTHER = "not-a-token-at-all-0000000000"
BROKER_PASSWORD = "broker-password-77x"


def bundle(seq: int, *hosts: str) -> bytes:
    entries = tuple(HostEntry(h, 1, 0, 1000, LeafStatus.OK) for h in hosts)
    return encode_bundle(Bundle("r1", "boot1", seq, 1000, entries))


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    store = await Store.open(f"sqlite:///{tmp_path / 'auth.db'}")
    await store.upgrade()
    running = Monitor(MonitorSettings(BrokerURL.parse("mqtt://127.0.0.1:1"), Policy(misses=3)), store)
    running.take("relaybeat/bundle/r1", bundle(1, "a", "b"))
    await running.flush()
    yield running
    await store.close()


@pytest.fixture
async def client_for(monitor: Monitor) -> AsyncIterator[Any]:
    """`client_for(ApiSettings(...))`: an in-process client of an app with those settings."""
    clients: list[httpx.AsyncClient] = []

    def make(settings: ApiSettings | None = None) -> httpx.AsyncClient:
        app = create_app(monitor) if settings is None else create_app(monitor, settings)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        clients.append(http)
        return http

    yield make
    for http in clients:
        await http.aclose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_reads_are_open_and_writes_refused_by_default(client_for: Any) -> None:
    client = client_for()
    assert (await client.get("/api/v1/hosts")).json()["total"] == 2
    for headers in ({}, bearer(WRITE)):
        refused = await client.delete("/api/v1/hosts/a", headers=headers)
        assert refused.status_code == 403
        assert refused.json()["error"] == "writes_disabled"
        assert "no write token is configured" in refused.json()["detail"]
    assert (await client.get("/api/v1/hosts/a")).status_code == 200  # nothing was forgotten


async def test_writes_need_a_write_token(client_for: Any, monitor: Monitor) -> None:
    client = client_for(ApiSettings(read_tokens=(READ,), write_tokens=(WRITE,)))
    missing = await client.delete("/api/v1/hosts/a")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthorized"
    assert (await client.delete("/api/v1/hosts/a", headers=bearer(OTHER))).status_code == 401
    assert (await client.delete("/api/v1/hosts/a", headers={"Authorization": f"Basic {WRITE}"})).status_code == 401
    read_only = await client.delete("/api/v1/hosts/a", headers=bearer(READ))
    assert read_only.status_code == 403
    assert read_only.json()["error"] == "forbidden"
    assert "a" in monitor.detector.hosts

    done = await client.delete("/api/v1/hosts/a", headers=bearer(WRITE))
    assert done.status_code == 204
    assert "a" not in monitor.detector.hosts
    assert (await client.get("/api/v1/hosts/a")).status_code == 404
    hosts, _ = await monitor.store.load()
    assert [h.id for h in hosts] == ["b"]  # its current-state row is gone ...
    history = (await client.get("/api/v1/transitions?kind=host")).json()["items"]
    assert "a" in {t["subject"] for t in history}  # ... its history stays
    assert (await client.delete("/api/v1/hosts/a", headers=bearer(WRITE))).status_code == 404


async def test_protected_reads_need_a_read_or_write_token(client_for: Any) -> None:
    client = client_for(ApiSettings(read_open=False, read_tokens=(READ,), write_tokens=(WRITE,)))
    for path in ("/api/v1/hosts", "/api/v1/hosts/a", "/api/v1/relays", "/api/v1/transitions"):
        refused = await client.get(path)
        assert refused.status_code == 401, path
        assert refused.json()["error"] == "unauthorized"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await client.get(path, headers=bearer(OTHER))).status_code == 401
        assert (await client.get(path, headers=bearer(READ))).status_code == 200
        assert (await client.get(path, headers=bearer(WRITE))).status_code == 200
    for open_path in ("/healthz", "/openapi.json", "/docs", "/"):
        assert (await client.get(open_path)).status_code == 200, open_path


async def test_docs_show_the_bearer_scheme(client_for: Any) -> None:
    open_reads = (await client_for().get("/openapi.json")).json()
    assert open_reads["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": open_reads["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    forget = open_reads["paths"]["/api/v1/hosts/{host_id}"]["delete"]
    assert forget["security"] == [{"HTTPBearer": []}]
    assert {"401", "403", "404"} <= set(forget["responses"])
    assert "security" not in open_reads["paths"]["/api/v1/hosts"]["get"]

    protected = (await client_for(ApiSettings(read_open=False, read_tokens=(READ,))).get("/openapi.json")).json()
    hosts = protected["paths"]["/api/v1/hosts"]["get"]
    assert hosts["security"] == [{"HTTPBearer": []}]
    assert "401" in hosts["responses"]
    assert "security" not in protected["paths"]["/healthz"]["get"]


async def test_cors_is_off_by_default_and_on_for_listed_origins(client_for: Any) -> None:
    preflight = {"Origin": "https://ops.example.com", "Access-Control-Request-Method": "GET"}
    default = client_for()
    assert "access-control-allow-origin" not in (await default.options("/api/v1/hosts", headers=preflight)).headers
    plain = await default.get("/api/v1/hosts", headers={"Origin": "https://ops.example.com"})
    assert "access-control-allow-origin" not in plain.headers

    client = client_for(ApiSettings(cors_origins=("https://ops.example.com",)))
    allowed = await client.options(
        "/api/v1/hosts", headers=preflight | {"Access-Control-Request-Headers": "Authorization"}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://ops.example.com"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    got = await client.get("/api/v1/hosts", headers={"Origin": "https://ops.example.com"})
    assert got.headers["access-control-allow-origin"] == "https://ops.example.com"
    stranger = await client.get("/api/v1/hosts", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in stranger.headers


def test_tokens_are_compared_without_an_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    tokens = Tokens([READ, WRITE, OTHER])
    for presented, expected in ((READ, True), (OTHER, True), ("x", False), (READ[:-1], False), (READ + "x", False)):
        calls.clear()
        assert tokens.match(presented) is expected
        assert len(calls) == 3  # every configured token is compared, whichever matched
    assert READ not in repr(tokens)
    assert READ not in repr(ApiSettings(read_tokens=(READ,)))


async def test_tokens_never_appear_in_logs_or_bodies(
    client_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (READ, WRITE, OTHER)
    seen: list[str] = []
    for settings in (
        ApiSettings(),
        ApiSettings(write_tokens=(WRITE,)),
        ApiSettings(read_open=False, read_tokens=(READ,), write_tokens=(WRITE,)),
    ):
        client = client_for(settings)
        for token in (*secrets, READ[:-1], ""):
            for method, path in (("GET", "/api/v1/hosts"), ("DELETE", "/api/v1/hosts/b"), ("GET", "/nope")):
                response = await client.request(method, path, headers=bearer(token))
                seen.append(response.text)
                seen.extend(f"{k}: {v}" for k, v in response.headers.items())
        seen.append(repr(settings))

    # A bad deployment file: the error names the key, never the token or the broker password.
    config_file = tmp_path / "relaybeat.toml"
    config_file.write_text(
        f"[monitor]\nbroker = 'mqtt://relaybeat:{BROKER_PASSWORD}@:1'\n"
        f"[api]\nread = 'token'\nwrite_tokens = ['{WRITE}', 'short {READ}']\n"
    )
    with pytest.raises(ConfigError) as bad:
        load_config(config_file, {"RELAYBEAT_API_TOKENS": f"{OTHER},tiny"})
    assert "api.write_tokens" in str(bad.value)
    assert "api.read_tokens" in str(bad.value)
    assert "monitor.broker" in str(bad.value)
    seen.append(str(bad.value))

    good = tmp_path / "good.toml"
    good.write_text(f"[api]\nwrite_tokens = ['{WRITE}']\n")
    config = load_config(good, {"RELAYBEAT_API_TOKENS": READ})
    seen += [repr(config), str(config), repr(config.api.settings())]

    seen += [record.getMessage() for record in caplog.records]
    everything = "\n".join(seen)
    for secret in (*secrets, READ[:-1], BROKER_PASSWORD):
        assert secret not in everything


def test_running_monitor_serves_tokens_from_file_and_environment(tmp_path: Path, free_port: int) -> None:
    """`relaybeat monitor --config` wires [api] and RELAYBEAT_API_WRITE_TOKENS into the real server, and
    its debug log (broker refused, retrying) carries neither the tokens nor the broker password."""
    config = tmp_path / "relaybeat.toml"
    config.write_text(f"[api]\nread_tokens = ['{READ}']\n")
    env = os.environ | {"RELAYBEAT_API_WRITE_TOKENS": WRITE}
    log = (tmp_path / "monitor.log").open("w")  # a file, not a pipe: a debug log would fill a pipe and block
    process = subprocess.Popen(
        [
            sys.executable, "-m", "relaybeat", "monitor", "--config", str(config),
            "--broker", f"mqtt://monitor:{BROKER_PASSWORD}@127.0.0.1:1", "--db", f"sqlite:///{tmp_path / 'm.db'}",
            "--listen", f"127.0.0.1:{free_port}", "--log-level", "debug",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "monitor exited before it answered"
                assert time.monotonic() < deadline, "monitor did not start"
                time.sleep(0.1)
        assert health.status_code == 200
        assert httpx.get(f"{base}/api/v1/hosts").status_code == 401
        assert httpx.get(f"{base}/api/v1/hosts", headers=bearer(READ)).status_code == 200
        assert httpx.get(f"{base}/api/v1/hosts", headers=bearer(WRITE)).status_code == 200
        assert httpx.delete(f"{base}/api/v1/hosts/x", headers=bearer(READ)).status_code == 403
        assert httpx.delete(f"{base}/api/v1/hosts/x", headers=bearer(WRITE)).status_code == 404
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "monitor.log").read_text()
    assert process.returncode == 0, output[-3000:]
    assert "monitor" in output  # it did log (at debug) ...
    for secret in (READ, WRITE, BROKER_PASSWORD):
        assert secret not in output  # ... and nothing secret


def test_database_urls_are_shown_without_their_password() -> None:
    from relaybeat.monitor.store import shown_url

    shown = shown_url(f"postgresql+psycopg://relaybeat:{BROKER_PASSWORD}@db.example/relaybeat")
    assert BROKER_PASSWORD not in shown
    assert shown.startswith("postgresql+psycopg://relaybeat:***@")
    assert BROKER_PASSWORD not in shown_url(f"not a url {BROKER_PASSWORD}")
