"""Persistence: transition history and current host/relay state, on SQLite or PostgreSQL.

Rules: the store decides nothing, it only moves rows. Every datetime going in must be aware and
every datetime coming out is aware UTC. `write` is one transaction. The schema is owned by the
Alembic migrations in `migrations/` and applied through the store's own connection (`upgrade`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    ColumnElement,
    Connection,
    Executable,
    bindparam,
    delete,
    event,
    func,
    insert,
    literal,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert
from typing_extensions import Unpack

from relaybeat import migrations
from relaybeat.errors import RelaybeatError, SettingsError, Unavailable
from relaybeat.monitor.maintenance import TargetKind, Window
from relaybeat.monitor.notify import Alert, AlertKey, NoticeType
from relaybeat.monitor.records import DetectionRow, FalseAlarmRow, HostRow, RelayRow, TransitionRow
from relaybeat.monitor.records import require_aware as _require_aware
from relaybeat.monitor.states import Event, Kind, State
from relaybeat.monitor.tables import (
    AcknowledgementModel,
    AlertModel,
    Base,
    DetectionModel,
    FalseAlarmModel,
    HostModel,
    LeaseModel,
    MaintenanceModel,
    NodeModel,
    OutboxModel,
    RelayModel,
    TransitionModel,
)

__all__ = [
    "WRITE_STEP",
    "Acknowledgement",
    "Batch",
    "Fence",
    "HostRow",
    "LeaseView",
    "NewMessage",
    "NodeView",
    "NotActive",
    "OutboxRow",
    "RelayRow",
    "Store",
    "TransitionRow",
    "alembic_config",
    "async_url",
    "downgrade_sync",
    "pending_model_changes",
    "upgrade_sync",
]

MIGRATIONS_DIR = Path(migrations.__file__).parent

# Key of the PostgreSQL advisory lock held while migrating ("relaybea" as a signed bigint).
MIGRATION_LOCK_KEY = 0x72656C6179626561

# Execution option read by the SQLite "begin" hook: which BEGIN to emit. Writers use IMMEDIATE so
# they take the write lock up front (and wait busy_timeout for it) instead of failing mid-way.
_BEGIN_OPTION = "relaybeat_sqlite_begin"

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+psycopg_async",
    "postgresql": "postgresql+psycopg_async",
    "postgresql+psycopg": "postgresql+psycopg_async",
    "postgresql+psycopg2": "postgresql+psycopg_async",
    "postgresql+psycopg_async": "postgresql+psycopg_async",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """An operator's note on an outage. `transition_id` is the row that started it (None: not yet written)."""

    id: int
    kind: Kind
    subject: str
    transition_id: int | None
    comment: str
    acknowledged_at: datetime
    by: str


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A webhook message to queue in the outbox; `body` is the exact JSON to send."""

    target: str
    key: str
    type: NoticeType
    incident: str
    body: str
    created_at: datetime  # also its first attempt's time

    def __post_init__(self) -> None:
        _require_aware("created_at", self.created_at)


_Row = TypeVar("_Row", bound=TransitionRow, covariant=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Batch(Generic[_Row]):
    """What one `Store.write` transaction holds: history rows to append and the current-state rows
    they leave; webhook `messages` to queue with the alerts they open or close; the quality rows
    (`detections`, `false_alarms`), linked by key to their transitions (written now or before).
    The monitor's batches carry `Change`s (`Batch[Change]`), whose paths plan the notifications."""

    transitions: Sequence[_Row] = ()
    hosts: Sequence[HostRow] = ()
    relays: Sequence[RelayRow] = ()
    messages: Sequence[NewMessage] = ()
    opened: Sequence[Alert] = ()
    closed: Sequence[AlertKey] = ()
    detections: Sequence[DetectionRow] = ()
    false_alarms: Sequence[FalseAlarmRow] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A queued webhook message. Pending while both `delivered_at` and `abandoned_at` are None."""

    id: int
    target: str
    key: str
    type: NoticeType
    incident: str
    body: str
    created_at: datetime
    next_attempt_at: datetime
    attempts: int
    delivered_at: datetime | None
    abandoned_at: datetime | None
    last_error: str | None


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached or used at start: down, refused, missing, not a database."""


def shown_url(url: str) -> str:
    """A database URL fit for a terminal or a log: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the database"


_DATABASE_HINTS = (  # (what the driver says, what to do); the first match wins
    ("does not exist", "create it (`createdb {database}`) or fix the name in --db / RELAYBEAT_DB"),
    ("connection refused", "is the database server running on that host and port?"),
    ("could not translate host name", "the host name is unknown: fix it in --db / RELAYBEAT_DB"),
    ("name or service not known", "the host name is unknown: fix it in --db / RELAYBEAT_DB"),
    ("password authentication failed", "wrong user or password in --db / RELAYBEAT_DB"),
    ("no password supplied", "give the password in the URL (postgresql://USER:PASSWORD@HOST/DB) or in ~/.pgpass"),
    ("unable to open database file", "check that the file can be created and written there"),
    ("file is not a database", "that file is not a SQLite database: point --db at another file"),
)


def database_error(exc: DBAPIError | OSError, url: str) -> DatabaseUnavailable:
    """A driver's error while opening or migrating `url`, as one line that says what to do (never the password)."""
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()  # the first line: the drivers' own hints follow it
    said = " ".join(lines[0].split()) if lines else type(original).__name__
    said = said.removeprefix("connection failed: ")
    hint = next((what for needle, what in _DATABASE_HINTS if needle in said.lower()), "check --db / RELAYBEAT_DB")
    parsed = make_url(url) if "://" in url else None
    if parsed is not None and parsed.password:
        said = said.replace(str(parsed.password), "***")
    hint = hint.format(database=(parsed and parsed.database) or "NAME")
    return DatabaseUnavailable(f"cannot use the database {shown_url(url)}: {said[:300]}; {hint}")


