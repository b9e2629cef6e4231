"""Makes every JSON column hold a JSON object, and maps the legacy `function` role to `tool`.

Databases adopted from the original application may hold metadata that is a JSON array or
scalar, or not JSON at all; crewdb's API carries these columns as google.protobuf.Struct,
which only holds objects. Such values are kept, wrapped: a parsed non-object becomes
{"value": ...}, unparseable text becomes {"text": "..."}. OpenAI-style chat logs call tool
output `function` (the older name of `tool`).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = {
    "messages": ("metadata",),
    "tasks": ("data", "result", "metadata"),
}


def as_object(text: str | None) -> str | None:
    """`text` as the JSON text of an object; None stays None."""
    if text is None:
        return None
    try:
        value: Any = json.loads(text)
    except ValueError:
        value = {"text": text}
    if not isinstance(value, dict):
        value = {"value": value}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def upgrade() -> None:
    conn = op.get_bind()
    for name, columns in COLUMNS.items():
        table = sa.table(name, sa.column("id"), *(sa.column(c) for c in columns))
        for row in conn.execute(sa.select(table.c.id, *(table.c[c] for c in columns))).all():
            changes = {}
            for index, column in enumerate(columns, start=1):
                original = row[index]
                if original is None:
                    continue
                try:
                    already_object = isinstance(json.loads(original), dict)
                except ValueError:
                    already_object = False
                if not already_object:
                    changes[column] = as_object(original)
            if changes:
                conn.execute(table.update().where(table.c.id == row.id).values(**changes))
    messages = sa.table("messages", sa.column("role"))
    conn.execute(messages.update().where(messages.c.role == "function").values(role="tool"))


def downgrade() -> None:
    pass  # wrapped values stay wrapped: the originals are inside them
