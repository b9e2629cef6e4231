"""Migrations build the schema from empty, adopt the original application's database, and match schema.py."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from crewdb.cli import main
from crewdb.db.engine import create_engine, sqlite_url
from crewdb.db.migrate import head_revision, migrate
from crewdb.db.schema import metadata
from crewdb.errors import FailedPreconditionError

# The original application's DDL, as it ran it (no migration history).
ORIGINAL_DDL = """
CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, title TEXT,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, timestamp TEXT NOT NULL, metadata TEXT,
    FOREIGN KEY (conversation_id) REFERENCES conversations(id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS idx_messages_conversation ON messages(conversation_id);
CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, email TEXT UNIQUE NOT NULL,
    username TEXT UNIQUE NOT NULL, password_hash TEXT NOT NULL, role TEXT NOT NULL DEFAULT 'user',
    is_active INTEGER NOT NULL DEFAULT 1, created_at TEXT NOT NULL, updated_at TEXT NOT NULL,
    last_login_at TEXT);
CREATE INDEX IF NOT EXISTS idx_users_email ON users(email);
CREATE INDEX IF NOT EXISTS idx_users_username ON users(username);
CREATE INDEX IF NOT EXISTS idx_users_role ON users(role);
CREATE INDEX IF NOT EXISTS idx_users_active ON users(is_active);
CREATE TABLE IF NOT EXISTS refresh_tokens (id TEXT PRIMARY KEY, user_id TEXT NOT NULL,
    token_hash TEXT NOT NULL, expires_at TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT,
    FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_user ON refresh_tokens(user_id);
CREATE INDEX IF NOT EXISTS idx_refresh_tokens_hash ON refresh_tokens(token_hash);
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, type TEXT NOT NULL, status TEXT NOT NULL,
    priority INTEGER DEFAULT 0, data TEXT NOT NULL, result TEXT, error TEXT,
    created_at TEXT NOT NULL, started_at TEXT, completed_at TEXT, duration INTEGER, metadata TEXT);
