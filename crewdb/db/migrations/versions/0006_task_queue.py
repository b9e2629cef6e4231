"""The task queue: owners, attempts and leases, delays, progress, cancellation, de-duplication.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # As in 0004: Alembic offers only a table copy for a REFERENCES column on SQLite.
        op.execute("ALTER TABLE tasks ADD COLUMN owner_id TEXT REFERENCES users (id) ON DELETE CASCADE")
    else:
        op.add_column("tasks", sa.Column("owner_id", sa.Text, sa.ForeignKey("users.id", ondelete="CASCADE")))
    op.add_column("tasks", sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.add_column("tasks", sa.Column("max_attempts", sa.Integer, nullable=False, server_default=sa.text("3")))
    op.add_column("tasks", sa.Column("run_after", sa.Text))
    op.add_column("tasks", sa.Column("lease_expires_at", sa.Text))
    op.add_column("tasks", sa.Column("worker_id", sa.Text))
    op.add_column("tasks", sa.Column("progress", sa.Float, nullable=False, server_default=sa.text("0")))
    op.add_column(
        "tasks", sa.Column("cancel_requested", sa.Integer, nullable=False, server_default=sa.text("0"))
    )
    op.add_column("tasks", sa.Column("dedup_key", sa.Text))
    op.add_column("tasks", sa.Column("updated_at", sa.Text))
    tasks = sa.table("tasks", sa.column("created_at"), sa.column("updated_at"))
    op.execute(tasks.update().values(updated_at=tasks.c.created_at))
    op.create_index("idx_tasks_ready", "tasks", ["status", sa.text("priority DESC"), "created_at", "id"])
    op.create_index("idx_tasks_owner_created", "tasks", ["owner_id", "created_at", "id"])
    op.create_index("uq_tasks_owner_dedup", "tasks", ["owner_id", "dedup_key"], unique=True)


def downgrade() -> None:
    for index in ("uq_tasks_owner_dedup", "idx_tasks_owner_created", "idx_tasks_ready"):
        op.drop_index(index, table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        for column in (
            "updated_at",
            "dedup_key",
            "cancel_requested",
            "progress",
            "worker_id",
            "lease_expires_at",
            "run_after",
            "max_attempts",
            "attempts",
            "owner_id",
        ):
            batch.drop_column(column)
