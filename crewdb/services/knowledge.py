"""The knowledge base use cases: add, search, read and delete an owner's documents (services layer).

SQLite's `documents` table is the source of truth; Chroma holds the chunks' vectors. A write
puts the new chunks into Chroma first, under a new revision, then commits the document in
SQLite, then deletes the old revision's chunks. A search keeps only chunks of the revision
SQLite holds (and of its chunk count), so a write that fails half-way is never visible: the
caller sees either the old document or the new one. Revisions are never used twice, not even
for a document deleted and added again (each is the write's time in microseconds, and more
than the stored one): a late Chroma call of an earlier write can never touch the chunks of a
later one. An owner's writes are serialised (one lock per owner) and, once they start changing
stores, run to the end even if the caller gives up: a cancelled write must not release the
lock while its threads still write.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from crewdb.clock import Clock, microseconds
from crewdb.db import documents as queries
from crewdb.db.engine import Database
from crewdb.errors import FieldViolation, NotFoundError, UnavailableError
from crewdb.models import (
    AddedDocument,
    Chunk,
    ChunkHit,
    Document,
    NewDocument,
    Page,
    Principal,
    SearchMode,
    VectorStats,
)
from crewdb.services.pagination import PageTokens, check_page_size, page_size
from crewdb.services.validation import raise_if
from crewdb.threads import in_thread
from crewdb.vectors.chunking import Chunker
from crewdb.vectors.embedders import Embedder, Vector
from crewdb.vectors.filters import (
    Scalar,
    Where,
    check_metadata,
    has_control_characters,
    stored_metadata,
    to_where,
)
from crewdb.vectors.store import StoredChunk, VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DOCUMENT_NOT_FOUND = "DOCUMENT_NOT_FOUND"
MAX_DOCUMENTS_PER_CALL = 100
MAX_DELETE_IDS = 1000
MAX_DOCUMENT_ID = 256
MAX_TEXT = 1_000_000
MAX_TITLE = 500
MAX_QUERY = 2000
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
RRF_K = 60
# Texts embedded per trip to a thread (see `_embed`); a few seconds of work at most.
EMBED_SLICE = 64
# Chunks Chroma returns beyond top_k, for those of a revision a failed write left behind.
_STALE_SLACK = 10
_LIST_DEFAULT, _LIST_MAX = 50, 200
_LIST_SCOPE = "documents"


class KnowledgeBase:
    """Documents per owner: chunked, embedded, stored in Chroma, described in SQLite."""

    def __init__(
        self,
        db: Database,
        store: VectorStore,
        embedder: Embedder,
        *,
        chunker: Chunker,
        page_tokens: PageTokens,
        clock: Clock,
        embed_threads: int = 2,
    ) -> None:
        self._db = db
        self._store = store
        self._embedder = embedder
        self._chunker = chunker
        self._page_tokens = page_tokens
        self._clock = clock
        self._embed_pool = ThreadPoolExecutor(embed_threads, thread_name_prefix="crewdb-embed")
        # Queries get a thread of their own: a search must not wait behind a large upload.
        self._query_pool = ThreadPoolExecutor(1, thread_name_prefix="crewdb-embed-query")
        self._owner_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._writes: set[asyncio.Task[Any]] = set()

    def close(self) -> None:
        # Not waiting: an embedding whose caller gave up finishes on its own and is dropped.
        self._embed_pool.shutdown(wait=False, cancel_futures=True)
        self._query_pool.shutdown(wait=False, cancel_futures=True)
        self._embedder.close()

    async def drain(self, grace: float | None) -> None:
        """Waits up to `grace` seconds (None: as long as it takes) for the writes whose callers
        gave up (they run to the end); for shutdown. What still runs then is left to the
        start-up check."""
        if not self._writes:
            return
        _, pending = await asyncio.wait(set(self._writes), timeout=grace)
        if pending:
            log.warning(
                "%d knowledge base writes still running at shutdown are abandoned; the start-up "
                "check makes Chroma agree with SQLite again",
                len(pending),
            )

    # --- writes -------------------------------------------------------------------------------

    async def add(self, caller: Principal, inputs: Sequence[NewDocument]) -> list[AddedDocument]:
        """Adds or replaces documents, all or none.

        Raises:
            InvalidArgumentError: a document is malformed (every bad field is named).
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH) the owner's vectors were made by
                another model.
            UnavailableError: the embedder or the vector store failed; nothing was changed.
        """
        _check_documents(inputs)
        model = self._embedder.model
        # Off the event loop: a call may carry megabytes of text.
        splits = await in_thread(self._embed_pool, lambda: [self._chunker.split(d.text) for d in inputs])
        chunked = list(zip(inputs, splits, strict=True))
        texts = [chunk.text for _, chunks in chunked for chunk in chunks]
        vectors = await self._embed(texts)
        owner = caller.user_id
        return await self._exclusive(owner, lambda: self._write(owner, model, chunked, vectors))

    async def _write(
        self,
        owner: str,
        model: str,
        chunked: list[tuple[NewDocument, list[Chunk]]],
        vectors: list[Vector],
    ) -> list[AddedDocument]:
        """The store-changing half of `add`, under the owner's lock."""
        stored = await self._db.read(lambda conn: queries.versions(conn, owner, [d.id for d, _ in chunked]))
        now = self._clock.now()
        records: list[tuple[Document, list[Chunk]]] = []
        ids: list[str] = []
        texts: list[str] = []
        metadatas: list[dict[str, Scalar]] = []
        for doc, chunks in chunked:
            old = stored.get(doc.id)
            record = Document(
                id=doc.id,
                owner_id=owner,
                title=doc.title,
                metadata=doc.metadata,
                text=doc.text,
                chunk_count=len(chunks),
                char_count=len(doc.text),
                revision=max(old.revision + 1 if old else 1, microseconds(now)),
                embedding_model=model,
                created_at=now,
                updated_at=now,
            )
            records.append((record, chunks))
            for chunk in chunks:
                ids.append(_chunk_key(doc.id, chunk.index, record.revision))
                texts.append(chunk.text)
                metadatas.append(_chunk_metadata(record, chunk))
        try:
            await self._store.upsert(
                owner, model, ids=ids, embeddings=vectors, texts=texts, metadatas=metadatas
            )

            def save(conn: Any) -> list[bool]:
                return [queries.save_document(conn, record, chunks) for record, chunks in records]

            replaced = await self._db.write(save)
        except BaseException as error:
            # The new revision is not current, so its chunks are invisible (some may still
            # arrive from a timed-out Chroma call; the revision is never used again). A failed
            # write transaction rolled back: what the new revision put into Chroma goes. Not so
            # after a cancellation (shutdown), when the commit may still land: the start-up
            # check deletes whatever SQLite does not hold.
            if not isinstance(error, asyncio.CancelledError):
                await self._forget_chunks(owner, ids)
            raise
        await self._forget_chunks(owner, _keys(stored))
        return [
            AddedDocument(record.id, record.chunk_count, was_replaced)
            for (record, _), was_replaced in zip(records, replaced, strict=True)
        ]

    async def delete(self, caller: Principal, ids: Sequence[str], filter_: dict[str, Any]) -> list[str]:
        """Deletes the caller's documents named by `ids`, or those whose metadata matches `filter_`.

        Returns the ids deleted (those that existed).

        Raises:
            InvalidArgumentError: neither or both of ids and filter, or a malformed one.
            UnavailableError: the vector store failed; nothing was deleted.
        """
        violations: list[FieldViolation] = []
        if bool(ids) == bool(filter_):
            violations.append(FieldViolation("ids", "give either ids or a non-empty filter, not both"))
        if len(ids) > MAX_DELETE_IDS:
            violations.append(FieldViolation("ids", f"at most {MAX_DELETE_IDS} ids"))
        violations += [v for i, id_ in enumerate(ids) for v in _id_violations(f"ids[{i}]", id_)]
        where, filter_violations = to_where(filter_, "filter")
        raise_if(violations + filter_violations)
        owner = caller.user_id

        async def work() -> list[str]:
            targets = ids
            if where is not None:
                targets = await self._current_documents(owner, await self._store.matching(owner, where))
            # SQLite first: once the documents are gone there, their chunks are invisible, so a
            # failure deleting them from Chroma loses nothing (the start-up check removes them).
            deleted = await self._db.write(lambda conn: queries.delete_documents(conn, owner, targets))
            await self._forget_chunks(owner, _keys(deleted))
            return sorted(deleted)

        return await self._exclusive(owner, work)

    async def reembed(self, owner: str, document_id: str) -> int:
        """Embeds a stored document's chunks again and puts them into Chroma under its current
        revision (a restore uses this for documents whose vectors the backup could not hold).
        Returns the number of chunks; 0 if the document does not exist.

        Raises:
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH)
            UnavailableError: the embedder or the vector store failed.
        """
        document = await self._db.read(lambda conn: queries.get_document(conn, owner, document_id))
        if document is None:
            return 0
        chunks = await self._db.read(lambda conn: queries.chunks_of(conn, owner, document_id))
        vectors = await self._embed([chunk.text for chunk in chunks])

        async def put() -> int:
            # Under the lock, and only if the document is still the one embedded: a write that
            # came meanwhile has put its own chunks, which these must not overwrite.
            now = await self._db.read(lambda conn: queries.versions(conn, owner, [document_id]))
            if (version := now.get(document_id)) is None or version.revision != document.revision:
                return 0
            await self._store.upsert(
                owner,
                self._embedder.model,
                ids=[_chunk_key(document_id, chunk.index, document.revision) for chunk in chunks],
                embeddings=vectors,
                texts=[chunk.text for chunk in chunks],
                metadatas=[_chunk_metadata(document, chunk) for chunk in chunks],
            )
            return len(chunks)

        return await self._exclusive(owner, put)

    async def reconcile(self) -> Reconciliation:
        """Makes Chroma agree with SQLite, the source of truth: deletes chunks of documents or
        revisions SQLite does not hold (left by a crash or a failed write), and embeds again the
        documents whose chunks are missing. Run at start-up, in the background.

        Raises:
            UnavailableError: Chroma or the embedder failed (what was done so far stays done).
        """
        owners = set(await self._db.read(queries.owners)) | set(await self._store.owners())
        deleted = missing = reembedded = 0
        for owner in sorted(owners):
            async with self._owner_lock(owner):
                stored = await self._store.chunk_labels(owner)
                current = await self._db.read(lambda conn: queries.all_versions(conn, owner))  # noqa: B023
                live = set(_keys(current))
                stale = [key for key, _, _ in stored if key not in live]
                counts = Counter(doc for key, doc, _ in stored if key in live)
                incomplete = [doc for doc, version in current.items() if counts[doc] != version.chunk_count]
                await self._store.delete(owner, stale)
            deleted += len(stale)
            missing += len(incomplete)
            for document_id in incomplete:
                reembedded += await self.reembed(owner, document_id)
        return Reconciliation(len(owners), deleted, missing, reembedded)

    # --- reads --------------------------------------------------------------------------------

    async def search(
        self,
        caller: Principal,
        query: str,
        *,
        top_k: int = 0,
        filter_: dict[str, Any] | None = None,
        min_score: float = 0.0,
        mode: SearchMode = SearchMode.SEMANTIC,
    ) -> list[ChunkHit]:
        """The caller's chunks best matching `query`, best first, at most `top_k`.

        Raises:
            InvalidArgumentError: a malformed query, top_k, min_score or filter.
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH)
            UnavailableError: the embedder or the vector store failed.
        """
        violations: list[FieldViolation] = []
        if not query.strip():
            violations.append(FieldViolation("query", "required (not only whitespace)"))
        elif len(query) > MAX_QUERY:
            violations.append(FieldViolation("query", f"at most {MAX_QUERY} characters"))
        if top_k < 0:
            violations.append(FieldViolation("top_k", "must not be negative"))
        if not 0.0 <= min_score <= 1.0:  # also refuses NaN
            violations.append(FieldViolation("min_score", "must be from 0 to 1"))
        where, filter_violations = to_where(filter_ or {}, "filter")
        raise_if(violations + filter_violations)
        limit = min(top_k or DEFAULT_TOP_K, MAX_TOP_K)
        owner = caller.user_id
        if mode is SearchMode.SEMANTIC:
            hits = await self._semantic(owner, query, limit, where)
        elif mode is SearchMode.KEYWORD:
            hits = await self._keyword(owner, query, limit, where)
        else:
            # Each leg ranks more than it returns, so fusion has something to fuse.
            depth = max(limit * 2, 20)
            semantic, keyword = await asyncio.gather(
                self._semantic(owner, query, depth, where), self._keyword(owner, query, depth, where)
            )
            hits = _fuse(semantic, keyword)
        return [hit for hit in hits if hit.score >= min_score][:limit]

    async def get(self, caller: Principal, document_id: str) -> Document:
        """One of the caller's documents, with its text.

        Raises:
            InvalidArgumentError: the id is missing or malformed.
            NotFoundError: (DOCUMENT_NOT_FOUND) no such document of the caller's.
        """
        raise_if(_id_violations("id", document_id))
        owner = caller.user_id
        document = await self._db.read(lambda conn: queries.get_document(conn, owner, document_id))
        if document is None:
            raise NotFoundError(f"document {document_id!r} not found", reason=DOCUMENT_NOT_FOUND)
        return document

    async def list_documents(self, caller: Principal, size: int, token: str) -> Page[Document]:
        """The caller's documents, most recently changed first, without text.

        Raises:
            InvalidArgumentError: a negative page size, or a page token not issued for this listing.
        """
        raise_if(check_page_size(size))
        owner = caller.user_id
        scope = f"{_LIST_SCOPE}:{owner}"
        after = self._page_tokens.after(scope, token)
        limit = page_size(size, default=_LIST_DEFAULT, maximum=_LIST_MAX)
        rows = await self._db.read(lambda conn: queries.list_documents(conn, owner, after, limit + 1))
        return self._page_tokens.page(rows, limit, scope, queries.position)

    async def stats(self, caller: Principal) -> VectorStats:
        """The caller's counts, and how the knowledge base embeds and stores.

        Raises:
            UnavailableError: the database could not be read.
        """
        owner = caller.user_id
        documents, chunks = await self._db.read(lambda conn: queries.totals(conn, owner))
        return VectorStats(
            documents=documents,
            chunks=chunks,
            embedding_model=self._embedder.model,
            dimension=self._embedder.dimension or 0,
            collection=self._store.collection,
            distance="cosine",
            chunk_size=self._chunker.size,
            chunk_overlap=self._chunker.overlap,
        )

    # --- the legs of a search -----------------------------------------------------------------

    async def _semantic(self, owner: str, query: str, limit: int, where: Where | None) -> list[ChunkHit]:
        (vector,) = await self._embed([query], query=True)
        found = await self._store.query(owner, self._embedder.model, vector, limit + _STALE_SLACK, where)
        current = await self._versions(owner, [_document_of(chunk) for chunk in found])
        hits = []
        for chunk in found:
            version = current.get(_document_of(chunk))
            if version is None or not _is_current(chunk, version):
                continue
            hits.append(
                ChunkHit(
                    document_id=_document_of(chunk),
                    chunk_index=int(chunk.metadata.get("_idx", 0)),
                    start=int(chunk.metadata.get("_start", 0)),
                    end=int(chunk.metadata.get("_end", 0)),
                    text=chunk.text,
                    score=max(0.0, min(1.0, 1.0 - chunk.distance)),
                    title=version.title,
                    metadata=version.metadata,
                )
            )
        return hits[:limit]

    async def _keyword(self, owner: str, query: str, limit: int, where: Where | None) -> list[ChunkHit]:
        # Ranked in SQLite, with each chunk's document in the same read (a document deleted
        # meanwhile is simply not found); with a filter, more candidates are ranked and Chroma
        # says which match.
        depth = limit if where is None else max(limit * 5, 50)
        found = await self._db.read(lambda conn: queries.keyword_search(conn, owner, query, depth))
        if where is not None:
            keys = {_chunk_key(h.document_id, h.chunk_index, h.revision): h for h in found}
            matching = {chunk.id for chunk in await self._store.matching(owner, where, list(keys))}
            found = [hit for key, hit in keys.items() if key in matching]
        hits = []
        for hit in found:
            strength = -hit.rank  # BM25 as FTS5 reports it: more negative is better
            hits.append(
                ChunkHit(
                    document_id=hit.document_id,
                    chunk_index=hit.chunk_index,
                    start=hit.start,
                    end=hit.end,
                    text=hit.text,
                    score=max(0.0, strength / (1.0 + strength)),
                    title=hit.title,
                    metadata=hit.metadata,
                )
            )
        return hits[:limit]

    # --- helpers ------------------------------------------------------------------------------

    async def _embed(self, texts: list[str], *, query: bool = False) -> list[Vector]:
        # In slices, each its own trip to a thread: when the caller gives up, embedding stops
        # after the slice in progress instead of going through a whole upload for no one.
        pool = self._query_pool if query else self._embed_pool
        vectors: list[Vector] = []
        for start in range(0, len(texts), EMBED_SLICE):
            vectors += await in_thread(pool, self._embedder.embed, texts[start : start + EMBED_SLICE])
        if len(vectors) != len(texts):
            raise UnavailableError("the embedder returned the wrong number of vectors")
        return vectors

    async def _versions(self, owner: str, ids: list[str]) -> dict[str, queries.Version]:
        return await self._db.read(lambda conn: queries.versions(conn, owner, ids)) if ids else {}

    async def _current_documents(self, owner: str, chunks: list[StoredChunk]) -> list[str]:
        """The documents of those chunks that belong to the stored revision."""
        current = await self._versions(owner, [_document_of(chunk) for chunk in chunks])
        return sorted(
            {
                doc
                for chunk in chunks
                if (version := current.get(doc := _document_of(chunk))) is not None
                and _is_current(chunk, version)
            }
        )

    async def _forget_chunks(self, owner: str, keys: list[str]) -> None:
        """Deletes a replaced revision's chunks; if that fails they stay invisible (wrong revision)."""
        try:
            await self._store.delete(owner, keys)
        except UnavailableError:
            log.warning(
                "could not delete %d replaced chunks of owner %s; they are never returned", len(keys), owner
            )

    async def _exclusive(self, owner: str, work: Callable[[], Awaitable[T]]) -> T:
        """Runs `work` under the owner's lock, to the end even if the caller is cancelled: the
        lock is held until the last store has answered, so the next write sees what this one did."""

        async def locked() -> T:
            async with self._owner_lock(owner):
                return await work()

        task = asyncio.ensure_future(locked())
        self._writes.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Raised to the caller too, unless the caller had gone; then this is the only trace.
            log.debug("knowledge base write ended with %s", type(error).__name__)

    def _owner_lock(self, owner: str) -> asyncio.Lock:
        lock = self._owner_locks.get(owner)
        if lock is None:
            lock = self._owner_locks[owner] = asyncio.Lock()
        return lock


