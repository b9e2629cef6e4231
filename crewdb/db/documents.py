"""Queries over the knowledge base's documents and chunks, and keyword search over the chunks (db layer)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection

from crewdb.clock import format_timestamp, parse_timestamp
from crewdb.db.schema import document_chunks, documents
from crewdb.models import Chunk, Document, JsonObject

Position = tuple[str, str]

# The FTS5 table made by migration 0007; not in schema.metadata (it is a SQLite virtual table).
_fts = Table("document_chunks_fts", MetaData(), Column("rowid", Integer), Column("text", Text))
_FTS_RANK = func.bm25(literal_column("document_chunks_fts"))
# Keyword search looks for each word of the query; more than this many words add little.
MAX_QUERY_WORDS = 32
_WORDS = re.compile(r"\w+")

_SUMMARY_COLUMNS = (
    documents.c.id,
    documents.c.owner_id,
    documents.c.title,
    documents.c.metadata,
    documents.c.chunk_count,
    documents.c.char_count,
    documents.c.revision,
    documents.c.embedding_model,
    documents.c.created_at,
    documents.c.updated_at,
)
_OWNED = documents.c.owner_id == bindparam("p_owner")
_GET = select(*_SUMMARY_COLUMNS, documents.c.text).where(_OWNED, documents.c.id == bindparam("p_id"))
_LIST = (
    select(*_SUMMARY_COLUMNS)
    .where(_OWNED)
    .order_by(documents.c.updated_at.desc(), documents.c.id.desc())
    .limit(bindparam("p_limit"))
)
_AFTER = tuple_(documents.c.updated_at, documents.c.id) < tuple_(
    bindparam("p_updated_at"), bindparam("p_after_id")
)
_VERSIONS = select(
    documents.c.id, documents.c.revision, documents.c.chunk_count, documents.c.title, documents.c.metadata
).where(_OWNED, documents.c.id.in_(bindparam("p_ids", expanding=True)))
_CREATED = select(documents.c.created_at).where(_OWNED, documents.c.id == bindparam("p_id"))
_DELETE_CHUNKS = delete(document_chunks).where(
    document_chunks.c.owner_id == bindparam("p_owner"), document_chunks.c.document_id == bindparam("p_id")
)
_KEYWORD = (
    select(
        document_chunks.c.document_id,
        document_chunks.c.chunk_index,
        document_chunks.c.start_offset,
        document_chunks.c.end_offset,
        document_chunks.c.text,
        _FTS_RANK.label("rank"),
        documents.c.revision,
        documents.c.title,
        documents.c.metadata,
    )
    .select_from(
        _fts.join(document_chunks, document_chunks.c.id == _fts.c.rowid).join(
            documents,
            (documents.c.owner_id == document_chunks.c.owner_id)
            & (documents.c.id == document_chunks.c.document_id),
        )
    )
    .where(literal_column("document_chunks_fts").match(bindparam("p_query")))
    .where(document_chunks.c.owner_id == bindparam("p_owner"))
    .order_by(literal_column("rank"))
    .limit(bindparam("p_limit"))
)


@dataclass(frozen=True, slots=True)
class Version:
    """What a search needs to know of a stored document: which chunks are current, and its labels."""

    revision: int
    chunk_count: int
    title: str
    metadata: JsonObject


@dataclass(frozen=True, slots=True)
class KeywordHit:
    """A chunk keyword search found, with its document's labels read in the same query."""

    document_id: str
    chunk_index: int
    start: int
    end: int
    text: str
    # FTS5's BM25: lower (more negative) is better.
    rank: float
    revision: int
    title: str
    metadata: JsonObject


def position(document: Document) -> Position:
    return format_timestamp(document.updated_at), document.id


def _document(row: Any, text: str = "") -> Document:
    return Document(
        id=row.id,
        owner_id=row.owner_id,
        title=row.title,
        metadata=json.loads(row.metadata),
        text=text,
        chunk_count=row.chunk_count,
        char_count=row.char_count,
        revision=row.revision,
        embedding_model=row.embedding_model,
        created_at=parse_timestamp(row.created_at),
        updated_at=parse_timestamp(row.updated_at),
    )


def owners(conn: Connection) -> list[str]:
    """Every account that has documents."""
    return list(conn.execute(select(documents.c.owner_id).distinct()).scalars())


def all_versions(conn: Connection, owner: str) -> dict[str, Version]:
    """The stored version of each of the owner's documents."""
    rows = conn.execute(
        select(
            documents.c.id,
            documents.c.revision,
            documents.c.chunk_count,
            documents.c.title,
            documents.c.metadata,
        ).where(documents.c.owner_id == owner)
    ).all()
    return {
        row.id: Version(row.revision, row.chunk_count, row.title, json.loads(row.metadata)) for row in rows
    }


