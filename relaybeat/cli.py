"""`relaybeat`: the command line. Parses flags (and RELAYBEAT_* environment variables), builds each
service's settings, and runs it. Flags named in the README are a public contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from relaybeat import people
from relaybeat.monitor.store import downgrade_sync, pending_model_changes, upgrade_sync
from relaybeat.relay.mqtt import BrokerURL
from relaybeat.relay.ports import PortInUse, parse_hostport

T = TypeVar("T")

app = typer.Typer(
    help="Server liveness over MQTT, relayed: leaves beat to a relay, relays bundle, one monitor decides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

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


def _logging(level: str) -> None:
    if level.lower() not in LOG_LEVELS:
        msg = f"--log-level (RELAYBEAT_LOG_LEVEL): {level[:20]!r} is not one of {', '.join(LOG_LEVELS)}"
        raise _fail(msg)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _settings(build: Callable[[], T]) -> T:
    """What a command starts with (relaybeat/settings.py); a bad value stops start-up here."""
    from relaybeat.config import ConfigError

    try:
        return build()
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(2)


def _broker_url(url: str, option: str) -> BrokerURL:
    try:
        return BrokerURL.parse(url)
    except ValueError as exc:
        msg = f"{option}: {exc}"
        raise _fail(msg) from None


def _hostport(text: str, option: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        msg = f"{option}: {exc}"
        raise _fail(msg) from None


def _shown(db_url: str) -> str:
    """A database URL fit for a terminal or a log: the password masked."""
    from sqlalchemy import make_url

    try:
        return make_url(db_url).render_as_string(hide_password=True)
    except Exception:
        return "the database"


def _run(main: object) -> None:
    """Run a service until SIGINT/SIGTERM; a part of it that dies ends the process with status 70."""
    from relaybeat.errors import Unavailable
    from relaybeat.serve import run_until_signal

    try:
        status = run_until_signal(main)  # type: ignore[arg-type]
    except PortInUse as exc:
        msg = f"{exc.strerror}. Choose another port."
        raise _fail(msg) from None
    except Unavailable as exc:  # a journal or SQLite database another monitor holds, ...
        raise _fail(str(exc.strerror)) from None
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
    from relaybeat.broker_config.settings import BrokerConfigError, BrokerSettings, load_broker_settings

    _logging(log_level)
    try:
        settings = load_broker_settings(config) if config else BrokerSettings()
        if bind is not None:
            host, port = _hostport(bind, "--bind")
            settings = dataclasses.replace(settings, host=host, port=port)
    except (BrokerConfigError, OSError) as exc:
        raise _fail(str(exc)) from None
    _run(lambda stop: serve_broker(settings, stop))


@app.command()
def leaf(
    id: Annotated[
        str | None, typer.Option("--id", help="This host's id ([A-Za-z0-9._-]{1,128}).", envvar="RELAYBEAT_ID")
    ] = None,
    broker: Annotated[str | None, typer.Option(help="mqtt://[user:pass@]host:port", envvar="RELAYBEAT_BROKER")] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between beats [5].", min=0.05)] = None,
    config: Config = None,
    prefix: Prefix = None,
    log_level: LogLevel = "info",
) -> None:
    """Beat every INTERVAL seconds; on SIGTERM/SIGINT send a final `stopping` beat."""
    from relaybeat.relay.leaf import run_leaf
    from relaybeat.settings import LeafFlags, leaf_start

    _logging(log_level)
    start = _settings(
        lambda: leaf_start(LeafFlags(id=id, broker=broker, interval=interval, prefix=prefix), os.environ, config)
    )

    async def main(stop: asyncio.Event) -> None:
        await run_leaf(start.host_id, start.broker, start.interval_s, stop, start.topics)

    _run(main)


@app.command()
def relay(
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
    config: Config = None,
    prefix: Prefix = None,
    log_level: LogLevel = "info",
) -> None:
    """Subscribe to beats on the local broker and publish one bundle per flush upstream."""
    from relaybeat.relay.service import RelayService
    from relaybeat.serve import serve_relay
    from relaybeat.settings import RelayFlags, relay_start

    _logging(log_level)
    flags = RelayFlags(
        id=id, local=local, upstream=upstream, flush=flush, serve=serve, default_interval=default_interval,
        children=children, max_bundle_bytes=max_bundle_bytes, prefix=prefix,
    )  # fmt: skip
    start = _settings(lambda: relay_start(flags, os.environ, config))

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
def monitor(
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
    config: Config = None,
    prefix: Prefix = None,
    log_level: LogLevel = "info",
) -> None:
    """Decide every host's and relay's state, store transitions, serve the HTTP API (/docs)."""
    from relaybeat.serve import serve_monitor
    from relaybeat.settings import MonitorFlags, monitor_start

    _logging(log_level)
    flags = MonitorFlags(
        broker=broker, db=db, listen=listen, misses=misses, default_interval=default_interval, adaptive=adaptive,
        phi=phi, client_id=client_id, max_bundle_bytes=max_bundle_bytes, max_bundle_entries=max_bundle_entries,
        journal=journal, prefix=prefix, node_id=node_id, failover=failover,
    )  # fmt: skip
    start = _settings(lambda: monitor_start(flags, os.environ, config))
    host, port = start.listen
    _run(lambda stop: serve_monitor(start.settings, start.db, host, port, stop, start.api))


@app.command()
def up(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL for the demo's history.")] = DEFAULT_DB,
    broker_port: Annotated[int | None, typer.Option(help="Central broker port (default 1883, or a free one).")] = None,
    api_port: Annotated[int | None, typer.Option(help="HTTP API port (default 8000, or a free one).")] = None,
    duration: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    log_level: LogLevel = "warning",
) -> None:
    """The one-command demo: broker, monitor + API, two relays and a dozen leaves, live table."""
    from relaybeat.demo import run_demo

    _logging(log_level)
    _run(lambda stop: run_demo(stop, db, broker_port, api_port, duration))


@db_app.command("upgrade")
def db_upgrade(db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB) -> None:
    """Apply all migrations."""
    upgrade_sync(db)
    typer.echo(f"{_shown(db)}: schema up to date")


@db_app.command("downgrade")
def db_downgrade(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "base",
) -> None:
    """Revert migrations down to REVISION (default: everything)."""
    downgrade_sync(db, revision)
    typer.echo(f"{_shown(db)}: downgraded to {revision}")


@db_app.command("check")
def db_check(db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB) -> None:
    """Fail if the models and the migrations disagree (run after `db upgrade`)."""
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
