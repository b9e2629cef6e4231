"""The database handle: one engine, SQLite pragmas on every connection, and the threads queries run on.

Services call `Database.read` / `Database.write` with a function of a Connection; each runs
in one transaction on a worker thread so the event loop never waits on a lock or the disk.
Reads share a small pool of threads (WAL lets them run beside the writer); writes go through
one thread, which on SQLite is the one writer it allows anyway, so writers queue in-process
instead of spinning on SQLITE_BUSY, and commits happen in a single, known order. Small,
index-bounded reads may run on the loop itself (`read_now`), where they cost less than the
hop to a thread. Work handed to a thread runs in a copy of the caller's context variables,
so its log lines carry the call's request id.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from crewdb.errors import UnavailableError
from crewdb.threads import in_thread

T = TypeVar("T")

__all__ = ["Connection", "Database", "create_engine", "sqlite_url"]
log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
_WRITE_OPTION = "crewdb_write"


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def create_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for `url`; on SQLite with crewdb's pragmas and explicit transaction control."""
    if url.startswith("sqlite") and ":memory:" not in url:
        Path(sqlalchemy.make_url(url).database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(url, pool_size=pool_size, max_overflow=pool_size)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _on_sqlite_connect)
        event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (the driver's own implicit BEGIN
    # cannot be told to take the write lock up front).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: Connection) -> None:
    # Writers take the lock at BEGIN: a deferred transaction that upgrades later can fail
    # with SQLITE_BUSY without waiting, when another process (a CLI migrate) writes too.
    # Straight to the driver: this runs before every transaction, and going through
    # SQLAlchemy's statement machinery would cost more than the BEGIN itself.
    is_write = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.connection.driver_connection.execute(  # type: ignore[union-attr]
        "BEGIN IMMEDIATE" if is_write else "BEGIN"
    )


# SQLite result codes that say the database is out of reach for now (locked by another
# writer, file missing or unreadable, disk full or failing): retrying later can work. Anything
# else (a missing table or column, a constraint) is a defect and stays INTERNAL, so that
# clients with retry policies do not retry it forever.
_TRANSIENT_SQLITE_ERRORS = frozenset(
    {
        "SQLITE_BUSY",
        "SQLITE_LOCKED",
        "SQLITE_CANTOPEN",
        "SQLITE_IOERR",
        "SQLITE_FULL",
        "SQLITE_READONLY",
        "SQLITE_PROTOCOL",
        "SQLITE_NOTADB",
        "SQLITE_CORRUPT",
    }
)


def _as_domain_error(error: BaseException) -> BaseException:
    """UnavailableError for a database that is out of reach; `error` itself otherwise."""
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return UnavailableError("database connection lost, try again")
    # The driver's own error where SQLAlchemy did not wrap it: the BEGIN that crewdb issues in
    # the "begin" event hook (SQLITE_BUSY while another process holds the write lock).
    raw = error.orig if isinstance(error, OperationalError) else error
    if isinstance(error, OperationalError) or isinstance(raw, sqlite3.OperationalError):
        name = getattr(raw, "sqlite_errorname", None)
        if name is None or _is_transient(name):
            log.warning("database unavailable: %s", raw)
            return UnavailableError("database unavailable, try again")
    return error


def _is_transient(name: str) -> bool:
    # Extended codes (SQLITE_IOERR_WRITE, SQLITE_BUSY_SNAPSHOT) belong to their primary code.
    return any(name == code or name.startswith(code + "_") for code in _TRANSIENT_SQLITE_ERRORS)


class Database:
    """Runs transactions off the event loop; owns the engine, its threads and their connections.

    Each thread keeps one connection for its lifetime, so a query costs a BEGIN and the
    statement itself, not a pool checkout and reset each time.
    """

    def __init__(self, engine: Engine, *, read_threads: int = 4) -> None:
        self.engine = engine
        self._writer_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._readers = ThreadPoolExecutor(read_threads, thread_name_prefix="crewdb-db-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="crewdb-db-write")
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False

    async def read(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in a read transaction (one consistent snapshot) on a reader thread.

        Raises:
            UnavailableError: the database could not be reached or is locked for too long.
        """
        return await in_thread(self._readers, self._run, self.engine, work, None)

    def read_now(self, work: Callable[[Connection], T]) -> T:
        """Runs a bounded read (an index lookup or a capped range scan) on the calling thread.

        For the event loop's hot paths: in WAL mode a reader never waits for the writer, so
        such a read takes tens of microseconds, less than the hop to a reader thread costs.
        Anything that scans (search, statistics, exports) goes through `read` instead.

        Raises:
            UnavailableError: the database could not be reached or is locked for too long.
        """
        return self._run(self.engine, work, None)

    async def write(
        self,
        work: Callable[[Connection], T],
        after_commit: Callable[[T], Any] | None = None,
    ) -> T:
        """Runs `work` in a write transaction on the writer thread and commits it.

        `after_commit` runs on the writer thread right after the commit, before the next
        write starts, so callbacks see commits in commit order.

        Raises:
            UnavailableError: the database could not be reached or is locked for too long.
        """
        return await in_thread(self._writer, self._run, self._writer_engine, work, after_commit)

    def read_sync(self, work: Callable[[Connection], T]) -> T:
        """`read` for code that is not on the event loop (CLI commands, tests)."""
        return self._readers.submit(
            contextvars.copy_context().run, self._run, self.engine, work, None
        ).result()

    def write_sync(self, work: Callable[[Connection], T]) -> T:
        """`write` for code that is not on the event loop (CLI commands, tests)."""
        return self._writer.submit(
            contextvars.copy_context().run, self._run, self._writer_engine, work, None
        ).result()

    async def ping(self) -> None:
        """Raises UnavailableError unless the database answers `SELECT 1`.

        Runs on the loop's own connection, not a reader thread: a health probe must not wait
        in line behind long searches and exports and be mistaken for an outage. `SELECT 1`
        touches no table, so it never waits on a lock.
        """
        self.read_now(lambda conn: conn.exec_driver_sql("SELECT 1").scalar_one())

    def close(self) -> None:
        self._closed = True
        self._readers.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True)
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self.engine.dispose()

    def _connection(self, engine: Engine) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.invalidated:
            conn = engine.connect()
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    def _discard_connection(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._connections_lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            with contextlib.suppress(Exception):
                conn.close()

    def _run(
        self,
        engine: Engine,
        work: Callable[[Connection], T],
        after_commit: Callable[[T], Any] | None,
    ) -> T:
        if self._closed:
            raise UnavailableError("database is closed (server shutting down)")
        try:
            conn = self._connection(engine)
            with conn.begin():
                result = work(conn)
        except (DBAPIError, sqlite3.OperationalError) as error:
            failure = _as_domain_error(error)
            if failure is not error:
                self._discard_connection()
                raise failure from error
            raise
        if after_commit is not None:
            after_commit(result)
        return result
