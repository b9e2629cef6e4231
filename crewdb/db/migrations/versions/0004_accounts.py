"""Accounts: conversation owners, and refresh-token sessions with single use.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    owner = sa.Column("owner_id", sa.Text, sa.ForeignKey("users.id", ondelete="CASCADE"))
    if op.get_bind().dialect.name == "sqlite":
        # SQLite takes a REFERENCES clause in ADD COLUMN (NULL default), but Alembic only offers
        # batch mode for it, which copies the whole table; the DDL is spelled out instead.
        op.execute(
            "ALTER TABLE conversations ADD COLUMN owner_id TEXT REFERENCES users (id) ON DELETE CASCADE"
        )
    else:
        op.add_column("conversations", owner)
    op.create_index("idx_conversations_owner_updated", "conversations", ["owner_id", "updated_at", "id"])
    op.add_column("refresh_tokens", sa.Column("family_id", sa.Text))
    op.add_column("refresh_tokens", sa.Column("used_at", sa.Text))
    tokens = sa.table("refresh_tokens", sa.column("id"), sa.column("family_id"))
    op.execute(tokens.update().values(family_id=tokens.c.id))  # each old token its own session
    op.create_index("idx_refresh_tokens_family", "refresh_tokens", ["family_id"])


def downgrade() -> None:
    op.drop_index("idx_refresh_tokens_family", table_name="refresh_tokens")
    op.drop_index("idx_conversations_owner_updated", table_name="conversations")
    with op.batch_alter_table("refresh_tokens") as batch:
        batch.drop_column("used_at")
        batch.drop_column("family_id")
    op.drop_column("conversations", "owner_id")