CREATE INDEX IF NOT EXISTS idx_tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS idx_tasks_created ON tasks(created_at);
"""

REQUIRED_INDEXES = {
    "messages": {"idx_messages_conversation"},
    "users": {"idx_users_email", "idx_users_username", "idx_users_role", "idx_users_active"},
    "refresh_tokens": {"idx_refresh_tokens_user", "idx_refresh_tokens_hash"},
    "tasks": {"idx_tasks_status", "idx_tasks_created"},
}


def schema_differences(conn: Connection) -> list[Any]:
    """Alembic's comparison of the database with schema.py, less one known blind spot.

    SQLAlchemy does not read ON DELETE from a column-level REFERENCES clause, which is how
    migration 0003 adds conversations.owner_id on SQLite; it then reports that foreign key as
    different. SQLite's own catalogue is checked for it instead.
    """
    rows = conn.exec_driver_sql("PRAGMA foreign_key_list(conversations)").all()
    assert [(row[2], row[3], row[4], row[6]) for row in rows] == [("users", "owner_id", "id", "CASCADE")]

    # Nor does it compare an index with a DESC column; SQLite's catalogue is checked instead.
    ready = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'idx_tasks_ready'").scalar_one()
    assert "priority DESC" in ready

    def blind_spot(change: Any) -> bool:
        if not isinstance(change, tuple):
            return False
        if change[0] in ("add_fk", "remove_fk"):
            return list(change[1].column_keys) == ["owner_id"]
        if change[0] == "remove_table":  # the FTS5 table and its shadow tables: SQLite only
            return str(change[1].name).startswith("document_chunks_fts")
        return change[0] in ("add_index", "remove_index") and change[1].name == "idx_tasks_ready"

    return [c for c in compare_metadata(MigrationContext.configure(conn), metadata) if not blind_spot(c)]


def test_migrating_an_empty_database_yields_exactly_the_core_metadata(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "app.db"))
    assert migrate(engine) == (None, head_revision())
    with engine.connect() as conn:
        assert schema_differences(conn) == []
        inspector = inspect(conn)
        for table, indexes in REQUIRED_INDEXES.items():
            assert indexes <= {index["name"] for index in inspector.get_indexes(table)}
        cascade = inspector.get_foreign_keys("messages")[0]
        assert cascade["options"].get("ondelete") == "CASCADE"
    engine.dispose()


def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "app.db"))
    migrate(engine)
    assert migrate(engine) == (head_revision(), head_revision())
    engine.dispose()


def test_the_original_applications_database_is_adopted_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(ORIGINAL_DDL)
        raw.execute(
            "INSERT INTO conversations VALUES ('c1', 'old', '2024-01-01T00:00:00.000Z', "
            "'2024-01-01T00:00:00.000Z')"
        )
        raw.executemany(
            "INSERT INTO messages VALUES (?, 'c1', 'user', 'hi', '2024-01-01T00:00:01.000Z', NULL)",
            [("m1",), ("m2",)],
        )
    raw.close()
    engine = create_engine(sqlite_url(path))
    assert migrate(engine) == (None, head_revision())
    with engine.connect() as conn:
        count = conn.exec_driver_sql("SELECT message_count FROM conversations WHERE id='c1'")
        assert count.scalar_one() == 2
        assert conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one() == 2
        differences = schema_differences(conn)
    # The one known difference: SQLite lets a TEXT PRIMARY KEY declared without NOT NULL hold
    # NULL, and the original DDL did not say NOT NULL (docs/schema.md).
    assert all(change[0][0] == "modify_nullable" and change[0][3] == "id" for change in differences), (
        differences
    )
    engine.dispose()


def test_a_database_with_some_unknown_tables_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE conversations (id TEXT PRIMARY KEY)")
    raw.close()
    engine = create_engine(sqlite_url(path))
    with pytest.raises(FailedPreconditionError, match="no migration history"):
        migrate(engine)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == ["conversations"]
    engine.dispose()


def test_migrate_command_reports_the_revisions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.db"
    assert main(["migrate"], env={"DATABASE_PATH": str(path)}) == 0
    assert f"empty -> {head_revision()}" in capsys.readouterr().out
    assert main(["migrate"], env={"DATABASE_PATH": str(path)}) == 0
    assert f"{head_revision()} -> {head_revision()}" in capsys.readouterr().out


def test_adopted_timestamps_are_rewritten_so_pagination_sees_every_row(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(ORIGINAL_DDL)
        # The original application's mixed forms: naive with a space, and milliseconds.
        raw.executemany(
            "INSERT INTO conversations VALUES (?, ?, ?, ?)",
            [
                ("A", "a", "2024-01-01 10:00:00", "2024-01-01 11:00:00"),
                ("B", "b", "2024-01-01T10:30:00.000Z", "2024-01-01T10:30:00.000Z"),
            ],
        )
        raw.executemany(
            "INSERT INTO messages VALUES (?, 'A', 'user', 'hi', ?, NULL)",
            [
                ("m1", "2024-01-01 10:00:01"),
                ("m2", "2024-01-01T10:00:02.000Z"),
                ("m3", "2024-01-01 10:00:03"),
            ],
        )
        raw.execute("INSERT INTO messages VALUES ('m4', 'B', 'user', 'late', '2024-01-01 10:45:00', NULL)")
    raw.close()
    engine = create_engine(sqlite_url(path))
    migrate(engine)
    with engine.connect() as conn:
        stamps = conn.exec_driver_sql("SELECT timestamp FROM messages ORDER BY id").scalars().all()
        assert stamps == [
            "2024-01-01T10:00:01.000000Z",
            "2024-01-01T10:00:02.000000Z",
            "2024-01-01T10:00:03.000000Z",
            "2024-01-01T10:45:00.000000Z",
        ]
        updated = conn.exec_driver_sql("SELECT updated_at FROM conversations WHERE id='A'").scalar_one()
        assert updated == "2024-01-01T11:00:00.000000Z"
        # B was last updated before its message: brought up to the message's time.
        updated = conn.exec_driver_sql("SELECT updated_at FROM conversations WHERE id='B'").scalar_one()
        assert updated == "2024-01-01T10:45:00.000000Z"
    engine.dispose()


def test_adopted_non_object_metadata_is_wrapped_and_function_role_becomes_tool(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(ORIGINAL_DDL)
        raw.execute(
            "INSERT INTO conversations VALUES ('A', 'a', '2024-01-01 10:00:00', '2024-01-01 10:00:00')"
        )
        raw.executemany(
            "INSERT INTO messages VALUES (?, 'A', ?, 'x', '2024-01-01 10:00:01', ?)",
            [
                ("m1", "user", "[1, 2]"),
                ("m2", "function", "not json"),
                ("m3", "assistant", '{"kept": true}'),
                ("m4", "system", None),
            ],
        )
    raw.close()
    engine = create_engine(sqlite_url(path))
    migrate(engine)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, role, metadata FROM messages ORDER BY id").all()
    engine.dispose()
    assert [tuple(row) for row in rows] == [
        ("m1", "user", '{"value":[1,2]}'),
        ("m2", "tool", '{"text":"not json"}'),
        ("m3", "assistant", '{"kept": true}'),
        ("m4", "system", None),
    ]