@dataclass(frozen=True, slots=True)
class Reconciliation:
    owners: int
    stale_chunks_deleted: int
    documents_incomplete: int
    chunks_embedded: int


def _chunk_key(document_id: str, index: int, revision: int) -> str:
    """Chroma's id for a chunk: unique per revision, so a new revision never overwrites the current one."""
    return f"{document_id}#{index}@{revision}"


def _chunk_metadata(document: Document, chunk: Chunk) -> dict[str, Scalar]:
    reserved: dict[str, Scalar] = {
        "_doc": document.id,
        "_idx": chunk.index,
        "_rev": document.revision,
        "_start": chunk.start,
        "_end": chunk.end,
    }
    return {**stored_metadata(document.metadata), **reserved}


def _keys(versions: dict[str, queries.Version]) -> list[str]:
    """The Chroma ids of these documents' chunks."""
    return [_chunk_key(doc, i, v.revision) for doc, v in versions.items() for i in range(v.chunk_count)]


def _is_current(chunk: StoredChunk, version: queries.Version) -> bool:
    """True if the chunk belongs to the stored revision (a failed write of the same revision
    number cannot have left it: revisions are not reused, and its index is within the count)."""
    index = chunk.metadata.get("_idx", -1)
    return (
        chunk.metadata.get("_rev") == version.revision
        and isinstance(index, int)
        and 0 <= index < version.chunk_count
    )


