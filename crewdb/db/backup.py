"""SQLite's side of backups: a consistent online copy, and what a copy holds (db layer)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from crewdb.db.engine import create_engine, sqlite_url
from crewdb.db.schema import documents, metadata


@dataclass(frozen=True, slots=True)
class StoredDocument:
    owner: str
    id: str
    revision: int
    chunk_count: int


def online_copy(source: Path, destination: Path) -> None:
    """Copies the database with SQLite's online backup API, in one step: one read transaction,
    so the copy is the database as of one moment, while writers go on (WAL mode)."""
    with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src, sqlite3.connect(destination) as dst:
        src.backup(dst)
    src.close()
    dst.close()


@dataclass(frozen=True, slots=True)
class CopyContents:
    rows: dict[str, int]
    documents: dict[tuple[str, str], StoredDocument]
    schema_revision: str | None


def contents(path: Path) -> CopyContents:
    """Row counts per table, the knowledge base's documents (owner, id) -> revision and chunk
    count, and the schema revision, of the database file at `path`."""
    engine = create_engine(sqlite_url(path), pool_size=1)
    try:
        with engine.connect() as conn:
            rows = {
                table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
                for table in metadata.sorted_tables
            }
            found = conn.execute(
                select(documents.c.owner_id, documents.c.id, documents.c.revision, documents.c.chunk_count)
            ).all()
            revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    finally:
        engine.dispose()
    stored = {(row[0], row[1]): StoredDocument(row[0], row[1], row[2], row[3]) for row in found}
    return CopyContents(rows, stored, revision)
