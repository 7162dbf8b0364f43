"""What `relaybeat monitor`, `relay` and `leaf` start with, built from their flags, the environment and
the deployment file. Pure: nothing here opens a socket, a database or a file other than the
deployment file, so the tests call these builders directly instead of running a command.

The typer commands in relaybeat/cli.py read the flags (a flag's own variable, e.g. RELAYBEAT_BROKER
for --broker, is the flag's value) and hand them over as `*Flags`; `environ` brings the
RELAYBEAT_<SECTION>__<KEY> variables and the API tokens; precedence is in relaybeat/config.py. Every
bad or missing value raises ConfigError naming the flag, variable or key and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from relaybeat.api.auth import ApiSettings
from relaybeat.config import ConfigError, load_config
from relaybeat.monitor.service import MonitorSettings
from relaybeat.relay.mqtt import Brokers, BrokerURL
from relaybeat.relay.ports import parse_hostport
from relaybeat.relay.service import RelaySettings
from relaybeat.relay.watch import PRESETS
from relaybeat.relay.wire import Topics


@dataclass(frozen=True, slots=True)
class MonitorFlags:
    """`relaybeat monitor`'s flags; None: not given."""

    broker: str | None = None
    db: str | None = None
    listen: str | None = None
    misses: int | None = None
    default_interval: float | None = None
    adaptive: bool | None = None
    phi: float | None = None
    client_id: str | None = None
    max_bundle_bytes: int | None = None
    max_bundle_entries: int | None = None
    journal: str | None = None
    prefix: str | None = None
    node_id: str | None = None
    failover: float | None = None


@dataclass(frozen=True, slots=True)
class MonitorStart:
    settings: MonitorSettings
    db: str  # SQLAlchemy URL
    listen: tuple[str, int]  # where the HTTP API listens
    api: ApiSettings


def monitor_start(flags: MonitorFlags, environ: Mapping[str, str], config: Path | None) -> MonitorStart:
    deployment = load_config(
        config,
        environ,
        {
            "monitor.broker": ("--broker (RELAYBEAT_BROKER)", flags.broker),
            "monitor.db": ("--db (RELAYBEAT_DB)", flags.db),
            "monitor.listen": ("--listen (RELAYBEAT_LISTEN)", flags.listen),
            "monitor.prefix": ("--prefix (RELAYBEAT_PREFIX)", flags.prefix),
            "monitor.client_id": ("--client-id", flags.client_id),
            "monitor.max_bundle_bytes": ("--max-bundle-bytes", flags.max_bundle_bytes),
            "monitor.max_bundle_entries": ("--max-bundle-entries", flags.max_bundle_entries),
            "monitor.journal": ("--journal", flags.journal),
            "monitor.node_id": ("--node-id (RELAYBEAT_NODE_ID)", flags.node_id),
            "monitor.failover_s": ("--failover", flags.failover),
            "detector.misses": ("--misses (RELAYBEAT_MISSES)", flags.misses),
            "detector.default_interval_s": ("--default-interval", flags.default_interval),
            "detector.adaptive": ("--adaptive/--fixed", flags.adaptive),
            "detector.phi_threshold": ("--phi", flags.phi),
        },
    )
    cfg = deployment.monitor
    detector = deployment.detector
    settings = cfg.settings(detector.policy(), deployment.notify.settings(), detector.targets())
    return MonitorStart(settings, cfg.db, parse_hostport(cfg.listen), deployment.api.settings())


@dataclass(frozen=True, slots=True)
class RelayFlags:
    """`relaybeat relay`'s flags; None: not given."""

    id: str | None = None
    local: str | None = None
    upstream: str | None = None
    flush: float | None = None
    serve: str | None = None
    default_interval: float | None = None
    children: bool | None = None
    max_bundle_bytes: int | None = None
    prefix: str | None = None
    keyframe_s: float | None = None
    format: str | None = None
    watch: tuple[str, ...] = ()  # --watch PRESET, repeatable


@dataclass(frozen=True, slots=True)
class RelayStart:
    # With `embedded` set, `settings.local` is that broker's address until it runs (then its own URL).
    settings: RelaySettings
    embedded: tuple[str, int] | None  # HOST, PORT of the broker to run in the relay for its leaves


def relay_start(flags: RelayFlags, environ: Mapping[str, str], config: Path | None) -> RelayStart:
    deployment = load_config(
        config,
        environ,
        {
            "relay.id": ("--id (RELAYBEAT_ID)", flags.id),
            "relay.local": ("--local", flags.local),
            "relay.upstream": ("--upstream (RELAYBEAT_UPSTREAM)", flags.upstream),
            "relay.flush_s": ("--flush", flags.flush),
            "relay.serve": ("--serve", flags.serve),
            "relay.default_interval_s": ("--default-interval", flags.default_interval),
            "relay.children": ("--children/--no-children", flags.children),
            "relay.max_bundle_bytes": ("--max-bundle-bytes", flags.max_bundle_bytes),
            "relay.prefix": ("--prefix (RELAYBEAT_PREFIX)", flags.prefix),
            "relay.keyframe_s": ("--keyframe-s", flags.keyframe_s),
            "relay.format": ("--format", flags.format),
        },
    )
    cfg = deployment.relay
    if cfg.id is None:
        msg = "relay id: give --id, RELAYBEAT_ID or `id` under [relay] in the deployment file"
        raise ConfigError(msg)
    unknown = [preset for preset in flags.watch if preset not in PRESETS]
    if unknown:
        msg = f"--watch {unknown[0]}: unknown preset; presets are {', '.join(PRESETS)}"
        raise ConfigError(msg)
    if cfg.local == "embedded":
        host, port = parse_hostport(cfg.serve)
        return RelayStart(cfg.settings(cfg.id, BrokerURL(host, port), flags.watch), (host, port))
    return RelayStart(cfg.settings(cfg.id, Brokers.parse(cfg.local), flags.watch), None)


@dataclass(frozen=True, slots=True)
class LeafFlags:
    """`relaybeat leaf`'s flags; None: not given."""

    id: str | None = None
    broker: str | None = None
    interval: float | None = None
    prefix: str | None = None


@dataclass(frozen=True, slots=True)
class LeafStart:
    host_id: str
    broker: Brokers
    interval_s: float
    topics: Topics


def leaf_start(flags: LeafFlags, environ: Mapping[str, str], config: Path | None) -> LeafStart:
    deployment = load_config(
        config,
        environ,
        {
            "leaf.id": ("--id (RELAYBEAT_ID)", flags.id),
            "leaf.broker": ("--broker (RELAYBEAT_BROKER)", flags.broker),
            "leaf.interval_s": ("--interval", flags.interval),
            "leaf.prefix": ("--prefix (RELAYBEAT_PREFIX)", flags.prefix),
        },
    )
    cfg = deployment.leaf
    if cfg.id is None:
        msg = "leaf id: give --id, RELAYBEAT_ID or `id` under [leaf] in the deployment file"
        raise ConfigError(msg)
    if cfg.broker is None:
        msg = "leaf broker: give --broker, RELAYBEAT_BROKER or `broker` under [leaf] in the deployment file"
        raise ConfigError(msg)
    return LeafStart(cfg.id, Brokers.parse(cfg.broker), cfg.interval_s, Topics(cfg.prefix))
