"""`relaybeat`: the command line. Parses flags (and RELAYBEAT_* environment variables), builds each
service's settings, and runs it. Flags named in the README are a public contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from relaybeat import people
from relaybeat.errors import RelaybeatError, SettingsError, message
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import PortInUse, parse_hostport

if TYPE_CHECKING:
    from relaybeat.settings import Flags


class _Commands(TyperGroup):
    """The one place a start-up failure becomes what a person reads: every `RelaybeatError` that stops
    a command is one line on stderr, exit status 2; `--debug`, RELAYBEAT_LOG_LEVEL=debug or
    `--log-level debug` print its traceback first. Anything else that escapes is a bug: a traceback."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer 0.29 vendors click privately)
        try:
            return super().invoke(ctx)
        except RelaybeatError as exc:
            if _debugging(ctx):
                traceback.print_exception(exc)
            hint = ". Choose another port." if isinstance(exc, PortInUse) else ""
            typer.secho(f"error: {message(exc)}{hint}", fg="red", err=True)
            raise typer.Exit(2) from None


def _debugging(ctx: Any) -> bool:
    return bool(
        ctx.params.get("debug")
        or os.environ.get("RELAYBEAT_LOG_LEVEL", "").lower() == "debug"
        or logging.getLogger("relaybeat").isEnabledFor(logging.DEBUG)
    )


app = typer.Typer(
    cls=_Commands,
    help="Server liveness over MQTT, relayed: leaves beat to a relay, relays bundle, one monitor decides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, print its traceback too (as RELAYBEAT_LOG_LEVEL=debug does).")
    ] = False,
) -> None:
    pass


DEFAULT_DB = "sqlite:///relaybeat.db"
Prefix = Annotated[
    str | None, typer.Option(envvar="RELAYBEAT_PREFIX", help="Topic prefix, ending in '/' [relaybeat/].")
]
LogLevel = Annotated[str, typer.Option(envvar="RELAYBEAT_LOG_LEVEL", help="debug, info, warning or error.")]
Config = Annotated[
    Path | None,
    typer.Option(help="Deployment file (TOML), see relaybeat.example.toml.", envvar="RELAYBEAT_CONFIG"),
]
LOG_LEVELS = ("debug", "info", "warning", "error")
F = TypeVar("F", bound="Flags")  # a command's flags, e.g. relaybeat.settings.MonitorFlags
S = TypeVar("S")  # what the command starts with, e.g. relaybeat.settings.MonitorStart


def _logging(level: str) -> None:
    if level.lower() not in LOG_LEVELS:
        msg = f"--log-level (RELAYBEAT_LOG_LEVEL): {level[:20]!r} is not one of {', '.join(LOG_LEVELS)}"
        raise SettingsError(msg)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _hostport(text: str, option: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except SettingsError as exc:
        msg = f"{option}: {exc}"
        raise SettingsError(msg) from None


def _start(ctx: typer.Context, kind: type[F], build: Callable[[F, Mapping[str, str], Path | None], S]) -> S:
    """A service command's start: logging as --log-level says, then what `build` makes of the flags
    given (the command's parameters, named as `kind`'s fields), the environment and --config."""
    _logging(ctx.params["log_level"])
    given: dict[str, Any] = {}
    for field in dataclasses.fields(kind):
        value = ctx.params[field.name]
        if value is not None:  # not given: the field's default
            given[field.name] = tuple(value) if isinstance(value, list) else value  # --watch: repeatable
    return build(kind(**given), os.environ, ctx.params["config"])


_SERVICE_OPTIONS = (  # every service command has these after its own options; `_start` reads them
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Config, default=None),
    inspect.Parameter("prefix", inspect.Parameter.KEYWORD_ONLY, annotation=Prefix, default=None),
    inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, annotation=LogLevel, default="info"),
)


def _service(command: Callable[..., None]) -> Callable[..., None]:
    """A service command (leaf, relay, monitor): its own options, then --config, --prefix and
    --log-level, declared once here; the command reads them through `_start`."""
    own = inspect.signature(command, eval_str=True)
    shared = {option.name for option in _SERVICE_OPTIONS}

    @functools.wraps(command)
    def run(**params: Any) -> None:
        command(**{name: value for name, value in params.items() if name not in shared})

    run.__signature__ = own.replace(parameters=[*own.parameters.values(), *_SERVICE_OPTIONS])  # type: ignore[attr-defined]
    return run


def _run(main: object) -> None:
    """Run a service until SIGINT/SIGTERM; a part of it that dies ends the process with status 70."""
    from relaybeat.serve import run_until_signal

    status = run_until_signal(main)  # type: ignore[arg-type]
    if status:
        raise typer.Exit(status)


