"""crewdb's additions for conversation listings: a kept message count and keyset indexes.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "conversations",
        sa.Column("message_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    conversations = sa.table("conversations", sa.column("id"), sa.column("message_count"))
    messages = sa.table("messages", sa.column("conversation_id"))
    count = (
        sa.select(sa.func.count()).where(messages.c.conversation_id == conversations.c.id).scalar_subquery()
    )
    op.execute(conversations.update().values(message_count=count))
    op.create_index("idx_conversations_updated", "conversations", ["updated_at", "id"])
    op.create_index(
        "idx_messages_conversation_timestamp",
        "messages",
        ["conversation_id", "timestamp", "id"],
    )


def downgrade() -> None:
    op.drop_index("idx_messages_conversation_timestamp", table_name="messages")
    op.drop_index("idx_conversations_updated", table_name="conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("message_count")
