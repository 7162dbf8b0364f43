"""Quality: what the detector held at each outage it opened (detections) and the outages proved
wrong (false_alarms), for the detector's own quality figures.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "detections",
        sa.Column("transition_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("timeout_basis", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("transition_id", name=op.f("pk_detections")),
    )
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_detections_kind_subject"), ["kind", "subject"], unique=False)
    op.create_table(
        "false_alarms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("opened_id", sa.Integer(), nullable=True),
        sa.Column("closed_id", sa.Integer(), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("proof", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("seq_before", sa.BigInteger(), nullable=True),
        sa.Column("seq_after", sa.BigInteger(), nullable=True),
        sa.Column("seen_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seen_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("recognised_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_false_alarms")),
        sa.UniqueConstraint("opened_id", name=op.f("uq_false_alarms_opened_id")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("false_alarms", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_false_alarms_kind_subject"), ["kind", "subject"], unique=False)
        batch_op.create_index(batch_op.f("ix_false_alarms_opened_at"), ["opened_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("false_alarms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_false_alarms_opened_at"))
        batch_op.drop_index(batch_op.f("ix_false_alarms_kind_subject"))
    op.drop_table("false_alarms")
    with op.batch_alter_table("detections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_detections_kind_subject"))
    op.drop_table("detections")
