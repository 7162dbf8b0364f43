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
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaybeat.config import ConfigError, DeploymentConfig, load_config
from relaybeat.relay.mqtt import Brokers, BrokerURL
from relaybeat.relay.ports import parse_hostport
from relaybeat.relay.service import RelaySettings
from relaybeat.relay.watch import PRESETS
from relaybeat.relay.wire import Topics

if TYPE_CHECKING:
    from relaybeat.api.auth import ApiSettings
    from relaybeat.monitor.service import MonitorSettings


def _flag(key: str, variable: str | None = None, spelled: str | None = None) -> Any:
    """A field of a `*Flags` class: the deployment key it sets ("section.key"), the flag's own variable,
    and how the flag is spelled when that is not `--` and the field's name with dashes."""
    return field(default=None, metadata={"key": key, "variable": variable, "spelled": spelled})


@dataclass(frozen=True, slots=True)
class MonitorFlags:
    """`relaybeat monitor`'s flags; None: not given."""

    broker: str | None = _flag("monitor.broker", "RELAYBEAT_BROKER")
    db: str | None = _flag("monitor.db", "RELAYBEAT_DB")
    listen: str | None = _flag("monitor.listen", "RELAYBEAT_LISTEN")
    misses: int | None = _flag("detector.misses", "RELAYBEAT_MISSES")
    default_interval: float | None = _flag("detector.default_interval_s")
    adaptive: bool | None = _flag("detector.adaptive", spelled="--adaptive/--fixed")
    phi: float | None = _flag("detector.phi_threshold")
    client_id: str | None = _flag("monitor.client_id")
    max_bundle_bytes: int | None = _flag("monitor.max_bundle_bytes")
    max_bundle_entries: int | None = _flag("monitor.max_bundle_entries")
    journal: str | None = _flag("monitor.journal")
    prefix: str | None = _flag("monitor.prefix", "RELAYBEAT_PREFIX")
    node_id: str | None = _flag("monitor.node_id", "RELAYBEAT_NODE_ID")
    failover: float | None = _flag("monitor.failover_s")
    behind_grace: float | None = _flag("monitor.behind_grace_s")


@dataclass(frozen=True, slots=True)
class RelayFlags:
    """`relaybeat relay`'s flags; None: not given."""

    id: str | None = _flag("relay.id", "RELAYBEAT_ID")
    local: str | None = _flag("relay.local")
    upstream: str | None = _flag("relay.upstream", "RELAYBEAT_UPSTREAM")
    flush: float | None = _flag("relay.flush_s")
    serve: str | None = _flag("relay.serve")
    default_interval: float | None = _flag("relay.default_interval_s")
    children: bool | None = _flag("relay.children", spelled="--children/--no-children")
    max_bundle_bytes: int | None = _flag("relay.max_bundle_bytes")
    prefix: str | None = _flag("relay.prefix", "RELAYBEAT_PREFIX")
    keyframe_s: float | None = _flag("relay.keyframe_s")
    format: str | None = _flag("relay.format")
    bundle_qos: int | None = _flag("relay.bundle_qos")
    hold_first_s: float | None = _flag("relay.hold_first_s")
    watch: tuple[str, ...] = ()  # --watch PRESET, repeatable: adds to the file's [[relay.watch]]


@dataclass(frozen=True, slots=True)
class LeafFlags:
    """`relaybeat leaf`'s flags; None: not given."""

    id: str | None = _flag("leaf.id", "RELAYBEAT_ID")
    broker: str | None = _flag("leaf.broker", "RELAYBEAT_BROKER")
    interval: float | None = _flag("leaf.interval_s")
    prefix: str | None = _flag("leaf.prefix", "RELAYBEAT_PREFIX")


Flags = MonitorFlags | RelayFlags | LeafFlags


def _option(flag: Field[Any]) -> str:
    return flag.metadata["spelled"] or "--" + flag.name.replace("_", "-")


def _spelled(flag: Field[Any]) -> str:
    """A flag as an error message names it: `--broker (RELAYBEAT_BROKER)`, `--phi`."""
    variable = flag.metadata["variable"]
    return _option(flag) if variable is None else f"{_option(flag)} ({variable})"


def _deployment(
    flags: Flags, environ: Mapping[str, str], config: Path | None, section: str | None = None
) -> DeploymentConfig:
    """The deployment file, overridden by RELAYBEAT_* variables, overridden by the flags given; only
    `section` of it when given (a leaf or relay reads its own)."""
    given = {f.metadata["key"]: (_spelled(f), getattr(flags, f.name)) for f in fields(flags) if "key" in f.metadata}
    return load_config(config, environ, given, None if section is None else (section,))


def _required(flags: Flags, name: str, value: str | None) -> str:
    """A setting a command cannot start without (its flag has a variable), from either or the file."""
    if value is None:
        flag = next(f for f in fields(flags) if f.name == name)
        section, key = flag.metadata["key"].split(".")
        msg = (
            f"{section} {key}: give {_option(flag)}, {flag.metadata['variable']} or `{key}` under [{section}] "
            "in the deployment file"
        )
        raise ConfigError(msg)
    return value


@dataclass(frozen=True, slots=True)
class MonitorStart:
    settings: MonitorSettings
    db: str  # SQLAlchemy URL
    listen: tuple[str, int]  # where the HTTP API listens
    api: ApiSettings


def monitor_start(flags: MonitorFlags, environ: Mapping[str, str], config: Path | None) -> MonitorStart:
    deployment = _deployment(flags, environ, config)
    cfg = deployment.monitor
    detector = deployment.detector
    settings = cfg.settings(detector.policy(), deployment.notify.settings(), detector.targets())
    return MonitorStart(settings, cfg.db, parse_hostport(cfg.listen), deployment.api.settings())


@dataclass(frozen=True, slots=True)
class RelayStart:
    # With `embedded` set, `settings.local` is that broker's address until it runs (then its own URL).
    settings: RelaySettings
    embedded: tuple[str, int] | None  # HOST, PORT of the broker to run in the relay for its leaves


def relay_start(flags: RelayFlags, environ: Mapping[str, str], config: Path | None) -> RelayStart:
    cfg = _deployment(flags, environ, config, "relay").relay
    relay_id = _required(flags, "id", cfg.id)
    unknown = [preset for preset in flags.watch if preset not in PRESETS]
    if unknown:
        msg = f"--watch {unknown[0]}: unknown preset; presets are {', '.join(PRESETS)}"
        raise ConfigError(msg)
    if cfg.local == "embedded":
        host, port = parse_hostport(cfg.serve)
        return RelayStart(cfg.settings(relay_id, BrokerURL(host, port), flags.watch), (host, port))
    return RelayStart(cfg.settings(relay_id, Brokers.parse(cfg.local), flags.watch), None)


@dataclass(frozen=True, slots=True)
class LeafStart:
    host_id: str
    broker: Brokers
    interval_s: float
    topics: Topics


def leaf_start(flags: LeafFlags, environ: Mapping[str, str], config: Path | None) -> LeafStart:
    cfg = _deployment(flags, environ, config, "leaf").leaf
    host_id, broker = _required(flags, "id", cfg.id), _required(flags, "broker", cfg.broker)
    return LeafStart(host_id, Brokers.parse(broker), cfg.interval_s, Topics(cfg.prefix))
