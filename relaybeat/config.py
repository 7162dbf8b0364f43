"""The deployment file (`--config relaybeat.toml`): validated once at start, errors name the key.

One file configures a whole deployment: `[monitor]`, `[detector]`, `[api]`, `[relay]` and `[leaf]`
(each command reads the sections it needs; every section is validated). `[broker]` belongs to
`relaybeat broker --config` and is skipped here.

Precedence for every setting: command-line flag (or the flag's own RELAYBEAT_* variable, e.g.
RELAYBEAT_BROKER) > RELAYBEAT_<SECTION>__<KEY> variable (e.g. RELAYBEAT_DETECTOR__MISSES=5; the
value is read as a TOML value, so lists and booleans work) > this file > built-in default. API tokens
also come from RELAYBEAT_API_TOKENS and RELAYBEAT_API_WRITE_TOKENS (comma-separated).

Unknown keys are errors, so a typo never silently does nothing. An error names the key, where the
value came from (file, variable or flag) and what is allowed; it never repeats a token.
"""

from __future__ import annotations

import re
import socket
import tomllib
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from relaybeat.errors import SettingsError
from relaybeat.monitor.states import Kind, State
from relaybeat.relay.mqtt import Brokers, BrokerURL
from relaybeat.relay.ports import parse_hostport
from relaybeat.relay.service import DEFAULT_KEYFRAME_S, BundleFormat, RelaySettings
from relaybeat.relay.watch import PRESETS, Source, sources
from relaybeat.relay.wire import (
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_BUNDLE_BYTES,
    DEFAULT_MAX_BUNDLE_ENTRIES,
    DEFAULT_PREFIX,
    Topics,
    is_valid_id,
)

if TYPE_CHECKING:  # the monitor's parts are imported where they are built, so a leaf or relay starts light
    from relaybeat.api.auth import ApiSettings
    from relaybeat.monitor.detector import Policy
    from relaybeat.monitor.outbox import NotifySettings, Webhook
    from relaybeat.monitor.quality import Targets
    from relaybeat.monitor.service import MonitorSettings
    from relaybeat.monitor.view import StatusPage

ENV_PREFIX = "RELAYBEAT_"
DEFAULT_FAILOVER_S = 5.0  # PostgreSQL hot standby: a standby takes over within this
TOKEN_MIN_CHARS = 16
TOKEN_VARIABLES = {"RELAYBEAT_API_TOKENS": "read_tokens", "RELAYBEAT_API_WRITE_TOKENS": "write_tokens"}