def get_document(conn: Connection, owner: str, document_id: str) -> Document | None:
    row = conn.execute(_GET, {"p_owner": owner, "p_id": document_id}).first()
    return _document(row, row.text) if row else None


def list_documents(conn: Connection, owner: str, after: Position | None, limit: int) -> list[Document]:
    """Most recently added or replaced first, without their text."""
    statement = _LIST
    params: dict[str, Any] = {"p_owner": owner, "p_limit": limit}
    if after is not None:
        statement = statement.where(_AFTER)
        params |= {"p_updated_at": after[0], "p_after_id": after[1]}
    return [_document(row) for row in conn.execute(statement, params).all()]


def versions(conn: Connection, owner: str, ids: Sequence[str]) -> dict[str, Version]:
    """The stored version of each of `ids` that exists."""
    if not ids:
        return {}
    rows = conn.execute(_VERSIONS, {"p_owner": owner, "p_ids": list(set(ids))}).all()
    return {
        row.id: Version(row.revision, row.chunk_count, row.title, json.loads(row.metadata)) for row in rows
    }


def save_document(conn: Connection, document: Document, chunks: Sequence[Chunk]) -> bool:
    """Inserts the document, or replaces the stored one and all its chunks; True if it replaced."""
    keys = {"p_owner": document.owner_id, "p_id": document.id}
    created = conn.execute(_CREATED, keys).scalar()
    values = {
        "title": document.title,
        "metadata": json.dumps(document.metadata, separators=(",", ":")),
        "text": document.text,
        "chunk_count": document.chunk_count,
        "char_count": document.char_count,
        "revision": document.revision,
        "embedding_model": document.embedding_model,
        "updated_at": format_timestamp(document.updated_at),
    }
    if created is None:
        conn.execute(
            insert(documents).values(
                owner_id=document.owner_id,
                id=document.id,
                created_at=format_timestamp(document.created_at),
                **values,
            )
        )
    else:
        conn.execute(_DELETE_CHUNKS, keys)
        conn.execute(
            update(documents)
            .where(documents.c.owner_id == document.owner_id, documents.c.id == document.id)
            .values(**values)
        )
    if chunks:
        conn.execute(
            insert(document_chunks),
            [
                {
                    "owner_id": document.owner_id,
                    "document_id": document.id,
                    "chunk_index": chunk.index,
                    "start_offset": chunk.start,
                    "end_offset": chunk.end,
                    "text": chunk.text,
                }
                for chunk in chunks
            ],
        )
    return created is not None


def delete_documents(conn: Connection, owner: str, ids: Sequence[str]) -> dict[str, Version]:
    """Deletes those of `ids` that exist (their chunks go with them); returns what was deleted."""
    deleted = versions(conn, owner, ids)
    if deleted:
        conn.execute(
            delete(documents).where(documents.c.owner_id == owner, documents.c.id.in_(list(deleted)))
        )
    return deleted


def keyword_search(conn: Connection, owner: str, query: str, limit: int) -> list[KeywordHit]:
    """The owner's chunks containing any word of `query`, best BM25 first.

    Each word is quoted for FTS5, so the query is only ever words: no FTS syntax gets through.
    """
    words = _WORDS.findall(query)[:MAX_QUERY_WORDS]
    if not words:
        return []
    match = " OR ".join(f'"{word}"' for word in words)
    rows = conn.execute(_KEYWORD, {"p_query": match, "p_owner": owner, "p_limit": limit}).all()
    return [KeywordHit(*row[:-1], json.loads(row.metadata)) for row in rows]


def chunks_of(conn: Connection, owner: str, document_id: str) -> list[Chunk]:
    """A stored document's chunks, in order."""
    rows = conn.execute(
        select(
            document_chunks.c.chunk_index,
            document_chunks.c.start_offset,
            document_chunks.c.end_offset,
            document_chunks.c.text,
        )
        .where(document_chunks.c.owner_id == owner, document_chunks.c.document_id == document_id)
        .order_by(document_chunks.c.chunk_index)
    ).all()
    return [Chunk(row[0], row[1], row[2], row[3]) for row in rows]


def totals(conn: Connection, owner: str) -> tuple[int, int]:
    """The owner's documents and chunks."""
    row = conn.execute(
        select(func.count(), func.coalesce(func.sum(documents.c.chunk_count), 0)).where(
            documents.c.owner_id == owner
        )
    ).one()
    return int(row[0]), int(row[1])
