"""Schema migrations: brings any crewdb database (or the original application's) up to the current schema."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from crewdb.errors import FailedPreconditionError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The schema of the original application, which created its tables without a migration
# history. A database holding exactly those tables is adopted at this revision.
ORIGINAL_REVISION = "0001"
ORIGINAL_TABLES = frozenset({"conversations", "messages", "users", "refresh_tokens", "tasks"})


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrades the database to `revision`; returns the revisions before and after.

    An empty database gets the whole schema. A database made by the original application (its
    five tables, no migration history) is adopted at revision 0001 and upgraded, keeping its
    rows.

    Raises:
        FailedPreconditionError: the database holds some of crewdb's tables but no migration
            history, so its shape is unknown and changing it could lose data.
    """
    config = alembic_config()
    before = current_revision(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        if before is None:
            existing = set(inspect(conn).get_table_names()) & ORIGINAL_TABLES
            if existing == ORIGINAL_TABLES:
                log.info("adopting a database without migration history at %s", ORIGINAL_REVISION)
                command.stamp(config, ORIGINAL_REVISION)
            elif existing:
                raise FailedPreconditionError(
                    "database has tables "
                    + ", ".join(sorted(existing))
                    + " but no migration history; refusing to change it",
                    reason="UNKNOWN_SCHEMA",
                )
        command.upgrade(config, revision)
    after = current_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return before, after