LEASE_NAME = "monitor"  # the one row of `monitor_lease`


class NotActive(RelaybeatError):
    """A write refused because this monitor does not hold the lease (a standby, or an active that lost
    it): the transaction is rolled back, nothing of it is stored."""


@dataclass(frozen=True, slots=True)
class Fence:
    """What every write checks in its own transaction: that `node` (this process: `token`) still holds
    the lease under `epoch`. `epoch` None: a standby, which writes nothing. `failover_s`: how long
    such a transaction may sit idle before the database ends it (`_bound_idle_transaction`)."""

    node: str
    token: str
    epoch: int | None
    failover_s: float


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The lease after one `lease_tick`: who holds it, under which epoch, until when (database time)."""

    mine: bool  # this process holds it (renewed or just acquired)
    acquired: bool  # ... and it was taken just now (a new epoch)
    holder: str | None
    epoch: int
    renewed_at: datetime | None
    expires_at: datetime | None
    previous_holder: str | None  # when `acquired`: who held it before (None: nobody ever)
    holder_api: str | None  # where the holder's HTTP API listens, as it reported


@dataclass(frozen=True, slots=True)
class NodeView:
    """A monitor as it last reported itself (`monitor_nodes`), with the lease's view of it."""

    node: str
    role: str
    epoch: int | None
    api: str | None
    started_at: datetime
    last_seen: datetime
    holds_lease: bool