@app.command()
def broker(
    bind: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on [127.0.0.1:1883].", envvar="RELAYBEAT_BROKER_BIND")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Broker config (TOML), see broker_config/amqtt.toml.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the embedded MQTT broker (amqtt, hardened: keepalive enforced, auth off the event loop)."""
    from relaybeat.broker_config.embedded import serve_broker
    from relaybeat.broker_config.settings import BrokerSettings, load_broker_settings

    _logging(log_level)
    try:
        settings = load_broker_settings(config) if config else BrokerSettings()
    except OSError as exc:
        msg = f"--config {config}: cannot read it ({exc.strerror or exc})"
        raise SettingsError(msg) from None
    if bind is not None:
        host, port = _hostport(bind, "--bind")
        settings = dataclasses.replace(settings, host=host, port=port)
    _run(lambda stop: serve_broker(settings, stop))


@app.command()
@_service
def leaf(
    ctx: typer.Context,
    id: Annotated[
        str | None, typer.Option("--id", help="This host's id ([A-Za-z0-9._-]{1,128}).", envvar="RELAYBEAT_ID")
    ] = None,
    broker: Annotated[str | None, typer.Option(help="mqtt://[user:pass@]host:port", envvar="RELAYBEAT_BROKER")] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between beats [5].", min=0.05)] = None,
) -> None:
    """Beat every INTERVAL seconds; on SIGTERM/SIGINT send a final `stopping` beat."""
    from relaybeat.relay.leaf import run_leaf
    from relaybeat.settings import LeafFlags, leaf_start

    start = _start(ctx, LeafFlags, leaf_start)

    async def main(stop: asyncio.Event) -> None:
        await run_leaf(start.host_id, start.broker, start.interval_s, stop, start.topics)

    _run(main)


@app.command()
@_service
def relay(
    ctx: typer.Context,
    id: Annotated[str | None, typer.Option("--id", help="This relay's id.", envvar="RELAYBEAT_ID")] = None,
    local: Annotated[
        str | None, typer.Option(help="Broker the leaves beat to (mqtt://...), or 'embedded' to run one here.")
    ] = None,
    upstream: Annotated[
        str | None,
        typer.Option(help="Broker the monitor listens on [mqtt://127.0.0.1:1883].", envvar="RELAYBEAT_UPSTREAM"),
    ] = None,
    flush: Annotated[float | None, typer.Option(help="Seconds between bundles [1].", min=0.01)] = None,
    serve: Annotated[
        str | None, typer.Option(help="With --local embedded: HOST:PORT of the embedded broker [127.0.0.1:1884].")
    ] = None,
    default_interval: Annotated[
        float | None, typer.Option(help="Interval assumed for beats that declare none [5].")
    ] = None,
    children: Annotated[
        bool | None, typer.Option("--children/--no-children", help="Fold child relays' bundles (default: auto).")
    ] = None,
    max_bundle_bytes: Annotated[
        int | None, typer.Option(help="Largest bundle sent or accepted from a child relay [8 MiB].")
    ] = None,
    keyframe_s: Annotated[
        float | None, typer.Option("--keyframe-s", help="Seconds between full bundles; deltas in between [30].")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="binary (wire version 2, deltas) or json (version 1) [binary].")
    ] = None,
    bundle_qos: Annotated[
        int | None,
        typer.Option("--bundle-qos", help="QoS of the bundles sent upstream: 0 (superseded every flush) or 1 [0]."),
    ] = None,
    hold_first_s: Annotated[
        float | None,
        typer.Option(
            "--hold-first-s",
            help="After a (re)start, seconds before the first bundle, so leaves beat first [--default-interval].",
            min=0,
        ),
    ] = None,
    watch: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PRESET",
            help="Vouch for devices that announce their own availability: tasmota, esphome, zigbee2mqtt, "
            "sparkplug (repeatable; custom sources: [[relay.watch]] in the deployment file).",
        ),
    ] = None,
) -> None:
    """Subscribe to beats on the local broker and publish one bundle per flush upstream."""
    from relaybeat.relay.service import RelayService
    from relaybeat.serve import serve_relay
    from relaybeat.settings import RelayFlags, relay_start

    start = _start(ctx, RelayFlags, relay_start)

    async def main(stop: asyncio.Event) -> None:
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            settings = start.settings
            if start.embedded is not None:
                from relaybeat.broker_config.embedded import EmbeddedBroker
                from relaybeat.broker_config.settings import BrokerSettings

                host, port = start.embedded
                embedded = await stack.enter_async_context(EmbeddedBroker(BrokerSettings(host=host, port=port)))
                settings = dataclasses.replace(settings, local=BrokerURL.parse(embedded.url))
                logging.getLogger("relaybeat").info("relay %s: leaves beat to %s", settings.relay_id, embedded.url)
            await serve_relay(RelayService(settings), stop)

    _run(main)