class ConfigError(SettingsError):
    """A bad configuration value; the message names the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Seconds = Annotated[float, Field(gt=0, le=86_400)]
MaxBundleBytes = Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)]
_ORIGIN = re.compile(r"https?://[^/\s?#]+\Z")


def _check_broker(value: str) -> str:
    Brokers.parse(value)  # one URL or several, comma-separated; its errors never repeat a password
    return value


def _check_hostport(value: str) -> str:
    parse_hostport(value)
    return value


def _check_prefix(value: str) -> str:
    Topics(value)
    return value


def _check_id(value: str | None) -> str | None:
    if value is not None and not is_valid_id(value):
        msg = "must match [A-Za-z0-9._-]{1,128}"
        raise ValueError(msg)
    return value


def _check_ids(values: list[str] | None) -> list[str] | None:
    for value in values or ():
        _check_id(value)
    return values


def _check_unique(what: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        msg = f"{what} names must be unique; repeated: {', '.join(repeated)}"
        raise ValueError(msg)


# The checked kinds of value, one type each, so that every section's field says what it holds.
Broker = Annotated[str, AfterValidator(_check_broker)]  # one mqtt:// URL, or several comma-separated
HostPort = Annotated[str, AfterValidator(_check_hostport)]
Prefix = Annotated[str, AfterValidator(_check_prefix)]
Name = Annotated[str, AfterValidator(_check_id)]  # an id, a page's or a target's name
OptionalId = Annotated[str | None, AfterValidator(_check_id)]  # None: unset
Ids = Annotated[list[str], AfterValidator(_check_ids)]
OptionalIds = Annotated[list[str] | None, AfterValidator(_check_ids)]


# ------------------------------------------------------------------------------------- sections


class MissesOverride(_Strict):
    hosts: str = Field(min_length=1, description="host-id glob, e.g. 'db-*'")
    misses: int = Field(ge=1, le=1000)


class TargetsOverride(_Strict):
    hosts: str = Field(min_length=1, description="host-id glob, e.g. 'wan-*'")
    target_detection_s: float | None = Field(default=None, gt=0, le=86400)
    target_false_alarms_per_day: float | None = Field(default=None, gt=0, le=1e6)


class DetectorConfig(_Strict):
    misses: int = Field(default=3, ge=1, le=1000)
    default_interval_s: Seconds = DEFAULT_INTERVAL_S
    misses_override: list[MissesOverride] = Field(default_factory=list)
    adaptive: bool = False
    phi_threshold: float = Field(default=8.0, ge=0.5, le=30)
    flap_window_s: Seconds = 600.0
    flap_start: int = Field(default=6, ge=2)
    flap_stop: int = Field(default=3, ge=1)
    # Targets instead of knobs (monitor/quality.py): each host's timeout derived from what it shows.
    target_detection_s: float | None = Field(default=None, gt=0, le=86400)
    target_false_alarms_per_day: float | None = Field(default=None, gt=0, le=1e6)
    targets_override: list[TargetsOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _flap_hysteresis(self) -> DetectorConfig:
        if self.flap_stop >= self.flap_start:
            msg = f"flap_stop ({self.flap_stop}) must be below flap_start ({self.flap_start})"
            raise ValueError(msg)
        return self

    def targets(self) -> tuple[Targets, tuple[tuple[str, Targets], ...]]:
        """The timeout targets, and per host-id glob (first match wins; unset keys: the section's)."""
        from relaybeat.monitor.quality import Targets  # a monitor part: see TYPE_CHECKING above

        default = Targets(self.target_detection_s, self.target_false_alarms_per_day)
        by_glob = tuple(
            (
                o.hosts,
                Targets(
                    o.target_detection_s if o.target_detection_s is not None else default.detection_s,
                    o.target_false_alarms_per_day
                    if o.target_false_alarms_per_day is not None
                    else default.false_alarms_per_day,
                ),
            )
            for o in self.targets_override
        )
        return default, by_glob

    def policy(self) -> Policy:
        from relaybeat.monitor.detector import Policy

        return Policy(
            misses=self.misses,
            default_interval_s=self.default_interval_s,
            misses_by_glob=tuple((o.hosts, o.misses) for o in self.misses_override),
            adaptive=self.adaptive,
            phi_threshold=self.phi_threshold,
            flap_window_s=self.flap_window_s,
            flap_start=self.flap_start,
            flap_stop=self.flap_stop,
        )


class MonitorConfig(_Strict):
    broker: Broker = "mqtt://127.0.0.1:1883"
    db: str = "sqlite:///relaybeat.db"
    listen: HostPort = "127.0.0.1:8000"
    prefix: Prefix = DEFAULT_PREFIX
    client_id: OptionalId = None  # unset: relaybeat-monitor-<node_id>, unique per node
    node_id: OptionalId = None  # unset: <host name>-<listen port>, stable across restarts
    failover_s: float = Field(default=DEFAULT_FAILOVER_S, ge=0.2, le=600)  # PostgreSQL hot standby
    accept_direct_beats: bool = True
    max_bundle_bytes: MaxBundleBytes = DEFAULT_MAX_BUNDLE_BYTES
    max_bundle_entries: int = Field(default=DEFAULT_MAX_BUNDLE_ENTRIES, ge=1, le=10_000_000)
    relays: Annotated[list[str] | None, AfterValidator(_check_ids)] = (
        None  # accept bundles only from these relays (children included); unset: any
    )
    journal: str | None = Field(default=None, min_length=1)  # decisions not yet in SQL; unset: see journal_path
    # Behind its own input (onboarding a huge fleet, a stalled loop), the monitor renews its grace for up
    # to this long per episode, then decides anyway; unset: the monitor's default (monitor/ingest.py)
    behind_grace_s: float | None = Field(default=None, ge=0, le=86_400)

    @field_validator("db")
    @classmethod
    def _db(cls, value: str) -> str:
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            # SQLAlchemy's message repeats the URL, password and all.
            msg = "must be a SQLAlchemy URL: sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
            raise ValueError(msg) from None
        return value

    def journal_path(self) -> Path | None:
        """Where decisions wait for SQL: `journal` if set; else next to a SQLite file (`<db>.journal`),
        or for PostgreSQL `<client_id>-<database>.journal` in the current directory (one per monitor
        and database). None for an in-memory SQLite database, which a restart loses anyway."""
        if self.journal is not None:
            return Path(self.journal)
        from sqlalchemy import make_url

        url = make_url(self.db)
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            if database in ("", ":memory:") or url.query.get("mode") == "memory":
                return None
            return Path(database + ".journal")
        return Path(f"{self.mqtt_client_id()}-{url.database or url.username or 'postgres'}.journal")

    def node(self) -> str:
        """This monitor's node id: `node_id`, or `<host name>-<listen port>` (unique on a host, and the
        same after a restart, so a node recognises its own lease and journal)."""
        if self.node_id is not None:
            return self.node_id
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100] or "monitor"
        return f"{host}-{parse_hostport(self.listen)[1]}"

    def mqtt_client_id(self) -> str:
        return self.client_id if self.client_id is not None else f"relaybeat-monitor-{self.node()}"

    def settings(
        self,
        policy: Policy,
        notify: NotifySettings | None = None,
        targets: tuple[Targets, tuple[tuple[str, Targets], ...]] | None = None,
    ) -> MonitorSettings:
        from relaybeat.monitor.cluster import ClusterSettings
        from relaybeat.monitor.outbox import NotifySettings
        from relaybeat.monitor.quality import Targets
        from relaybeat.monitor.service import MonitorSettings

        targets = targets or (Targets(), ())
        return MonitorSettings(
            Brokers.parse(self.broker),
            policy,
            self.prefix,
            self.mqtt_client_id(),
            self.accept_direct_beats,
            max_bundle_bytes=self.max_bundle_bytes,
            max_bundle_entries=self.max_bundle_entries,
            relays=None if self.relays is None else frozenset(self.relays),
            notify=notify or NotifySettings(),
            journal=self.journal_path(),
            **({} if self.behind_grace_s is None else {"behind_grace_s": self.behind_grace_s}),
            targets=targets[0],
            targets_by_glob=targets[1],
            cluster=ClusterSettings(self.node(), self.failover_s, api=f"http://{self.listen}"),
        )


