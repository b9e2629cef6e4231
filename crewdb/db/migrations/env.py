"""Alembic environment: runs migrations on the connection `crewdb.db.migrate` hands it."""

from __future__ import annotations

from alembic import context

from crewdb.db.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `crewdb migrate`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite can only change most table properties by copying the table; batch mode does that.
    render_as_batch=True,
)
context.run_migrations()