def _document_of(chunk: StoredChunk) -> str:
    return str(chunk.metadata.get("_doc", ""))


def _fuse(*rankings: list[ChunkHit]) -> list[ChunkHit]:
    """Reciprocal rank fusion, scaled so that first in every ranking scores 1."""
    best = len(rankings) / (RRF_K + 1)
    scores: dict[tuple[str, int], float] = {}
    hits: dict[tuple[str, int], ChunkHit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = (hit.document_id, hit.chunk_index)
            scores[key] = scores.get(key, 0.0) + 1.0 / (RRF_K + rank)
            hits.setdefault(key, hit)
    order = sorted(scores, key=lambda key: scores[key], reverse=True)
    return [replace(hits[key], score=scores[key] / best) for key in order]


def _id_violations(field: str, value: str) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(field, "required")]
    if len(value) > MAX_DOCUMENT_ID:
        return [FieldViolation(field, f"at most {MAX_DOCUMENT_ID} characters")]
    if has_control_characters(value):
        return [FieldViolation(field, "must not contain control characters")]
    return []


def _check_documents(inputs: Sequence[NewDocument]) -> None:
    """Raises InvalidArgumentError naming every bad field of every document."""
    violations: list[FieldViolation] = []
    if not 1 <= len(inputs) <= MAX_DOCUMENTS_PER_CALL:
        violations.append(FieldViolation("documents", f"1 to {MAX_DOCUMENTS_PER_CALL} documents"))
    seen: set[str] = set()
    for i, doc in enumerate(inputs):
        field = f"documents[{i}]"
        violations += _id_violations(f"{field}.id", doc.id)
        if doc.id in seen:
            violations.append(FieldViolation(f"{field}.id", "appears twice in this call"))
        seen.add(doc.id)
        if not doc.text.strip():
            violations.append(FieldViolation(f"{field}.text", "required (not only whitespace)"))
        elif len(doc.text) > MAX_TEXT:
            violations.append(FieldViolation(f"{field}.text", f"at most {MAX_TEXT:,} characters"))
        if len(doc.title) > MAX_TITLE:
            violations.append(FieldViolation(f"{field}.title", f"at most {MAX_TITLE} characters"))
        violations += check_metadata(doc.metadata, f"{field}.metadata")
    raise_if(violations)
