"""Rewrites every stored timestamp in crewdb's one format, `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC).

Databases adopted from the original application hold other ISO-8601 forms (`...00.000Z`,
naive `YYYY-MM-DD HH:MM:SS`). Keyset pagination compares timestamps as text, which only
orders correctly when every value has the same form. Also makes every conversation's
`updated_at` at least the time of its last message, which AddMessage relies on to keep
message order when the clock steps back.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = {
    "conversations": ("created_at", "updated_at"),
    "messages": ("timestamp",),
    "users": ("created_at", "updated_at", "last_login_at"),
    "refresh_tokens": ("expires_at", "created_at", "revoked_at"),
    "tasks": ("created_at", "started_at", "completed_at"),
}


def canonical(text: str | None) -> str | None:
    """The canonical form of a stored timestamp; unreadable text is left as it is."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return text
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def upgrade() -> None:
    conn = op.get_bind()
    for name, columns in COLUMNS.items():
        table = sa.table(name, sa.column("id"), *(sa.column(c) for c in columns))
        rows = conn.execute(sa.select(table.c.id, *(table.c[c] for c in columns))).all()
        for row in rows:
            changes = {c: canonical(row[i + 1]) for i, c in enumerate(columns)}
            changes = {c: v for c, v in changes.items() if v != row[columns.index(c) + 1]}
            if changes:
                conn.execute(table.update().where(table.c.id == row.id).values(**changes))
    conversations = sa.table("conversations", sa.column("id"), sa.column("updated_at"))
    messages = sa.table("messages", sa.column("conversation_id"), sa.column("timestamp"))
    latest = (
        sa.select(sa.func.max(messages.c.timestamp))
        .where(messages.c.conversation_id == conversations.c.id)
        .scalar_subquery()
    )
    conn.execute(conversations.update().where(latest > conversations.c.updated_at).values(updated_at=latest))


def downgrade() -> None:
    pass  # the canonical form is valid ISO-8601 for any reader