def async_url(url: str) -> str:
    """The async-driver form of a database URL: aiosqlite for SQLite, psycopg for PostgreSQL.

    'sqlite:///x.db' -> 'sqlite+aiosqlite:///x.db'; 'postgresql://u@h/db' and
    'postgresql+psycopg://u@h/db' -> 'postgresql+psycopg_async://u@h/db'. Async URLs pass through.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        msg = "not a database URL: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        raise SettingsError(msg) from None
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        msg = (
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
        )
        raise SettingsError(msg)
    return parsed.set(drivername=driver).render_as_string(hide_password=False)


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """Alembic configuration built in code (there is no alembic.ini), for `alembic.command.*`.

    Pass `connection` to migrate inside the caller's transaction, or `url` for everything else,
    e.g. `command.revision(alembic_config(url), autogenerate=True, rev_id="0002", message="...")`.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migration_revisions() -> list[str]:
    """The revisions this code ships, oldest first ("0001", ...)."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_begin) so DDL and reads are transactional too.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql(connection.get_execution_options().get(_BEGIN_OPTION, "BEGIN"))


def _create_engine(url: str) -> AsyncEngine:
    parsed = make_url(async_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:" and not parsed.query.get("uri"):
            directory = Path(path).absolute().parent
            if not directory.is_dir():
                msg = f"cannot create the SQLite database {path}: no directory {directory}"
                raise SettingsError(msg)
        engine = create_async_engine(parsed)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(parsed, pool_pre_ping=True)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_PING_SQL = f"SELECT max(id) FROM {TransitionModel.__tablename__}"  # noqa: S608 - a constant name


def _values(row: Any) -> dict[str, Any]:
    names = _FIELD_NAMES.get(type(row))
    if names is None:
        names = _FIELD_NAMES[type(row)] = tuple(field.name for field in fields(row))
    return {name: getattr(row, name) for name in names}


_R = TypeVar("_R", HostRow, RelayRow)
_I = TypeVar("_I")
_ID = operator.attrgetter("id")


Bound = Callable[[datetime], ColumnElement[bool]]  # a condition on a moment, e.g. `lambda m: t.at >= m`


def _at(column: Any) -> tuple[Bound, Bound]:
    """The window of rows that happened at one moment (`column`): at or after `since`, before `until`."""
    return (lambda moment: column >= moment, lambda moment: column < moment)


class Matching(TypedDict, total=False):
    """The filters of the queries for rows of subjects over time: one kind, one subject, a time
    window from `since` to `until`. A filter not given (or None) does not filter."""

    kind: Kind | None
    subject: str | None
    since: datetime | None
    until: datetime | None


def _matching(subjects: Any, matching: Matching, window: tuple[Bound, Bound]) -> list[ColumnElement[bool]]:
    """The conditions of a query for the rows `matching` asks for (`subjects`: the model with `kind`
    and `subject` columns); `window` says what "after `since`" and "before `until`" mean for these
    rows. Each only if its filter is given (not None); the moments must be aware."""
    kind, subject = matching.get("kind"), matching.get("subject")
    since, until = matching.get("since"), matching.get("until")
    _require_aware("since", since)
    _require_aware("until", until)
    conditions = []
    if kind is not None:
        conditions.append(subjects.kind == kind)
    if subject is not None:
        conditions.append(subjects.subject == subject)
    for moment, bound in ((since, window[0]), (until, window[1])):
        if moment is not None:
            conditions.append(bound(moment))
    return conditions


def _appended(row: TransitionRow) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _APPENDED_FIELDS}


async def _last_by_id(rows: Sequence[_R]) -> Iterator[_R]:
    """One row per id (the last one wins), in id order so concurrent writers lock in one order.

    Done a step at a time, the event loop free between steps: rows by id, then sorted runs of ids,
    merged lazily as the rows are written (one sort of a relay death's 50,000 hosts takes 70 ms)."""
    by_id: dict[str, _R] = {}
    for start in range(0, len(rows), WRITE_STEP):
        if start:
            await asyncio.sleep(0)
        chunk = rows[start : start + WRITE_STEP]
        by_id.update(zip(map(_ID, chunk), chunk, strict=True))
    ids = list(by_id)
    runs = []
    for start in range(0, len(ids), WRITE_STEP):
        if start:
            await asyncio.sleep(0)
        runs.append(sorted(ids[start : start + WRITE_STEP]))
    return map(by_id.__getitem__, heapq.merge(*runs))


def _compare(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


# Rows per statement of a write, and per step of the writer's other work on a batch: building and
# binding 100 rows holds the event loop 2-4 ms (SQLite, PostgreSQL: `python -m bench persist
# --holds-only`), and it runs other work between steps (the issue: no hold over 5 ms). 200 held it
# 3.6-4.7 ms; each step costs the driver a round trip, so a 50,000-row batch takes longer in all.
WRITE_STEP = 100
# The checkpoint's rows per statement: plain tuples, built in ~0.5 ms a step (its SQL runs in the
# driver's thread on SQLite, in the server on PostgreSQL).
CHECKPOINT_STEP = 1000
_SQLITE_LAST_SEEN = "UPDATE hosts SET last_seen = ?, seq = ? WHERE id = ?"
_UNNESTED_LAST_SEEN = text(
    "UPDATE hosts SET last_seen = v.seen, seq = v.seq "
    "FROM unnest(CAST(:ids AS text[]), CAST(:seen AS timestamptz[]), CAST(:seqs AS bigint[])) AS v(id, seen, seq) "
    "WHERE hosts.id = v.id"
)


def _aware_text(moment: datetime) -> str:
    """An aware moment in ISO 8601, its offset included (PostgreSQL reads it into `timestamptz`)."""
    if moment.utcoffset() is None:
        _require_aware("last_seen", moment)
    return moment.isoformat()


def _sqlite_time(moment: datetime) -> str:
    """What `UTCDateTime` stores on SQLite (naive UTC in SQLAlchemy's fixed-width text,
    `2026-12-04 18:53:42.000123`), written without its bind processors."""
    if moment.tzinfo is not UTC:
        _require_aware("last_seen", moment)
        moment = moment.astimezone(UTC)
    return moment.isoformat(" ", "microseconds")[:26]


_KEYS_PER_QUERY = 500  # bound parameters per `stored_keys` query (SQLite allows 32766, older builds 999)

_HOST_COLUMNS = [getattr(HostModel, field.name) for field in fields(HostRow)]
_RELAY_COLUMNS = [getattr(RelayModel, field.name) for field in fields(RelayRow)]
_TRANSITION_FIELDS = tuple(field.name for field in fields(TransitionRow))
_TRANSITION_COLUMNS = [getattr(TransitionModel, name) for name in _TRANSITION_FIELDS]
_APPENDED_FIELDS = tuple(name for name in _TRANSITION_FIELDS if name != "id")  # the database assigns ids
_WINDOW_COLUMNS = [getattr(MaintenanceModel, field.name) for field in fields(Window)]
_ACK_COLUMNS = [getattr(AcknowledgementModel, field.name) for field in fields(Acknowledgement)]
_OUTBOX_COLUMNS = [getattr(OutboxModel, field.name) for field in fields(OutboxRow)]
_ALERT_COLUMNS = [getattr(AlertModel, field.name) for field in fields(Alert)]
_DETECTION_FIELDS = tuple(f.name for f in fields(DetectionRow) if f.name not in ("key", "transition_id", "at"))
_DETECTION_COLUMNS = [getattr(DetectionModel, name) for name in (*_DETECTION_FIELDS, "transition_id")]
_FALSE_ALARM_FIELDS = tuple(
    f.name for f in fields(FalseAlarmRow) if f.name not in ("id", "opened_key", "closed_key", "opened_id", "closed_id")
)
_FALSE_ALARM_COLUMNS = [
    getattr(FalseAlarmModel, name) for name in (*_FALSE_ALARM_FIELDS, "id", "opened_id", "closed_id")
]


class HistoryFilters(Matching, total=False):
    """`Store.history`'s filters, for code that passes them on."""

    after_id: int | None
    limit: int
    newest_first: bool


class Store:
    """An open database. Create with `await Store.open(url)`, finish with `await store.close()`."""

    def __init__(self, engine: AsyncEngine, url: str = "") -> None:
        self._engine = engine
        self._url = url
        self._writer = engine.execution_options(**{_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        # With hot standbys (PostgreSQL): every write checks this in its transaction. None: no lease.
        self.fence: Fence | None = None
        self._pinger: AsyncConnection | None = None  # the connection `ping` keeps (None: not open, or dropped)
        self._dropping: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; with a fence, it first checks (and share-locks) the lease row, so a
        takeover waits for it and a monitor that lost the lease writes nothing (`NotActive`)."""
        fence = self.fence
        if fence is not None and fence.epoch is None:
            msg = f"monitor {fence.node} is a standby: it writes nothing"
            raise NotActive(msg)
        async with self._writer.begin() as connection:
            if fence is not None:
                await _bound_idle_transaction(connection, fence.failover_s)
                lease = LeaseModel
                held = await connection.scalar(
                    select(lease.epoch)
                    .where(
                        lease.name == LEASE_NAME,
                        lease.holder == fence.node,
                        lease.token == fence.token,
                        lease.epoch == fence.epoch,
                        lease.expires_at > func.now(),
                    )
                    .with_for_update(read=True)
                )
                if held is None:
                    msg = f"monitor {fence.node} no longer holds the lease (epoch {fence.epoch}): write refused"
                    raise NotActive(msg)
            yield connection

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect (once, so a wrong URL or a server that is down fails here) and return the store."""
        engine = _create_engine(url)
        try:
            async with engine.connect():
                pass
        except (DBAPIError, OSError) as exc:
            await engine.dispose()
            raise database_error(exc, url) from exc
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, url)

    @property
    def dialect(self) -> str:
        """'sqlite' or 'postgresql'."""
        return self._engine.dialect.name

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite database's file (None for PostgreSQL or an in-memory database)."""
        url = self._engine.url
        if self.dialect != "sqlite" or url.query.get("mode") == "memory" or url.query.get("uri"):
            return None
        return url.database if url.database not in (None, "", ":memory:") else None

    async def close(self) -> None:
        held, self._pinger = self._pinger, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held.invalidate()  # never back into the pool: its driver state is the ping's
                await held.close()
        await asyncio.gather(*self._dropping, return_exceptions=True)
        await self._engine.dispose()

    async def ping(self) -> None:
        """Prove the database answers: the newest history row's id read on a connection kept for this,
        straight through the driver (one call to aiosqlite's thread, or one round trip to PostgreSQL),
        without a pool checkout, pre-ping or transaction of SQLAlchemy's: a few hundredths of a
        millisecond of CPU instead of ~1 ms, for the monitor's probe every few seconds. Raises what
        the driver raises (or the connect); a connection that failed, or whose call was cancelled,
        is dropped and the next ping connects anew."""
        held = self._pinger
        try:
            fresh = held is None
            if held is None:
                held = self._pinger = await self._engine.connect()
            driver: Any = (await held.get_raw_connection()).driver_connection
            if self.dialect == "sqlite":
                await driver.execute_fetchall(_PING_SQL)  # autocommit (isolation_level None): no transaction
            else:
                if fresh:  # one round trip a ping: no transaction to end after it
                    await driver.set_autocommit(True)
                await driver.execute(_PING_SQL)
        except BaseException:
            self._drop_pinger()
            raise

    def _drop_pinger(self) -> None:
        """Forget the ping's connection; close it in the background (a hung server must not hold the probe)."""
        held, self._pinger = self._pinger, None
        if held is None:
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await held.invalidate()  # never back into the pool: its driver state is the ping's

        task = asyncio.get_running_loop().create_task(close())
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _migrate(self, action: Callable[[Config], None]) -> None:
        try:
            await self._migrate_once(action)
        except CommandError as exc:  # e.g. an unknown revision, or a database migrated by a newer relaybeat
            known = ", ".join(["base", *migration_revisions()])
            msg = f"{' '.join(str(exc).split())} (this relaybeat knows the revisions {known})"
            raise SettingsError(msg) from exc
        except DBAPIError as exc:
            raise database_error(exc, self._url) from exc

    async def _migrate_once(self, action: Callable[[Config], None]) -> None:
        async with self._writer.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Concurrent starts queue here; the later ones then find the schema at head. (On
                # SQLite, BEGIN IMMEDIATE does the same.) Taking the lock before Alembic runs also
                # matters in-process: Alembic's `context`/`op` proxies are process-global.
                await connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            await connection.run_sync(lambda sync: action(alembic_config(connection=sync)))

    async def upgrade(self) -> None:
        """Apply all migrations (`alembic upgrade head`) in one transaction on this connection."""
        await self._migrate(lambda config: command.upgrade(config, "head"))

    async def downgrade(self, revision: str = "base") -> None:
        """Revert migrations down to `revision` ("base" drops every table)."""
        await self._migrate(lambda config: command.downgrade(config, revision))

    async def model_changes(self) -> list[Any]:
        """Differences between the models and the database schema; empty when they match."""
        async with self._engine.connect() as connection:
            return await connection.run_sync(_compare)

    def _insert(self, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(model) if self.dialect == "postgresql" else sqlite.insert(model)

    def _upsert(self, model: type[HostModel] | type[RelayModel]) -> Insert:
        table = model.__table__
        statement = self._insert(model)
        update = {column.name: statement.excluded[column.name] for column in table.c if column.name != "id"}
        return statement.on_conflict_do_update(index_elements=[table.c.id], set_=update)

    def _append_transitions(self) -> Insert:
        """Insert history rows; one whose key is already stored is skipped (a replayed decision)."""
        return self._insert(TransitionModel).on_conflict_do_nothing(index_elements=[TransitionModel.key])

    async def write(self, batch: Batch[TransitionRow]) -> None:
        """In one transaction: append the batch's transitions and insert-or-replace its current-state
        rows; queue its webhook messages and insert-or-replace (`opened`) or delete (`closed`) alerts;
        record its detections and false alarms.

        A transition whose `key` is already stored is skipped, so writing a batch again is harmless.
        If an id appears more than once in `hosts` or `relays`, the last row wins. Rows go WRITE_STEP
        at a time, the event loop free between steps (the transaction stays one).
        """
        if batch.empty:
            return
        now = datetime.now(UTC)

        def stamped(row: HostRow | RelayRow) -> dict[str, Any]:
            return _values(row) | {"updated_at": now}

        hosts, relays = await _last_by_id(batch.hosts), await _last_by_id(batch.relays)
        async with self._writing() as connection:
            await _execute_in_steps(connection, self._append_transitions(), batch.transitions, _appended)
            await _execute_in_steps(connection, self._upsert(HostModel), hosts, stamped)
            await _execute_in_steps(connection, self._upsert(RelayModel), relays, stamped)
            await _write_notifications(connection, batch.messages, batch.opened, batch.closed)
            if batch.detections or batch.false_alarms:
                await self._write_quality(connection, batch.detections, batch.false_alarms)

    async def _write_quality(
        self, connection: AsyncConnection, detections: Sequence[DetectionRow], false_alarms: Sequence[FalseAlarmRow]
    ) -> None:
        keys = {d.key for d in detections} | {k for f in false_alarms for k in (f.opened_key, f.closed_key)}
        ids = await _ids_of(connection, [k for k in keys if k is not None])
        statement = self._insert(DetectionModel).on_conflict_do_nothing(index_elements=[DetectionModel.transition_id])
        await _execute_in_steps(
            connection,
            statement,
            [d for d in detections if d.key in ids],
            lambda d: {name: getattr(d, name) for name in _DETECTION_FIELDS} | {"transition_id": ids[d.key or ""]},
        )
        statement = self._insert(FalseAlarmModel).on_conflict_do_nothing(index_elements=[FalseAlarmModel.opened_id])
        await _execute_in_steps(
            connection,
            statement,
            false_alarms,
            lambda f: (
                {name: getattr(f, name) for name in _FALSE_ALARM_FIELDS}
                | {"opened_id": ids.get(f.opened_key or ""), "closed_id": ids.get(f.closed_key or "")}
            ),
        )

    async def false_alarms(self, **matching: Unpack[Matching]) -> list[FalseAlarmRow]:
        """False alarms overlapping `[since, until)` (of one kind, one subject), oldest first."""
        f = FalseAlarmModel
        overlapping = (lambda moment: f.closed_at > moment, lambda moment: f.opened_at < moment)
        conditions = _matching(f, matching, overlapping)
        query = select(*_FALSE_ALARM_COLUMNS).where(*conditions).order_by(f.opened_at, f.id)
        async with self._engine.connect() as connection:
            return [FalseAlarmRow(**row._asdict()) for row in await connection.execute(query)]

    async def detections(self, **matching: Unpack[Matching]) -> list[DetectionRow]:
        """Outages opened in `[since, until)` as decided (by the transition's time), oldest first."""
        d, t = DetectionModel, TransitionModel
        conditions = _matching(d, matching, _at(t.at))
        query = select(*_DETECTION_COLUMNS, t.key, t.at).where(t.id == d.transition_id, *conditions)
        query = query.order_by(t.at, t.id)
        async with self._engine.connect() as connection:
            return [DetectionRow(**row._asdict()) for row in await connection.execute(query)]

    async def save_last_seen(self, hosts: Sequence[tuple[str, datetime, int | None]]) -> None:
        """The restart checkpoint: `(id, last_seen, seq)` of hosts that already have a row; states are
        only ever written with their transitions. Every host, every `checkpoint_s`: so it skips the
        ORM's per-row work (about 12-21 us a host, a third of a core at 1M hosts every 60 s), in steps
        of CHECKPOINT_STEP rows: one executemany of plain tuples on SQLite, one UPDATE over `unnest`ed
        arrays on PostgreSQL. A naive time fails the transaction: nothing is saved."""
        if not hosts:
            return
        async with self._writing() as connection:
            for start in range(0, len(hosts), CHECKPOINT_STEP):
                step = hosts[start : start + CHECKPOINT_STEP]
                if self.dialect == "sqlite":
                    rows = [(_sqlite_time(seen), seq, host_id) for host_id, seen, seq in step]
                    await connection.exec_driver_sql(_SQLITE_LAST_SEEN, rows)
                else:
                    seen_at = [_aware_text(seen) for _, seen, _ in step]  # text: psycopg dumps it fastest
                    columns = {"ids": [h[0] for h in step], "seen": seen_at, "seqs": [h[2] for h in step]}
                    await connection.execute(_UNNESTED_LAST_SEEN, columns)
                await asyncio.sleep(0)  # the driver may answer without yielding: let the loop run anyway

    async def forget_host(self, host_id: str) -> bool:
        """Delete a host's current-state row (its history stays). False if there was none."""
        async with self._writing() as connection:
            result = await connection.execute(delete(HostModel).where(HostModel.id == host_id))
            return result.rowcount > 0

    async def load(self) -> tuple[list[HostRow], list[RelayRow]]:
        """Every current-state row, each list sorted by id."""
        async with self._engine.connect() as connection:
            hosts = await connection.execute(select(*_HOST_COLUMNS).order_by(HostModel.id))
            relays = await connection.execute(select(*_RELAY_COLUMNS).order_by(RelayModel.id))
            return [HostRow(**row._asdict()) for row in hosts], [RelayRow(**row._asdict()) for row in relays]

    async def stored_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` the history already holds (asked in chunks the drivers accept)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        async with self._engine.connect() as connection:
            for start in range(0, len(wanted), _KEYS_PER_QUERY):
                chunk = wanted[start : start + _KEYS_PER_QUERY]
                result = await connection.execute(select(TransitionModel.key).where(TransitionModel.key.in_(chunk)))
                found.update(key for key in result.scalars() if key is not None)
        return found

    async def last_transition_id(self) -> int:
        """The id of the newest history row, or 0 when there is none."""
        async with self._engine.connect() as connection:
            newest = await connection.scalar(select(func.coalesce(func.max(TransitionModel.id), 0)))
            return int(newest or 0)

    async def history(
        self,
        *,
        after_id: int | None = None,
        limit: int = 100,
        newest_first: bool = True,
        **matching: Unpack[Matching],
    ) -> list[TransitionRow]:
        """History rows matching every filter given, at most `limit`, ordered by id.

        `since` is inclusive (at >= since), `until` exclusive (at < until), `after_id` exclusive
        (id > after_id: pass the last id seen, with `newest_first=False`, to resume). Ids follow
        write order, so "newest first" means highest id first.
        """
        if limit < 1:
            msg = f"limit must be at least 1, got {limit}"
            raise ValueError(msg)
        t = TransitionModel
        conditions = _matching(t, matching, _at(t.at))
        if after_id is not None:
            conditions.append(TransitionModel.id > after_id)
        order = TransitionModel.id.desc() if newest_first else TransitionModel.id.asc()
        query = select(*_TRANSITION_COLUMNS).where(*conditions).order_by(order).limit(limit)
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [TransitionRow(**row._asdict()) for row in result]

    # --- state changes over time (availability) ---

    async def state_changes(
        self, kind: Kind, since: datetime, until: datetime, subject: str | None = None
    ) -> tuple[dict[str, State], list[tuple[str, datetime, State]]]:
        """What availability reports are computed from: each subject's state at `since` (from its
        last state change at or before it) and its state changes in `(since, until)`, as
        `(subject, at, new state)` in (at, id) order. Only `event = 'transition'` rows change states.
        """
        _require_aware("since", since)
        _require_aware("until", until)
        t = TransitionModel
        mine: list[ColumnElement[bool]] = [t.kind == kind, t.event == Event.TRANSITION]
        if subject is not None:
            mine.append(t.subject == subject)
        newest_first = func.row_number().over(partition_by=t.subject, order_by=(t.at.desc(), t.id.desc()))
        ranked = select(t.subject, t.to_state, newest_first.label("n")).where(*mine, t.at <= since).subquery()
        changes = select(t.subject, t.at, t.to_state).where(*mine, t.at > since, t.at < until).order_by(t.at, t.id)
        async with self._engine.connect() as connection:
            initial = await connection.execute(select(ranked.c.subject, ranked.c.to_state).where(ranked.c.n == 1))
            later = await connection.execute(changes)
            return {row[0]: row[1] for row in initial}, [(row[0], row[1], row[2]) for row in later]

    async def latest_changes(self, kind: Kind, subjects: Sequence[str] | None = None) -> dict[str, TransitionRow]:
        """Each subject's newest state change (`event = 'transition'`): the row that began its state."""
        t = TransitionModel
        mine: list[ColumnElement[bool]] = [t.kind == kind, t.event == Event.TRANSITION]
        if subjects is not None:
            mine.append(t.subject.in_(subjects))
        newest = select(func.max(t.id)).where(*mine).group_by(t.subject).scalar_subquery()
        async with self._engine.connect() as connection:
            result = await connection.execute(select(*_TRANSITION_COLUMNS).where(t.id.in_(newest)))
            return {record.subject: record for record in (TransitionRow(**row._asdict()) for row in result)}

    # --- maintenance windows ---

    async def add_maintenance(
        self,
        target_kind: TargetKind,
        target: str,
        starts_at: datetime,
        ends_at: datetime | None,
        reason: str,
        created_at: datetime,
    ) -> Window:
        for name, moment in (("starts_at", starts_at), ("ends_at", ends_at), ("created_at", created_at)):
            _require_aware(name, moment)
        values = {
            "target_kind": target_kind,
            "target": target,
            "starts_at": starts_at,
            "ends_at": ends_at,
            "reason": reason,
            "created_at": created_at,
        }
        return Window(**await self._insert_returning(MaintenanceModel, values, _WINDOW_COLUMNS))

    async def _insert_returning(
        self, model: type[Base], values: dict[str, Any], columns: Sequence[Any]
    ) -> dict[str, Any]:
        """Insert one row (a fenced write); its `columns` as written (ids and defaults filled in), by name."""
        async with self._writing() as connection:
            result = await connection.execute(insert(model).values(values).returning(*columns))
            return result.one()._asdict()

    async def remove_maintenance(self, window_id: int, at: datetime) -> Window | None:
        """Mark a window removed from `at` on (the row stays); None if absent or already removed."""
        _require_aware("at", at)
        m = MaintenanceModel
        statement = (
            update(m).where(m.id == window_id, m.removed_at.is_(None)).values(removed_at=at).returning(*_WINDOW_COLUMNS)
        )
        async with self._writing() as connection:
            row = (await connection.execute(statement)).one_or_none()
            return None if row is None else Window(**row._asdict())

    async def maintenance_windows(self) -> list[Window]:
        """Every maintenance window, removed ones included, by id."""
        async with self._engine.connect() as connection:
            result = await connection.execute(select(*_WINDOW_COLUMNS).order_by(MaintenanceModel.id))
            return [Window(**row._asdict()) for row in result]

    # --- acknowledgements ---

    async def acknowledge(
        self, kind: Kind, subject: str, transition_id: int | None, comment: str, at: datetime, by: str
    ) -> Acknowledgement:
        _require_aware("at", at)
        values = {
            "kind": kind,
            "subject": subject,
            "transition_id": transition_id,
            "comment": comment,
            "acknowledged_at": at,
            "by": by,
        }
        return Acknowledgement(**await self._insert_returning(AcknowledgementModel, values, _ACK_COLUMNS))

    async def acknowledgements(
        self, kind: Kind | None = None, subject: str | None = None, limit: int = 100
    ) -> list[Acknowledgement]:
        """Acknowledgements matching the filters, newest first."""
        if limit < 1:
            msg = f"limit must be at least 1, got {limit}"
            raise ValueError(msg)
        a = AcknowledgementModel
        conditions: list[ColumnElement[bool]] = []
        if kind is not None:
            conditions.append(a.kind == kind)
        if subject is not None:
            conditions.append(a.subject == subject)
        query = select(*_ACK_COLUMNS).where(*conditions).order_by(a.id.desc()).limit(limit)
        async with self._engine.connect() as connection:
            return [Acknowledgement(**row._asdict()) for row in await connection.execute(query)]

    # --- notifications: the outbox and what each target has been told ---

    async def alerts(self) -> list[Alert]:
        """Every open alert, by (target, kind, subject)."""
        a = AlertModel
        async with self._engine.connect() as connection:
            result = await connection.execute(select(*_ALERT_COLUMNS).order_by(a.target, a.kind, a.subject))
            return [Alert(**row._asdict()) for row in result]

    async def outbox(self, target: str | None = None, pending: bool = False, limit: int = 1000) -> list[OutboxRow]:
        """Queued messages (of one target; only the pending ones), oldest first."""
        o = OutboxModel
        conditions: list[ColumnElement[bool]] = []
        if target is not None:
            conditions.append(o.target == target)
        if pending:
            conditions += [o.delivered_at.is_(None), o.abandoned_at.is_(None)]
        query = select(*_OUTBOX_COLUMNS).where(*conditions).order_by(o.id).limit(limit)
        async with self._engine.connect() as connection:
            return [OutboxRow(**row._asdict()) for row in await connection.execute(query)]

    async def outbox_targets(self) -> dict[str, int]:
        """Pending messages per target."""
        o = OutboxModel
        query = (
            select(o.target, func.count()).where(o.delivered_at.is_(None), o.abandoned_at.is_(None)).group_by(o.target)
        )
        async with self._engine.connect() as connection:
            return {row[0]: int(row[1]) for row in await connection.execute(query)}

    async def outbox_delivered(self, message_id: int, at: datetime, attempts: int) -> None:
        _require_aware("at", at)
        await self._outbox_settle(message_id, delivered_at=at, attempts=attempts, last_error=None)

    async def outbox_failed(self, message_id: int, attempts: int, next_attempt_at: datetime, error: str) -> None:
        _require_aware("next_attempt_at", next_attempt_at)
        await self._outbox_settle(message_id, attempts=attempts, next_attempt_at=next_attempt_at, last_error=error)

    async def outbox_abandoned(self, message_id: int, at: datetime, attempts: int, error: str) -> None:
        _require_aware("at", at)
        await self._outbox_settle(message_id, abandoned_at=at, attempts=attempts, last_error=error)

    async def _outbox_settle(self, message_id: int, **values: Any) -> None:
        """Record an attempt's outcome on a message not yet delivered (a delivered one never changes)."""
        o = OutboxModel
        statement = (
            update(o)
            .where(o.id == message_id, o.delivered_at.is_(None))
            .values(**values, claimed_by=None, claimed_until=None)
        )
        async with self._writing() as connection:
            await connection.execute(statement)

    async def outbox_purge(self, before: datetime) -> int:
        """Delete messages delivered or abandoned before `before`; how many went."""
        _require_aware("before", before)
        o = OutboxModel
        statement = delete(o).where((o.delivered_at < before) | (o.abandoned_at < before))
        async with self._writing() as connection:
            return (await connection.execute(statement)).rowcount

    async def outbox_claim(self, message_id: int, node: str, hold_s: float) -> bool:
        """Claim a pending message for `hold_s` seconds (database time) before sending it: True if
        this node got it, False if it is delivered, abandoned or claimed by another node meanwhile."""
        o = OutboxModel
        hold = timedelta(seconds=hold_s)
        now: Any = func.now() if self.dialect == "postgresql" else datetime.now(UTC)
        statement = (
            update(o)
            .where(
                o.id == message_id,
                o.delivered_at.is_(None),
                o.abandoned_at.is_(None),
                or_(o.claimed_until.is_(None), o.claimed_until <= now, o.claimed_by == node),
            )
            .values(claimed_by=node, claimed_until=now + hold)
        )
        async with self._writing() as connection:
            return (await connection.execute(statement)).rowcount == 1

    # --- the lease of the active monitor (PostgreSQL) ---

    async def lease_tick(self, node: str, token: str, epoch: int | None, failover_s: float, api: str | None,
                         started_at: datetime) -> LeaseView:  # fmt: skip
        """In one transaction, timed by the database's clock: renew the lease if this process holds it
        under `epoch`, else take it (a new epoch) if it expired or an earlier process of this node held
        it; then record this node's report."""
        lease = LeaseModel
        span = timedelta(seconds=failover_s)
        mine = (lease.name == LEASE_NAME, lease.holder == node, lease.token == token, lease.epoch == epoch)
        async with self._engine.begin() as connection:
            await connection.execute(text("SET LOCAL lock_timeout = '2s'"))
            await _bound_idle_transaction(connection, failover_s)
            await connection.execute(postgresql.insert(lease).values(name=LEASE_NAME, epoch=0).on_conflict_do_nothing())
            previous = await connection.scalar(select(lease.holder).where(lease.name == LEASE_NAME).with_for_update())
            acquired = False
            held = None
            if epoch is not None:
                held = await connection.scalar(
                    update(lease)
                    .where(*mine)
                    .values(renewed_at=func.now(), expires_at=func.now() + span)
                    .returning(lease.epoch)
                )
            if held is None:
                held = await connection.scalar(
                    update(lease)
                    .where(
                        lease.name == LEASE_NAME,
                        # expired, or held by an earlier process of this very node (it restarted: the
                        # node id names one monitor, so that process is gone; its token no longer fences)
                        or_(lease.expires_at.is_(None), lease.expires_at <= func.now(), lease.holder == node),
                    )
                    .values(holder=node, token=token, epoch=lease.epoch + 1, renewed_at=func.now(),
                            expires_at=func.now() + span)
                    .returning(lease.epoch)
                )  # fmt: skip
                acquired = held is not None
            row = (
                await connection.execute(
                    select(lease.holder, lease.token, lease.epoch, lease.renewed_at, lease.expires_at).where(
                        lease.name == LEASE_NAME
                    )
                )
            ).one()
            is_mine = row.holder == node and row.token == token
            n = NodeModel
            report = postgresql.insert(n).values(
                node=node,
                role="active" if is_mine else "standby",
                epoch=row.epoch if is_mine else None,
                api=api,
                started_at=started_at,
                last_seen=func.now(),
            )
            await connection.execute(
                report.on_conflict_do_update(
                    index_elements=[n.node],
                    set_={
                        "role": report.excluded.role,
                        "epoch": report.excluded.epoch,
                        "api": report.excluded.api,
                        "started_at": report.excluded.started_at,
                        "last_seen": report.excluded.last_seen,
                    },
                )
            )
            holder_api = await connection.scalar(select(n.api).where(n.node == row.holder)) if row.holder else None
        return LeaseView(
            mine=is_mine,
            acquired=acquired,
            holder=row.holder,
            epoch=int(row.epoch),
            renewed_at=row.renewed_at,
            expires_at=row.expires_at,
            previous_holder=previous if acquired else None,
            holder_api=holder_api,
        )

    async def lease_release(self, node: str, token: str, epoch: int) -> None:
        """A clean stop: end this process's lease now, so a standby takes over at its next tick."""
        lease = LeaseModel
        async with self._engine.begin() as connection:
            await connection.execute(
                update(lease)
                .where(lease.name == LEASE_NAME, lease.holder == node, lease.token == token, lease.epoch == epoch)
                .values(expires_at=func.now())
            )
            await connection.execute(update(NodeModel).where(NodeModel.node == node).values(role="stopped", epoch=None))

    async def cluster_nodes(self) -> list[NodeView]:
        """Every monitor that ever reported, by node id; `holds_lease` for the current, unexpired holder."""
        lease, n = LeaseModel, NodeModel
        holder = select(lease.holder).where(lease.name == LEASE_NAME, lease.expires_at > func.now()).scalar_subquery()
        query = select(
            n.node, n.role, n.epoch, n.api, n.started_at, n.last_seen, (n.node == func.coalesce(holder, literal("")))
        ).order_by(n.node)
        async with self._engine.connect() as connection:
            return [NodeView(*row[:6], holds_lease=bool(row[6])) for row in await connection.execute(query)]


async def _bound_idle_transaction(connection: AsyncConnection, failover_s: float) -> None:
    """A monitor stopped inside a transaction that locks the lease row (a SIGSTOP, a frozen VM, a loop
    stalled between statements) would hold that lock, and so block every takeover, for as long as it
    is stopped. The database ends such a session once it has sat idle in its transaction for
    `failover_s`: by then its lease has run out too (it renews only between transactions, and no
    renewal came), so a standby takes over and the stopped monitor, when it resumes, finds its
    transaction gone and its lease held by another."""
    ms = max(1, round(failover_s * 1000))
    await connection.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))


async def _ids_of(connection: AsyncConnection, keys: Sequence[str]) -> dict[str, int]:
    """The ids of the history rows with these keys (asked in chunks the drivers accept)."""
    ids: dict[str, int] = {}
    t = TransitionModel
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[start : start + _KEYS_PER_QUERY]
        for key, row_id in await connection.execute(select(t.key, t.id).where(t.key.in_(chunk))):
            if key is not None:
                ids[key] = int(row_id)
    return ids


async def _write_notifications(
    connection: AsyncConnection, messages: Sequence[NewMessage], opened: Sequence[Alert], closed: Sequence[AlertKey]
) -> None:
    await _execute_in_steps(
        connection,
        insert(OutboxModel),
        messages,
        lambda m: _values(m) | {"next_attempt_at": m.created_at, "attempts": 0},
    )
    a = AlertModel
    statement = delete(a).where(
        a.target == bindparam("t"), a.kind == bindparam("k", type_=a.kind.type), a.subject == bindparam("s")
    )
    gone = [*closed, *(alert.key for alert in opened)]
    await _execute_in_steps(connection, statement, gone, lambda key: {"t": key[0], "k": key[1], "s": key[2]})
    await _execute_in_steps(connection, insert(AlertModel), opened, _values)


async def _execute_in_steps(
    connection: AsyncConnection, statement: Executable, items: Iterable[_I], values: Callable[[_I], dict[str, Any]]
) -> None:
    """Execute `statement` once per item (its `values`), WRITE_STEP rows per call, with the event loop
    free between calls: a batch of 50,000 rows is 500 short steps, not one long one. Nothing for no items."""
    pending = iter(items)
    while rows := [values(item) for item in itertools.islice(pending, WRITE_STEP)]:
        await connection.execute(statement, rows)
        await asyncio.sleep(0)  # the driver may answer without yielding: let the loop run anyway


_T = TypeVar("_T")


async def _with_store(url: str, use: Callable[[Store], Awaitable[_T]]) -> _T:
    store = await Store.open(url)
    try:
        return await use(store)
    finally:
        await store.close()


def upgrade_sync(url: str) -> None:
    """`relaybeat db upgrade`: bring the database at `url` to the newest schema."""
    asyncio.run(_with_store(url, lambda store: store.upgrade()))


def downgrade_sync(url: str, revision: str = "base") -> None:
    """`relaybeat db downgrade`: revert the database at `url` to `revision`."""
    asyncio.run(_with_store(url, lambda store: store.downgrade(revision)))


def pending_model_changes(url: str) -> list[Any]:
    """Alembic's diff between the models and the (migrated) database at `url`; [] when they match.

    CI runs it after `upgrade_sync` to prove that the migrations create exactly the models.
    """
    return asyncio.run(_with_store(url, lambda store: store.model_changes()))
