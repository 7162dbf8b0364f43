"""`relaybeat`: the command line. Parses flags (and RELAYBEAT_* environment variables), builds each
service's settings, and runs it. Flags named in the README are a public contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from monitor.service import MonitorSettings
from monitor.store import downgrade_sync, pending_model_changes, upgrade_sync
from relay.mqtt import BrokerURL
from relay.ports import PortInUse, parse_hostport
from relaybeat import people
from relay.wire import DEFAULT_INTERVAL_S, DEFAULT_PREFIX

app = typer.Typer(
    help="Server liveness over MQTT, relayed: leaves beat to a relay, relays bundle, one monitor decides.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")

DEFAULT_DB = "sqlite:///relaybeat.db"
Prefix = Annotated[str, typer.Option(envvar="RELAYBEAT_PREFIX", help="Topic prefix, ending in '/'.")]
LogLevel = Annotated[str, typer.Option(envvar="RELAYBEAT_LOG_LEVEL", help="debug, info, warning or error.")]


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(2)


def _broker_url(url: str, option: str) -> BrokerURL:
    try:
        return BrokerURL.parse(url)
    except ValueError as exc:
        raise _fail(f"{option}: {exc}") from None


def _hostport(text: str, option: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise _fail(f"{option}: {exc}") from None


def _run(main: object) -> None:
    from relaybeat.serve import run_until_signal

    try:
        run_until_signal(main)  # type: ignore[arg-type]
    except PortInUse as exc:
        raise _fail(f"{exc.strerror}. Choose another port.") from None


@app.command()
def broker(
    bind: Annotated[
        str | None, typer.Option(help="HOST:PORT to listen on [127.0.0.1:1883].", envvar="RELAYBEAT_BROKER_BIND")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Broker config (TOML), see broker_config/amqtt.toml.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the embedded MQTT broker (amqtt, hardened: keepalive enforced, auth off the event loop)."""
    from relay.broker import BrokerConfigError, BrokerSettings, load_broker_settings, serve_broker

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
    id: Annotated[str, typer.Option("--id", help="This host's id ([A-Za-z0-9._-]{1,128}).", envvar="RELAYBEAT_ID")],
    broker: Annotated[str, typer.Option(help="mqtt://[user:pass@]host:port", envvar="RELAYBEAT_BROKER")],
    interval: Annotated[float, typer.Option(help="Seconds between beats.", min=0.05)] = DEFAULT_INTERVAL_S,
    prefix: Prefix = DEFAULT_PREFIX,
    log_level: LogLevel = "info",
) -> None:
    """Beat every INTERVAL seconds; on SIGTERM/SIGINT send a final `stopping` beat."""
    from relay.leaf import run_leaf
    from relay.wire import Topics, is_valid_id

    _logging(log_level)
    if not is_valid_id(id):
        raise _fail(f"--id {id!r} must match [A-Za-z0-9._-]{{1,128}}")
    url = _broker_url(broker, "--broker")

    async def main(stop: asyncio.Event) -> None:
        await run_leaf(id, url, interval, stop, Topics(prefix))

    _run(main)


@app.command()
def relay(
    id: Annotated[str, typer.Option("--id", help="This relay's id.", envvar="RELAYBEAT_ID")],
    local: Annotated[
        str, typer.Option(help="Broker the leaves beat to (mqtt://...), or 'embedded' to run one here.")
    ] = "embedded",
    upstream: Annotated[str, typer.Option(help="Broker the monitor listens on.", envvar="RELAYBEAT_UPSTREAM")] = (
        "mqtt://127.0.0.1:1883"
    ),
    flush: Annotated[float, typer.Option(help="Seconds between bundles.", min=0.01)] = 1.0,
    serve: Annotated[str, typer.Option(help="With --local embedded: HOST:PORT of the embedded broker.")] = (
        "127.0.0.1:1884"
    ),
    default_interval: Annotated[float, typer.Option(help="Interval assumed for beats that declare none.")] = (
        DEFAULT_INTERVAL_S
    ),
    children: Annotated[
        bool | None, typer.Option("--children/--no-children", help="Fold child relays' bundles (default: auto).")
    ] = None,
    prefix: Prefix = DEFAULT_PREFIX,
    log_level: LogLevel = "info",
) -> None:
    """Subscribe to beats on the local broker and publish one bundle per flush upstream."""
    from relay.service import RelayService, RelaySettings

    _logging(log_level)
    upstream_url = _broker_url(upstream, "--upstream")

    async def main(stop: asyncio.Event) -> None:
        from contextlib import AsyncExitStack

        async with AsyncExitStack() as stack:
            if local == "embedded":
                from relay.broker import BrokerSettings, EmbeddedBroker

                host, port = _hostport(serve, "--serve")
                embedded = await stack.enter_async_context(EmbeddedBroker(BrokerSettings(host=host, port=port)))
                local_url = BrokerURL.parse(embedded.url)
                logging.getLogger("relaybeat").info("relay %s: leaves beat to %s", id, embedded.url)
            else:
                local_url = _broker_url(local, "--local")
            try:
                settings = RelaySettings(id, local_url, upstream_url, flush, default_interval, prefix,
                                         accept_children=children)  # fmt: skip
            except ValueError as exc:
                raise _fail(str(exc)) from None
            service = RelayService(settings)
            task = asyncio.create_task(service.run())
            await stop.wait()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    _run(main)


@app.command()
def monitor(
    broker: Annotated[
        str | None, typer.Option(help="Broker the relays publish bundles to.", envvar="RELAYBEAT_BROKER")
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
    config: Annotated[
        Path | None, typer.Option(help="Deployment file (TOML), see relaybeat.example.toml.", envvar="RELAYBEAT_CONFIG")
    ] = None,
    prefix: Annotated[str | None, typer.Option(envvar="RELAYBEAT_PREFIX", help="Topic prefix, ending in '/'.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Decide every host's and relay's state, store transitions, serve the HTTP API (/docs)."""
    from relaybeat.config import ConfigError, load_config
    from relaybeat.serve import serve_monitor

    _logging(log_level)
    try:
        file = load_config(config)
        given = {"broker": broker, "db": db, "listen": listen, "prefix": prefix, "client_id": client_id}
        settings_file = file.monitor.model_copy(update={k: v for k, v in given.items() if v is not None})
        tuning = {"misses": misses, "default_interval_s": default_interval, "adaptive": adaptive, "phi_threshold": phi}
        detector = file.detector.model_validate(
            file.detector.model_dump() | {k: v for k, v in tuning.items() if v is not None}
        )
        policy = detector.policy()
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    url = _broker_url(settings_file.broker, "--broker")
    host, port = _hostport(settings_file.listen, "--listen")
    settings = MonitorSettings(
        url, policy, settings_file.prefix, settings_file.client_id, settings_file.accept_direct_beats
    )
    _run(lambda stop: serve_monitor(settings, settings_file.db, host, port, stop))


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
    typer.echo(f"{db}: schema up to date")


@db_app.command("downgrade")
def db_downgrade(
    db: Annotated[str, typer.Option(help="SQLAlchemy URL.", envvar="RELAYBEAT_DB")] = DEFAULT_DB,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "base",
) -> None:
    """Revert migrations down to REVISION (default: everything)."""
    downgrade_sync(db, revision)
    typer.echo(f"{db}: downgraded to {revision}")


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
    from relay.broker import main as broker_main

    raise typer.Exit(broker_main(["add-user", str(password_file), username]))


people.register(app)  # status, history, watch: for people at a terminal
