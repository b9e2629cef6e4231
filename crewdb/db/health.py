"""What the health report says about the SQLite database: sizes, pages and rows per table (db layer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from crewdb.db.schema import metadata


def storage_details(conn: Connection, path: Path) -> dict[str, Any]:
    """The database file's size and its write-ahead log's, its pages, and every table's rows."""
    page_count = int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())
    page_size = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
    rows = {
        table.name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())
        for table in metadata.sorted_tables
    }
    return {
        "path": str(path),
        "file_bytes": _size(path),
        "wal_bytes": _size(Path(f"{path}-wal")),
        "page_count": page_count,
        "page_size": page_size,
        "rows": rows,
    }


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
