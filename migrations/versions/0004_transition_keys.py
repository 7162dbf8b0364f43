"""Transition keys: each decided transition's unique key, so a replayed decision is written once.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Nullable: rows written before this revision have none (NULLs never conflict). A plain ADD COLUMN
and CREATE UNIQUE INDEX on both dialects, so SQLite does not copy the history table to add it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("transitions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_transitions_key"), ["key"], unique=True)


def downgrade() -> None:
    # SQLite drops the column by copying the table: keep its AUTOINCREMENT (ids never reused).
    with op.batch_alter_table("transitions", schema=None, table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_index(batch_op.f("ix_transitions_key"))
        batch_op.drop_column("key")
