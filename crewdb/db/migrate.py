"""Schema migrations: brings any crewdb database (or the original application's) up to the current schema."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from crewdb.db.engine import create_engine, sqlite_url
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


def _driver_execute(conn: Connection, statement: str) -> None:
    driver = conn.connection.driver_connection
    driver.execute(statement)  # type: ignore[union-attr]


def _dangling_references(conn: Connection) -> int:
    return len(conn.exec_driver_sql("PRAGMA foreign_key_check").all())


def _adopt_original(conn: Connection, config: Config, before: str | None) -> None:
    if before is not None:
        return
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
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Off for the migration, as SQLite's ALTER TABLE guide prescribes: rebuilding a
            # table (drop the old copy, rename the new) would otherwise cascade-delete every
            # row that references it. Must be set outside a transaction, on the driver.
            _driver_execute(conn, "PRAGMA foreign_keys = OFF")
        try:
            with conn.begin():
                config.attributes["connection"] = conn
                dangling = _dangling_references(conn) if sqlite else 0
                if dangling:
                    log.warning("database holds %d rows with dangling references already", dangling)
                _adopt_original(conn, config, before)
                command.upgrade(config, revision)
                if sqlite and _dangling_references(conn) > dangling:
                    raise FailedPreconditionError(
                        "the migration would have left rows with dangling references; rolled back",
                        reason="MIGRATION_FAILED",
                    )
        finally:
            if sqlite:
                _driver_execute(conn, "PRAGMA foreign_keys = ON")
    after = current_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return before, after


def open_database(path: Path, *, pool_size: int = 5) -> tuple[Engine, str | None, str | None]:
    """An engine on the SQLite file at `path`, its folder created and its schema migrated,
    with the revisions before and after.

    Raises:
        FailedPreconditionError: the file cannot be created, opened or migrated (a folder in
            the way, no permission, not a database, made by a newer crewdb); the message says
            which.
    """
    engine: Engine | None = None
    try:
        engine = create_engine(sqlite_url(path), pool_size=pool_size)
        before, after = migrate(engine)
    except FailedPreconditionError:
        if engine is not None:
            engine.dispose()
        raise
    except (OSError, SQLAlchemyError, CommandError) as error:
        if engine is not None:
            engine.dispose()
        cause = getattr(error, "orig", None) or error
        raise FailedPreconditionError(
            f"cannot open or migrate the database: {cause}", reason="DATABASE_UNUSABLE"
        ) from error
    return engine, before, after