class StatusPageConfig(_Strict):
    """One `[[api.status_page]]`: a public read-only page at /status/<name>."""

    name: Name  # the page's URL: /status/<name>
    title: str = Field(default="", max_length=200)  # default: the name
    hosts: list[str] = Field(default_factory=list)  # host-id globs, e.g. 'web-*'
    relays: Ids = Field(default_factory=list)  # each relay, the relays below it and all their hosts

    @field_validator("hosts")
    @classmethod
    def _globs(cls, globs: list[str]) -> list[str]:
        for glob in globs:
            if not glob or len(glob) > 128:
                msg = "each host glob must be 1 to 128 characters"
                raise ValueError(msg)
        return globs

    @model_validator(mode="after")
    def _shows_something(self) -> StatusPageConfig:
        if not (self.hosts or self.relays):
            msg = f"status page {self.name!r} shows nothing: give hosts (globs) or relays"
            raise ValueError(msg)
        return self

    def page(self) -> StatusPage:
        from relaybeat.monitor.view import StatusPage

        return StatusPage(
            name=self.name, title=self.title or self.name, hosts=tuple(self.hosts), relays=tuple(self.relays)
        )


class ApiConfig(_Strict):
    read: Literal["open", "token"] | None = None  # unset: "token" once read tokens are given, else "open"
    read_tokens: list[SecretStr] = Field(default_factory=list)
    write_tokens: list[SecretStr] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    status_page: list[StatusPageConfig] = Field(default_factory=list)  # public pages, no token needed

    @field_validator("read_tokens", "write_tokens")
    @classmethod
    def _tokens(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        for token in tokens:
            text = token.get_secret_value()
            if len(text) < TOKEN_MIN_CHARS or not text.isascii() or not text.isprintable() or " " in text:
                msg = (
                    f"each token must be at least {TOKEN_MIN_CHARS} printable ASCII characters without spaces "
                    "(make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
                raise ValueError(msg)
        return tokens

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                msg = f"{origin[:80]!r} is not '*' or an origin like https://ops.example.com[:port]"
                raise ValueError(msg)
        return origins

    @model_validator(mode="after")
    def _protected_reads_need_a_token(self) -> ApiConfig:
        if self.read == "token" and not (self.read_tokens or self.write_tokens):
            msg = "read = 'token' needs at least one token in read_tokens, write_tokens or RELAYBEAT_API_TOKENS"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _unique_status_pages(self) -> ApiConfig:
        _check_unique("status page", [p.name for p in self.status_page])
        return self

    def settings(self) -> ApiSettings:
        from relaybeat.api.auth import ApiSettings

        mode = self.read or ("token" if self.read_tokens else "open")
        return ApiSettings(
            read_open=mode == "open",
            read_tokens=tuple(t.get_secret_value() for t in self.read_tokens),
            write_tokens=tuple(t.get_secret_value() for t in self.write_tokens),
            cors_origins=tuple(self.cors_origins),
            status_pages=tuple(p.page() for p in self.status_page),
        )


class WatchConfig(_Strict):
    """One `[[relay.watch]]`: a preset (`preset = "tasmota"`) or a custom source (`topic = ...`)."""

    preset: Literal["tasmota", "esphome", "zigbee2mqtt", "sparkplug"] | None = None
    name: str = "watch"  # a custom source's name, shown in reasons and as the hosts' `source`
    topic: str | None = None  # an MQTT filter; its + and # levels are the device name
    online: str = Field(default="online", min_length=1)
    offline: str = Field(default="offline", min_length=1)
    field: str | None = None  # the payload is a JSON object and this field holds online/offline
    expire_after_s: Seconds | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> WatchConfig:
        if (self.preset is None) == (self.topic is None):
            msg = "give either preset (one of " + ", ".join(PRESETS) + ") or topic"
            raise ValueError(msg)
        if self.preset is not None and self.model_fields_set - {"preset"}:
            msg = f"a preset takes no other keys (given: {', '.join(sorted(self.model_fields_set - {'preset'}))})"
            raise ValueError(msg)
        self.source()  # a bad topic or name stops here, named
        return self

    def source(self) -> Source:
        if self.preset is not None:
            return PRESETS[self.preset]
        return Source(
            name=self.name,
            topic=self.topic or "",
            online=self.online,
            offline=self.offline,
            field=self.field,
            expire_after_s=self.expire_after_s,
        )


class RelayConfig(_Strict):
    id: OptionalId = None  # usually per process: --id or RELAYBEAT_ID
    local: str = "embedded"  # the broker leaves beat to, or "embedded" to run one in the relay
    serve: HostPort = "127.0.0.1:1884"  # with local = "embedded": where that broker listens
    upstream: Broker = "mqtt://127.0.0.1:1883"
    flush_s: float = Field(default=1.0, ge=0.01, le=3600)
    default_interval_s: Seconds = DEFAULT_INTERVAL_S
    children: bool | Literal["auto"] = "auto"
    prefix: Prefix = DEFAULT_PREFIX
    forget_after_s: Seconds = 86_400.0
    max_bundle_bytes: MaxBundleBytes = DEFAULT_MAX_BUNDLE_BYTES
    keyframe_s: float = Field(default=DEFAULT_KEYFRAME_S, ge=0, le=86_400)
    format: BundleFormat = "binary"
    bundle_qos: Literal[0, 1] = 0
    hold_first_s: float | None = Field(default=None, ge=0, le=3600)  # None: default_interval_s
    watch: list[WatchConfig] = Field(default_factory=list)  # [[relay.watch]]; --watch PRESET adds to them

    @field_validator("local")
    @classmethod
    def _local(cls, value: str) -> str:
        return value if value == "embedded" else _check_broker(value)

    def settings(self, relay_id: str, local: BrokerURL | Brokers, watch: Sequence[str] = ()) -> RelaySettings:
        """`local`: the broker leaves beat to (the embedded one's URL once it runs); `watch`: presets
        from --watch, watched besides the file's `[[relay.watch]]` sources."""
        return RelaySettings(
            relay_id,
            local,
            Brokers.parse(self.upstream),
            self.flush_s,
            self.default_interval_s,
            self.prefix,
            forget_after_s=self.forget_after_s,
            max_bundle_bytes=self.max_bundle_bytes,
            accept_children=None if self.children == "auto" else self.children,
            keyframe_s=self.keyframe_s,
            format=self.format,
            bundle_qos=self.bundle_qos,
            hold_first_s=self.default_interval_s if self.hold_first_s is None else self.hold_first_s,
            watch=sources(watch, [w.source() for w in self.watch]),
        )

    @field_validator("bundle_qos", mode="before")
    @classmethod
    def _bundle_qos(cls, value: object) -> object:
        if type(value) is not int or value not in (0, 1):  # not `true`, nor 1.0
            msg = "must be 0 or 1"
            raise ValueError(msg)
        return value

    @field_validator("children", mode="before")
    @classmethod
    def _children(cls, value: object) -> object:
        if type(value) not in (bool, str) or value not in (True, False, "auto"):
            msg = "must be true, false or 'auto'"
            raise ValueError(msg)
        return value


class LeafConfig(_Strict):
    id: OptionalId = None  # usually per process: --id or RELAYBEAT_ID
    broker: str | None = None  # the site broker (a relay's), e.g. mqtt://relay-a:1884
    interval_s: float = Field(default=DEFAULT_INTERVAL_S, ge=0.05, le=86_400)
    prefix: Prefix = DEFAULT_PREFIX

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        return None if value is None else _check_broker(value)


NotifyState = Literal["down", "unreachable"]
NotifyKind = Literal["host", "relay"]


def _bad_states() -> list[NotifyState]:
    return ["down", "unreachable"]


def _both_kinds() -> list[NotifyKind]:
    return ["host", "relay"]


class WebhookConfig(_Strict):
    """One `[[notify.webhooks]]` target. Errors never repeat its URL or secret (either may hold a token)."""

    name: Name  # names the target in the outbox and in logs: keep it stable
    url: str
    secret: SecretStr | None = None  # signs each message: X-Relaybeat-Signature
    states: list[NotifyState] = Field(default_factory=_bad_states, min_length=1)
    hosts: list[str] = Field(default_factory=lambda: ["*"], min_length=1)  # host-id globs
    relays: Ids = Field(default_factory=list)  # only subjects at or behind these relays; empty: all
    kinds: list[NotifyKind] = Field(default_factory=_both_kinds, min_length=1)
    remind_every_s: float | None = Field(default=None, gt=0, le=30 * 86_400)  # unset: no reminders
    timeout_s: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            msg = "must be an http:// or https:// URL with a host"
            raise ValueError(msg)
        return value

    def webhook(self) -> Webhook:
        from relaybeat.monitor.notify import Target
        from relaybeat.monitor.outbox import Webhook

        target = Target(
            self.name,
            frozenset(State(s) for s in self.states),
            tuple(self.hosts),
            tuple(self.relays),
            frozenset(Kind(k) for k in self.kinds),
            self.remind_every_s,
        )
        secret = None if self.secret is None else self.secret.get_secret_value()
        return Webhook(target, self.url, secret, self.timeout_s)


class NotifyConfig(_Strict):
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    retry_min_s: float = Field(default=1.0, gt=0, le=3600)
    retry_max_s: float = Field(default=300.0, gt=0, le=86_400)
    give_up_after_s: float = Field(default=7 * 86_400.0, gt=0, le=90 * 86_400)
    keep_delivered_s: float = Field(default=7 * 86_400.0, gt=0, le=365 * 86_400)

    @model_validator(mode="after")
    def _consistent(self) -> NotifyConfig:
        _check_unique("webhook", [w.name for w in self.webhooks])
        if self.retry_min_s > self.retry_max_s:
            msg = f"retry_min_s ({self.retry_min_s:g}) must not exceed retry_max_s ({self.retry_max_s:g})"
            raise ValueError(msg)
        return self

    def settings(self) -> NotifySettings:
        from relaybeat.monitor.outbox import NotifySettings

        return NotifySettings(
            tuple(w.webhook() for w in self.webhooks),
            self.retry_min_s,
            self.retry_max_s,
            self.give_up_after_s,
            self.keep_delivered_s,
        )


class DeploymentConfig(_Strict):
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    leaf: LeafConfig = Field(default_factory=LeafConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)


# ---------------------------------------------------------------------------------------- loading

Flag = tuple[str, object]  # (the flag as the user spells it, its value; None when not given)


def load_config(
    path: Path | None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Flag] | None = None,
    sections: Collection[str] | None = None,
) -> DeploymentConfig:
    """Defaults < the file < RELAYBEAT_* variables < flags (keys like "monitor.broker").

    ConfigError naming the key, where its value came from and what is allowed, when anything is wrong.
    With `sections` (a leaf: `("leaf",)`), the other known sections are left at their defaults, unread:
    a leaf or relay neither checks the monitor's database URL nor loads what checking it needs.
    """
    document: dict[str, Any] = {}
    where: dict[tuple[str, str], str] = {}  # (section, key) -> where its value came from
    if path is not None:
        document = _read(path)
        document.pop("broker", None)  # the [broker] table belongs to `relaybeat broker --config`
    for name, raw in sorted((environ or {}).items()):
        target = _variable_target(name)
        if target is not None:
            section, key = target
            _put(document, section, key, _variable_value(section, key, name, raw))
            where[section, key] = name
    for dotted, (flag, value) in (flags or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            _put(document, section, key, value)
            where[section, key] = flag
    if sections is not None:
        document = {k: v for k, v in document.items() if k in sections or k not in DeploymentConfig.model_fields}
    try:
        return DeploymentConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError("\n".join(_explain(error, path, where) for error in exc.errors())) from None


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        msg = f"{path}: cannot read ({exc.strerror})"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path}: not valid TOML ({exc})"
        raise ConfigError(msg) from None


def _put(document: dict[str, Any], section: str, key: str, value: object) -> None:
    table = document.setdefault(section, {})
    if not isinstance(table, dict):  # e.g. `monitor = 3` in the file: let validation name it
        return
    table[key] = value


def _variable_target(name: str) -> tuple[str, str] | None:
    if name in TOKEN_VARIABLES:
        return "api", TOKEN_VARIABLES[name]
    if not name.startswith(ENV_PREFIX) or "__" not in name:
        return None
    section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
    return section, key


def _variable_value(section: str, key: str, name: str, raw: str) -> object:
    if name in TOKEN_VARIABLES:
        return [token for token in re.split(r"[,\s]+", raw) if token]
    annotation = _field_annotation(section, key)
    if annotation in (str, str | None):
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # e.g. a URL: validation says what was expected


def _field_annotation(section: str, key: str) -> Any:
    model = _section_model(section)
    field = None if model is None else model.model_fields.get(key)
    return None if field is None else field.annotation


def _section_model(section: str) -> type[BaseModel] | None:
    field = DeploymentConfig.model_fields.get(section)
    return None if field is None else typing.cast(type[BaseModel], field.annotation)


def _explain(error: Any, path: Path | None, where: Mapping[tuple[str, str], str]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(part) for part in loc)
    if len(loc) >= 2:
        source = where.get((str(loc[0]), str(loc[1])))
    elif error["type"] == "extra_forbidden":  # an unknown section: name the variable that made it, if any
        source = next((name for (section, _), name in where.items() if section == loc[0]), None)
    else:
        source = None
    head = f"{source} ({key})" if source is not None else (f"{path}: {key}" if path is not None else key)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "model_type":
        message = "must be a table"
    elif error["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        if known:
            message += f"; known keys: {', '.join(known)}"
    elif error["type"] not in ("value_error", "literal_error"):
        allowed = _allowed(loc)
        if allowed:
            message += f" (allowed: {allowed})"
    return f"{head}: {message}"


def _field_at(loc: tuple[Any, ...]) -> Any:
    """The pydantic FieldInfo a location points at, stepping through lists of tables."""
    model: type[BaseModel] | None = DeploymentConfig
    field = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        inner = field.annotation
        if typing.get_origin(inner) is list:
            inner = typing.get_args(inner)[0]
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return field


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = DeploymentConfig
    if loc:
        field = _field_at(loc)
        inner = None if field is None else field.annotation
        if typing.get_origin(inner) is list:
            inner = typing.get_args(inner)[0]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return []
        model = inner
    names = sorted(model.model_fields)
    return [*names, "broker"] if model is DeploymentConfig else names


def _allowed(loc: tuple[Any, ...]) -> str:
    field = _field_at(loc)
    if field is None:
        return ""
    kind = field.annotation
    choices = [a for a in typing.get_args(kind) if a is not type(None)] if typing.get_origin(kind) else []
    literals = [v for c in choices for v in (typing.get_args(c) if typing.get_origin(c) is Literal else ())]
    if typing.get_origin(kind) is Literal:
        literals = list(typing.get_args(kind))
    if literals:
        words = ["true", "false"] if bool in choices else []
        return "one of " + ", ".join([*words, *(repr(v) for v in literals)])
    if kind is bool:
        return "true or false"
    if kind in (int, float):
        bounds = []
        for rule in field.metadata:
            if isinstance(rule, Ge):
                bounds.append(f">= {rule.ge}")
            elif isinstance(rule, Gt):
                bounds.append(f"> {rule.gt}")
            elif isinstance(rule, Le):
                bounds.append(f"<= {rule.le}")
            elif isinstance(rule, Lt):
                bounds.append(f"< {rule.lt}")
        noun = "an integer" if kind is int else "a number"
        return f"{noun} {' and '.join(bounds)}" if bounds else noun
    if kind in (str, str | None):
        return "a string"
    if typing.get_origin(kind) is list:
        return "a list"
    return ""
