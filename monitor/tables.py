"""The database schema as SQLAlchemy models. Table and column names are a public contract.

Rules: every timestamp goes through `UTCDateTime` (aware UTC in, aware UTC out, on every
dialect); every enum is stored as its text value through `EnumText`. The migrations in
`migrations/versions` create exactly this schema; `monitor.store.pending_model_changes` checks it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime

from relaybeat.monitor.maintenance import TargetKind
from relaybeat.monitor.notify import NoticeType
from relaybeat.monitor.states import Event, Kind, State

# Constraint names are deterministic, so batch-mode migrations on SQLite can find and drop them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """`TIMESTAMP WITH TIME ZONE` that takes only aware datetimes and always returns aware UTC.

    SQLite has no time zone type and hands back naive datetimes, so values are stored there as
    naive UTC in SQLAlchemy's fixed-width text format (which sorts and compares correctly).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            msg = f"naive datetime {value!r}: pass an aware datetime (e.g. tzinfo=UTC)"
            raise ValueError(msg)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            msg = f"expected a datetime from the database, got {value!r}"
            raise TypeError(msg)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


E = TypeVar("E", bound=StrEnum)


class EnumText(TypeDecorator[E]):
    """A `StrEnum` stored as plain text (its value), so SQL reads well and new members need no DDL."""

    impl = Text
    cache_ok = True

    def __init__(self, enum: type[E]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum(value).value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> E | None:
        if value is None:
            return None
        return self.enum(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TransitionModel(Base):
    """Append-only history: one row per state change or notable event."""

    __tablename__ = "transitions"
    __table_args__ = (
        Index(None, "subject", "at"),
        Index(None, "at"),
        Index(None, "key", unique=True),
        # Ids are never reused on SQLite either, so `after_id` is a safe resume point.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[Kind] = mapped_column(EnumText(Kind))
    subject: Mapped[str] = mapped_column(Text)
    from_state: Mapped[State] = mapped_column(EnumText(State))
    to_state: Mapped[State] = mapped_column(EnumText(State))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(Text)
    # The relay the subject was heard through, or the relay blamed for it.
    relay: Mapped[str | None] = mapped_column(Text, nullable=True)
    event: Mapped[Event] = mapped_column(
        EnumText(Event), default=Event.TRANSITION, server_default=Event.TRANSITION.value
    )
    # Written while a maintenance window covered the subject: recorded, but not an alert.
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Unique per decision, given when it is decided (None on rows older than the key): a decision
    # written again (replayed from the monitor's journal) is recognised and not stored twice.
    key: Mapped[str | None] = mapped_column(Text, nullable=True)


class _CurrentState:
    """The columns of a subject's current state, which hosts and relays alike keep."""

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    state: Mapped[State] = mapped_column(EnumText(State))
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    flapping: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class HostModel(_CurrentState, Base):
    """Current state of each host (a leaf), upserted after every change."""

    __tablename__ = "hosts"

    relay: Mapped[str | None] = mapped_column(Text, nullable=True)
    interval_s: Mapped[float] = mapped_column(Float)
    # The watched source its relay vouches for it from (`tasmota`, ...); NULL for a host that beats.
    source: Mapped[str | None] = mapped_column(Text, nullable=True)


class RelayModel(_CurrentState, Base):
    """Current state of each relay, upserted after every change."""

    __tablename__ = "relays"

    # The relay above this one in a tree, if any.
    parent: Mapped[str | None] = mapped_column(Text, nullable=True)
    boot: Mapped[str | None] = mapped_column(Text, nullable=True)
    flush_s: Mapped[float] = mapped_column(Float)


class MaintenanceModel(Base):
    """Maintenance windows. Removing one sets `removed_at`; rows are kept for availability reports."""

    __tablename__ = "maintenance"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target_kind: Mapped[TargetKind] = mapped_column(EnumText(TargetKind))
    # A host id, a host-id glob, or a relay id (the relay with its whole subtree and their hosts).
    target: Mapped[str] = mapped_column(Text)
    starts_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # None: until removed
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AcknowledgementModel(Base):
    """An operator's acknowledgement of an outage, with a comment."""

    __tablename__ = "acknowledgements"
    __table_args__ = (Index(None, "kind", "subject"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[Kind] = mapped_column(EnumText(Kind))
    subject: Mapped[str] = mapped_column(Text)
    # The transition that started the acknowledged outage (None if it was not yet written).
    transition_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    comment: Mapped[str] = mapped_column(Text)
    acknowledged_at: Mapped[datetime] = mapped_column(UTCDateTime())
    by: Mapped[str] = mapped_column(Text)


class OutboxModel(Base):
    """Webhook messages to deliver, written in the transaction of the transitions they are about.

    A row is pending until `delivered_at` (a 2xx answer) or `abandoned_at` (retried for too long).
    """

    __tablename__ = "outbox"
    __table_args__ = (Index(None, "target", "delivered_at", "id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(Text)  # a [[notify.webhooks]] name
    key: Mapped[str] = mapped_column(Text, unique=True)  # the Idempotency-Key header and the body's "id"
    type: Mapped[NoticeType] = mapped_column(EnumText(NoticeType))
    incident: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)  # the exact JSON sent (and signed)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    abandoned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # A monitor sending it holds it until `claimed_until` (so two monitors never send one message).
    claimed_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AlertModel(Base):
    """What each webhook target has been told is down or unreachable, until it is told it is over."""

    __tablename__ = "alerts"
    __table_args__ = (PrimaryKeyConstraint("target", "kind", "subject"),)

    target: Mapped[str] = mapped_column(Text)
    kind: Mapped[Kind] = mapped_column(EnumText(Kind))
    subject: Mapped[str] = mapped_column(Text)
    incident: Mapped[str] = mapped_column(Text)
    state: Mapped[State] = mapped_column(EnumText(State))
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    reminded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DetectionModel(Base):
    """What the detector held when it opened an outage: the last evidence of life, the decision's
    moment and the timeout it judged by (detection time T_D = decided_at − last_seen)."""

    __tablename__ = "detections"
    __table_args__ = (Index(None, "kind", "subject"),)

    transition_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[Kind] = mapped_column(EnumText(Kind))
    subject: Mapped[str] = mapped_column(Text)
    state: Mapped[State] = mapped_column(EnumText(State))
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    interval_s: Mapped[float] = mapped_column(Float)
    timeout_s: Mapped[float] = mapped_column(Float)
    timeout_basis: Mapped[str | None] = mapped_column(Text, nullable=True)


class FalseAlarmModel(Base):
    """An outage proved wrong by the evidence that ended it (monitor/quality.py), with the proof."""

    __tablename__ = "false_alarms"
    __table_args__ = (Index(None, "kind", "subject"), Index(None, "opened_at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[Kind] = mapped_column(EnumText(Kind))
    subject: Mapped[str] = mapped_column(Text)
    # The transitions that opened and closed the outage (None: not found, e.g. written before keys).
    opened_id: Mapped[int | None] = mapped_column(Integer, nullable=True, unique=True)
    closed_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    proof: Mapped[str] = mapped_column(Text)  # seq_continuity, dated_inside, relay_false_alarm
    detail: Mapped[str] = mapped_column(Text)
    seq_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    seq_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    seen_before: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    seen_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    recognised_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LeaseModel(Base):
    """The active monitor's lease: one row, `name` 'monitor'. `expires_at` comes from the database's
    clock; `epoch` grows by one at every takeover, and every write of the active checks it."""

    __tablename__ = "monitor_lease"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str | None] = mapped_column(Text, nullable=True)  # the active node's id
    token: Mapped[str | None] = mapped_column(Text, nullable=True)  # that process's own token
    epoch: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NodeModel(Base):
    """What each monitor (node) last said of itself, for `GET /api/v1/cluster`."""

    __tablename__ = "monitor_nodes"

    node: Mapped[str] = mapped_column(Text, primary_key=True)
    role: Mapped[str] = mapped_column(Text)  # active or standby
    epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the lease epoch it holds, if active
    api: Mapped[str | None] = mapped_column(Text, nullable=True)  # where its HTTP API listens
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime())