@app.command()
@_service
def monitor(
    ctx: typer.Context,
    broker: Annotated[
        str | None,
        typer.Option(
            help="Broker the relays publish bundles to (several: comma-separated).", envvar="RELAYBEAT_BROKER"
        ),
    ] = (None),
    db: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL (sqlite:///x.db, postgresql+psycopg://...).", envvar="RELAYBEAT_DB"),
    ] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT of the HTTP API.", envvar="RELAYBEAT_LISTEN")] = None,
    misses: Annotated[
        int | None, typer.Option(help="Missed intervals before a host is down [3].", min=1, envvar="RELAYBEAT_MISSES")
    ] = None,
    default_interval: Annotated[
        float | None, typer.Option(help="Interval assumed for beats that declare none [5].", min=0.01)
    ] = None,
    adaptive: Annotated[
        bool | None, typer.Option("--adaptive/--fixed", help="Phi-accrual timeouts from observed inter-arrivals.")
    ] = None,
    phi: Annotated[float | None, typer.Option(help="Phi threshold for --adaptive [8].", min=0.5)] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id (persistent session).")] = None,
    max_bundle_bytes: Annotated[int | None, typer.Option(help="Largest bundle accepted [8 MiB].")] = None,
    max_bundle_entries: Annotated[
        int | None, typer.Option(help="Most host entries and child bundles in one bundle [200000].")
    ] = None,
    journal: Annotated[
        str | None, typer.Option(help="Journal of decisions not yet in SQL [<sqlite db>.journal].")
    ] = None,
    node_id: Annotated[
        str | None, typer.Option(help="This monitor's node id [<host name>-<port>].", envvar="RELAYBEAT_NODE_ID")
    ] = None,
    failover: Annotated[
        float | None, typer.Option(help="Seconds before a standby takes over from a silent active [5].")
    ] = None,
    behind_grace: Annotated[
        float | None,
        typer.Option(help="Seconds per episode the monitor, behind its own input, keeps its grace [300].", min=0),
    ] = None,
) -> None:
    """Decide every host's and relay's state, store transitions, serve the HTTP API (/docs)."""
    from relaybeat.monitor_server import serve_monitor
    from relaybeat.settings import MonitorFlags, monitor_start

    start = _start(ctx, MonitorFlags, monitor_start)
    host, port = start.listen
    _run(lambda stop: serve_monitor(start.settings, start.db, host, port, stop, start.api))


@app.command()
def up(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL for the demo's history.")] = DEFAULT_DB,
    broker_port: Annotated[int | None, typer.Option(help="Central broker port (default 1883, or a free one).")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port (default 8000, or a free one).")] = None,
    duration: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Deployment file: its [api] (tokens, CORS) and [notify] apply; the demo keeps its own brokers.",
            envvar="RELAYBEAT_CONFIG",
        ),
    ] = None,
    log_level: LogLevel = "warning",
) -> None:
    """The one-command demo: broker, monitor + API, two relays and a dozen leaves, live table.
    Prints a write token it made for the run unless one is configured (RELAYBEAT_API_WRITE_TOKENS)."""
    from relaybeat.config import load_config
    from relaybeat.demo import run_demo

    _logging(log_level)
    deployment = load_config(config, os.environ)
    api, notify = deployment.api.settings(), deployment.notify.settings()
    _run(lambda stop: run_demo(stop, db, broker_port, api_port, duration, api=api, notify=notify))


@db_app.command("upgrade")
def db_upgrade(db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB) -> None:
    """Apply all migrations."""
    from relaybeat.monitor.store import shown_url, upgrade_sync

    upgrade_sync(db)
    typer.echo(f"{shown_url(db)}: schema up to date")


@db_app.command("downgrade")
def db_downgrade(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "base",
) -> None:
    """Revert migrations down to REVISION (default: everything)."""
    from relaybeat.monitor.store import downgrade_sync, shown_url

    downgrade_sync(db, revision)
    typer.echo(f"{shown_url(db)}: downgraded to {revision}")


@db_app.command("check")
def db_check(db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB) -> None:
    """Fail if the models and the migrations disagree (run after `db upgrade`)."""
    from relaybeat.monitor.store import pending_model_changes

    changes = pending_model_changes(db)
    if changes:
        for change in changes:
            typer.echo(f"pending: {change}")
        raise typer.Exit(1)
    typer.echo("models match migrations")


@app.command()
def passwd(
    password_file: Annotated[Path, typer.Argument(help="Password file of the embedded broker.")],
    username: Annotated[str, typer.Argument()],
) -> None:
    """Add or replace a user in an embedded-broker password file (password read from a prompt or stdin)."""
    from relaybeat.broker_config.passwords import main as passwords_main

    raise typer.Exit(passwords_main(["add-user", str(password_file), username]))


people.register(app)  # status, history, watch: for people at a terminal
