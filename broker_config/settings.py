"""The embedded broker's settings: `BrokerSettings`, read from the `[broker]` table of a TOML file
(broker_config/amqtt.toml), and the errors a bad setting raises. Values and their validation; no amqtt."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from relaybeat.errors import SettingsError
from relaybeat.relay.ports import PortInUse
from relaybeat.relay.wire import Topics, is_valid_id

DEFAULT_PORT: Final = 1883


class BrokerConfigError(SettingsError):
    """A bad broker setting or password file. The message names the key (or file line)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


class BrokerPortInUse(PortInUse):
    """Another process already listens on the broker's host:port."""


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Everything the embedded broker needs. Relative paths are the caller's business."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port; `EmbeddedBroker.port` tells which
    password_file: Path | None = None  # None: anonymous, no topic policy
    relays: tuple[str, ...] = ()  # usernames with the relay role
    monitors: tuple[str, ...] = ()  # usernames with the monitor role
    prefix: str = Topics().prefix
    tls_cert: Path | None = None  # both set: the listener speaks TLS only (mqtts)
    tls_key: Path | None = None
    keepalive_grace: float = 1.5  # close a connection silent for grace x its keepalive
    session_expiry_s: int = 86_400  # forget disconnected persistent sessions after this

    def __post_init__(self) -> None:
        if not self.host:
            msg = "host"
            raise BrokerConfigError(msg, "must not be empty")
        if not 0 <= self.port <= 65535:
            msg = "port"
            raise BrokerConfigError(msg, f"{self.port} is not in [0, 65535]")
        try:
            Topics(self.prefix)
        except ValueError as exc:
            msg = "prefix"
            raise BrokerConfigError(msg, str(exc)) from None
        for key, names in (("relays", self.relays), ("monitors", self.monitors)):
            bad = [name for name in names if not is_valid_id(name)]
            if bad:
                raise BrokerConfigError(key, f"{bad[0]!r} is not a valid username ([A-Za-z0-9._-]{{1,128}})")
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = "tls_cert"
            raise BrokerConfigError(msg, "tls_cert and tls_key go together")
        if not self.keepalive_grace >= 1.0:
            msg = "keepalive_grace"
            raise BrokerConfigError(msg, f"{self.keepalive_grace} is below 1.0")
        if self.session_expiry_s < 1:
            msg = "session_expiry_s"
            raise BrokerConfigError(msg, f"{self.session_expiry_s} is below 1")

    @property
    def anonymous(self) -> bool:
        return self.password_file is None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


_PATH_KEYS: Final = ("password_file", "tls_cert", "tls_key")
_NAME_LIST_KEYS: Final = ("relays", "monitors")


def load_broker_settings(path: Path) -> BrokerSettings:
    """Read the `[broker]` table of a TOML file (see broker_config/amqtt.toml).

    Relative paths in it are relative to the file's directory. Unknown keys and wrong types raise
    `BrokerConfigError` naming the key.
    """
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise BrokerConfigError(str(path), f"not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"broker"})
    if extra:
        msg = f"{path}: {extra[0]}"
        raise BrokerConfigError(msg, "unknown table or key; expected only [broker]")
    table = document.get("broker", {})
    if not isinstance(table, dict):
        msg = f"{path}: broker"
        raise BrokerConfigError(msg, "must be a table")
    known = {f.name for f in fields(BrokerSettings)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = f"{path}: broker.{key}"
        if key not in known:
            raise BrokerConfigError(name, f"unknown key; known keys are {', '.join(sorted(known))}")
        values[key] = _broker_value(path, name, key, raw)
    try:
        return BrokerSettings(**values)
    except BrokerConfigError as exc:
        msg = f"{path}: broker.{exc.key}"
        raise BrokerConfigError(msg, exc.detail) from None


def _broker_value(path: Path, name: str, key: str, raw: object) -> Any:
    """One `[broker]` value, checked by the kind of its key; `name` says where it came from."""
    if key in _PATH_KEYS:
        if not isinstance(raw, str) or not raw:
            raise BrokerConfigError(name, "must be a non-empty string (a path)")
        return path.parent / Path(raw).expanduser()
    if key in _NAME_LIST_KEYS:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise BrokerConfigError(name, "must be a list of usernames")
        return tuple(raw)
    if key in ("port", "session_expiry_s"):
        if type(raw) is not int:
            raise BrokerConfigError(name, "must be an integer")
        return raw
    if key == "keepalive_grace":
        if type(raw) not in (int, float):
            raise BrokerConfigError(name, "must be a number")
        return float(raw)  # type: ignore[arg-type]
    if not isinstance(raw, str):
        raise BrokerConfigError(name, "must be a string")
    return raw
