"""The database handle: pragmas on every connection, cascades, one writer, errors as domain errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from crewdb.clock import Clock
from crewdb.db import conversations as store
from crewdb.db.engine import Database, create_engine, sqlite_url
from crewdb.db.migrate import migrate
from crewdb.errors import UnavailableError
from crewdb.models import Message, MessageRole


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    engine = create_engine(sqlite_url(tmp_path / "app.db"))
    migrate(engine)
    database = Database(engine, read_threads=2)
    yield database
    database.close()


def _pragmas(conn: Connection) -> tuple[str, int, int, int]:
    def one(name: str) -> object:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar_one()

    return (one("journal_mode"), one("foreign_keys"), one("synchronous"), one("busy_timeout"))  # type: ignore[return-value]


def test_every_connection_has_wal_foreign_keys_normal_sync_and_busy_timeout(db: Database) -> None:
    for pragmas in (db.read_sync(_pragmas), db.write_sync(_pragmas)):
        journal, foreign_keys, synchronous, busy_timeout = pragmas
        assert journal == "wal"
        assert foreign_keys == 1
        assert synchronous == 1  # NORMAL
        assert busy_timeout > 0


def test_deleting_a_conversation_really_deletes_its_messages(db: Database) -> None:
    clock = Clock()

    def fill(conn: Connection) -> None:
        store.insert_conversation(conn, "c1", "t", clock.now(), owner=None)
        for i in range(3):
            store.insert_message(
                conn,
                message_id=f"m{i}",
                conversation_id="c1",
                role=MessageRole.USER,
                content="x",
                metadata=None,
                now=clock.now(),
                owner=None,
            )

    db.write_sync(fill)
    assert db.write_sync(lambda conn: store.delete_conversation(conn, "c1", owner=None))
    remaining = db.read_sync(lambda conn: conn.exec_driver_sql("SELECT count(*) FROM messages").scalar_one())
    assert remaining == 0


def test_writes_from_many_threads_all_land_once(db: Database) -> None:
    clock = Clock()
    db.write_sync(lambda conn: store.insert_conversation(conn, "c1", "t", clock.now(), owner=None))

    async def add_many() -> None:
        async def add(i: int) -> None:
            await db.write(
                lambda conn: store.insert_message(
                    conn,
                    message_id=f"m{i}",
                    conversation_id="c1",
                    role=MessageRole.USER,
                    content=str(i),
                    metadata=None,
                    now=clock.now(),
                    owner=None,
                )
            )

        await asyncio.gather(*(add(i) for i in range(200)))

    threads = [threading.Thread(target=asyncio.run, args=(add_many(),)) for _ in range(1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conversation = db.read_sync(lambda conn: store.get_conversation(conn, "c1", owner=None))
    assert conversation is not None
    assert conversation.message_count == 200
    listed = db.read_sync(lambda conn: store.list_messages(conn, "c1", None, None))
    assert len(listed) == 200
    assert [m.timestamp for m in listed] == sorted(m.timestamp for m in listed)


def test_a_database_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()  # a directory where the file should be
    database = Database(create_engine(sqlite_url(tmp_path / "dir.db")))
    try:
        with pytest.raises(UnavailableError):
            database.read_sync(lambda conn: conn.exec_driver_sql("SELECT 1").scalar_one())
    finally:
        database.close()


def test_a_clock_that_stepped_back_still_orders_new_messages_last(db: Database) -> None:
    """After a restart with a clock behind the stored messages, order is kept by adding just
    after the last message rather than at the (earlier) wall-clock time."""
    ahead = datetime.now(UTC) + timedelta(minutes=5)
    db.write_sync(lambda conn: store.insert_conversation(conn, "c1", "t", ahead, owner=None))

    def add(message_id: str, now: datetime) -> Message | None:
        return db.write_sync(
            lambda conn: store.insert_message(
                conn,
                message_id=message_id,
                conversation_id="c1",
                role=MessageRole.USER,
                content=message_id,
                metadata=None,
                now=now,
                owner=None,
            )
        )

    first = add("z-first", ahead)
    second = add("a-second", datetime.now(UTC))  # the clock is 5 minutes behind now
    assert first is not None
    assert second is not None
    assert second.timestamp > first.timestamp
    listed = db.read_sync(lambda conn: store.list_messages(conn, "c1", None, None))
    assert [m.id for m in listed] == ["z-first", "a-second"]


def test_a_schema_error_is_a_defect_not_unavailable(db: Database) -> None:
    with pytest.raises(OperationalError):
        db.read_sync(lambda conn: conn.exec_driver_sql("SELECT no_such_column FROM conversations").all())


def test_a_closed_database_is_unavailable(db: Database) -> None:
    db.close()
    with pytest.raises(UnavailableError):
        db.read_now(lambda conn: conn.exec_driver_sql("SELECT 1").scalar_one())
