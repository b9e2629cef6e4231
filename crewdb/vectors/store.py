"""ChromaDB behind the calls crewdb makes: a cosine collection per owner, embedded or served (vectors layer).

Each owner's chunks live in a collection of their own, `<collection>.<owner id>`: a search
reads only the owner's index, so no filter can reach another owner's chunks, and an owner's
search costs what their own collection costs (Chroma's `where` over one shared collection
took about 100 ms at 100k chunks). Each collection records the embedding model and dimension
its vectors were made with; a call with another model is refused, never mixed in.

Chroma's client is synchronous; every call runs on this store's threads and is bounded by
`timeout`. Anything that goes wrong talking to Chroma is `UnavailableError` (reason
VECTOR_STORE_UNAVAILABLE); the client is rebuilt on the next call, so a Chroma server that
comes back is used again without a restart.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from crewdb.errors import CrewdbError, FailedPreconditionError, UnavailableError
from crewdb.threads import in_thread
from crewdb.vectors.filters import Scalar, Where

log = logging.getLogger(__name__)
T = TypeVar("T")

VECTOR_STORE_UNAVAILABLE = "VECTOR_STORE_UNAVAILABLE"
DATA_IN_USE = "DATA_IN_USE"
# In an embedded store's folder: held (flock) by the one process that has the store open.
LOCK_FILE = "crewdb.lock"
EMBEDDING_MODEL_MISMATCH = "EMBEDDING_MODEL_MISMATCH"
# Chunks per upsert call: Chroma accepts thousands, but each call is bounded by the vector
# timeout, and inserting into a large index is slow on a small machine.
UPSERT_BATCH = 500
_MODEL_KEY = "crewdb_embedding_model"
_DIMENSION_KEY = "crewdb_embedding_dimension"


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as Chroma returns it; `distance` is the cosine distance (1 - similarity)."""

    id: str
    text: str
    metadata: dict[str, Scalar]
    distance: float = 0.0


@dataclass(frozen=True, slots=True)
class ExportedChunk:
    id: str
    text: str
    metadata: dict[str, Scalar]
    embedding: list[float]


@dataclass(frozen=True, slots=True)
class ExportBatch:
    """Chunks of one owner's collection, and the model its vectors were made with."""

    owner: str
    collection: str
    model: str
    dimension: int
    chunks: list[ExportedChunk]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    version: str
    latency: float


class VectorStore:
    """One Chroma client (embedded at `path`, or the server at `host:port`) and its collections."""

    def __init__(
        self,
        *,
        collection: str,
        path: Path | None = None,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 10.0,
        threads: int = 4,
    ) -> None:
        if (path is None) == (host is None):
            raise ValueError("give either a path (embedded) or a host (server)")
        self.collection = collection
        self._path = path
        self._host = host
        self._port = port or 8000
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="crewdb-chroma")
        # The health check's heartbeat has a thread of its own: busy vector traffic must not
        # make it time out and turn readiness off.
        self._probe_executor = ThreadPoolExecutor(1, thread_name_prefix="crewdb-chroma-probe")
        self._lock = threading.Lock()
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        # Set after a failure or time-out: the next call rebuilds the client (server mode).
        self._stale = False
        self._max_batch = 1000
        self._claim: IO[str] | None = None

    @property
    def location(self) -> str:
        return f"http://{self._host}:{self._port}" if self._host else str(self._path)

    def collection_name(self, owner: str) -> str:
        return f"{self.collection}.{owner}"

    def _owner_of(self, name: str) -> str | None:
        """The owner whose collection `name` is, or None for a collection that is not this store's
        (another deployment's collection `crewdb.team2.<owner>` is not `crewdb`'s)."""
        owner = name.removeprefix(f"{self.collection}.")
        return owner if owner != name and owner and "." not in owner else None

    def claim(self) -> None:
        """Embedded: takes the folder for this process, for as long as the store is open (two
        processes writing one embedded Chroma corrupt it). Does nothing for a Chroma server.

        Raises:
            FailedPreconditionError: (DATA_IN_USE) another process holds the folder.
        """
        if self._path is None or self._claim is not None:
            return
        try:
            self._path.mkdir(parents=True, exist_ok=True)
            handle = (self._path / LOCK_FILE).open("a+")
        except OSError as error:
            raise FailedPreconditionError(
                f"VECTOR_DB_PATH={self._path} cannot be used: {error.strerror or error}",
                reason=VECTOR_STORE_UNAVAILABLE,
            ) from error
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise FailedPreconditionError(
                f"VECTOR_DB_PATH={self._path} is in use by process {holder} (an embedded Chroma may be "
                "opened by one process only): stop that process, or give this one other data paths",
                reason=DATA_IN_USE,
            ) from None
        except OSError as error:  # a file system without locks (some network ones)
            log.warning("cannot lock %s (%s): nothing keeps a second process off it", self._path, error)
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._claim = handle

    # --- the calls ----------------------------------------------------------------------------

    async def upsert(
        self,
        owner: str,
        model: str,
        *,
        ids: Sequence[str],
        embeddings: Sequence[Sequence[float]],
        texts: Sequence[str],
        metadatas: Sequence[dict[str, Scalar]],
    ) -> None:
        """Adds or replaces chunks, in batches (each call to Chroma has its own time limit, so a
        large upsert is not mistaken for an outage).

        Raises:
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH) the owner's collection holds
                vectors of another model or dimension.
            UnavailableError: (VECTOR_STORE_UNAVAILABLE) Chroma failed or did not answer in time.
        """
        if not ids:
            return
        collection = await self._run(lambda: self._collection(owner, model, len(embeddings[0]), create=True))
        size = min(self._max_batch, UPSERT_BATCH)
        for start in range(0, len(ids), size):
            batch = slice(start, start + size)

            def write(batch: slice = batch) -> None:
                collection.upsert(
                    ids=list(ids[batch]),
                    embeddings=[list(e) for e in embeddings[batch]],
                    documents=list(texts[batch]),
                    metadatas=list(metadatas[batch]),
                )

            await self._run(write)

    async def delete(self, owner: str, ids: Sequence[str]) -> None:
        """Deletes chunks by id; ids that do not exist are ignored.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """
        if not ids:
            return

        def work() -> None:
            collection = self._collection(owner, None, None, create=False)
            if collection is not None:
                for start in range(0, len(ids), self._max_batch):
                    collection.delete(ids=list(ids[start : start + self._max_batch]))

        await self._run(work)

    async def query(
        self, owner: str, model: str, embedding: Sequence[float], limit: int, where: Where | None
    ) -> list[StoredChunk]:
        """The owner's `limit` chunks nearest to `embedding` that match `where`, nearest first.

        Raises:
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH)
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> list[StoredChunk]:
            collection = self._collection(owner, model, len(embedding), create=False)
            if collection is None:
                return []
            found = collection.query(
                query_embeddings=[list(embedding)],
                n_results=limit,
                where=where,
                include=["documents", "metadatas", "distances"],
            )
            return [
                StoredChunk(id_, text or "", dict(metadata or {}), distance)
                for id_, text, metadata, distance in zip(
                    found["ids"][0],
                    found["documents"][0],
                    found["metadatas"][0],
                    found["distances"][0],
                    strict=True,
                )
            ]

        return await self._run(work)

    async def matching(self, owner: str, where: Where, ids: Sequence[str] | None = None) -> list[StoredChunk]:
        """The owner's chunks (of `ids`, if given) whose metadata matches `where`, without text.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> list[StoredChunk]:
            collection = self._collection(owner, None, None, create=False)
            if collection is None:
                return []
            found = collection.get(
                ids=list(ids) if ids is not None else None, where=where, include=["metadatas"]
            )
            return [
                StoredChunk(id_, "", dict(metadata or {}))
                for id_, metadata in zip(found["ids"], found["metadatas"], strict=True)
            ]

        if ids is not None and not ids:
            return []
        return await self._run(work)

    async def count(self, owner: str) -> int:
        """How many chunks the owner's collection holds.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> int:
            collection = self._collection(owner, None, None, create=False)
            return 0 if collection is None else int(collection.count())

        return await self._run(work)

    async def heartbeat(self) -> Heartbeat:
        """Chroma's version and how long a heartbeat took.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> Heartbeat:
            started = time.perf_counter()
            client = self._connect()
            client.heartbeat()
            return Heartbeat(str(client.get_version()), time.perf_counter() - started)

        return await self._run(work, self._probe_executor)

    async def details(self) -> dict[str, Any]:
        """What the health report shows: mode, location, version, collections and chunks.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> dict[str, Any]:
            client = self._connect()
            collections = [c for c in client.list_collections() if self._owner_of(c.name)]
            return {
                "mode": "server" if self._host else "embedded",
                "location": self.location,
                "version": str(client.get_version()),
                "collections": len(collections),
                "chunks": sum(int(c.count()) for c in collections),
            }

        return await self._run(work)

    async def export(self, batch_size: int) -> AsyncIterator[ExportBatch]:
        """Every owner's chunks with their vectors, collection by collection, `batch_size` at a time.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def names() -> list[str]:
            return sorted(c.name for c in self._connect().list_collections() if self._owner_of(c.name))

        def page(name: str, offset: int) -> ExportBatch:
            collection = self._connect().get_collection(name, embedding_function=None)
            found = collection.get(
                include=["embeddings", "documents", "metadatas"], limit=batch_size, offset=offset
            )
            metadata = collection.metadata or {}
            chunks = [
                ExportedChunk(id_, text or "", dict(meta or {}), [float(x) for x in vector])
                for id_, text, meta, vector in zip(
                    found["ids"], found["documents"], found["metadatas"], found["embeddings"], strict=True
                )
            ]
            return ExportBatch(
                owner=self._owner_of(name) or "",
                collection=name,
                model=str(metadata.get(_MODEL_KEY, "")),
                dimension=int(metadata.get(_DIMENSION_KEY, 0)),
                chunks=chunks,
            )

        for name in await self._run(names):
            offset = 0
            while True:
                batch = await self._run(lambda: page(name, offset))  # noqa: B023 - awaited at once
                if batch.chunks:
                    yield batch
                if len(batch.chunks) < batch_size:
                    break
                offset += batch_size

    async def restore(self, batch: ExportBatch) -> None:
        """Writes exported chunks back into their owner's collection (created with its model).

        Raises:
            FailedPreconditionError: (EMBEDDING_MODEL_MISMATCH) the collection exists with another model.
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """
        if not batch.chunks:
            return
        await self.upsert(
            batch.owner,
            batch.model,
            ids=[c.id for c in batch.chunks],
            embeddings=[c.embedding for c in batch.chunks],
            texts=[c.text for c in batch.chunks],
            metadatas=[c.metadata for c in batch.chunks],
        )

    async def owners(self) -> list[str]:
        """The owners that have a collection.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> list[str]:
            return [owner for c in self._connect().list_collections() if (owner := self._owner_of(c.name))]

        return await self._run(work)

    async def chunk_labels(self, owner: str, batch_size: int = 1000) -> list[tuple[str, str, int]]:
        """(chunk id, document id, revision) of every chunk in the owner's collection.

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def page(offset: int) -> list[tuple[str, str, int]]:
            collection = self._collection(owner, None, None, create=False)
            if collection is None:
                return []
            found = collection.get(include=["metadatas"], limit=batch_size, offset=offset)
            return [
                (id_, str((meta or {}).get("_doc", "")), int((meta or {}).get("_rev", 0)))
                for id_, meta in zip(found["ids"], found["metadatas"], strict=True)
            ]

        labels: list[tuple[str, str, int]] = []
        while True:
            found = await self._run(lambda: page(len(labels)))  # noqa: B023 - awaited at once
            labels += found
            if len(found) < batch_size:
                return labels

    async def is_empty(self) -> bool:
        """True when no collection of this store's name exists (a safe target for a restore).

        Raises:
            UnavailableError: (VECTOR_STORE_UNAVAILABLE)
        """

        def work() -> bool:
            return not any(self._owner_of(c.name) for c in self._connect().list_collections())

        return await self._run(work)

    def close(self) -> None:
        """Stops the threads and releases the client (embedded: closes its files)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._probe_executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._forget_client()
        if self._claim is not None:
            self._claim.close()  # releases the flock
            self._claim = None

    # --- plumbing -----------------------------------------------------------------------------

    async def _run(self, work: Callable[[], T], executor: ThreadPoolExecutor | None = None) -> T:
        future = in_thread(executor or self._executor, self._guarded, work)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            # Only a flag: the loop must never wait for `_lock`, which a thread stuck on a hung
            # Chroma may hold.
            self._stale = True
            raise UnavailableError(
                f"the vector store at {self.location} did not answer in {self._timeout:g}s",
                reason=VECTOR_STORE_UNAVAILABLE,
            ) from None

    def _guarded(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except CrewdbError:
            raise
        except Exception as error:  # chromadb, httpx and its Rust core raise many unrelated types
            log.warning("vector store call failed: %s: %s", type(error).__name__, error)
            self._stale = True
            raise UnavailableError(
                f"the vector store at {self.location} failed: {type(error).__name__}",
                reason=VECTOR_STORE_UNAVAILABLE,
            ) from error

    def _connect(self) -> Any:
        # Bounded: a thread stuck connecting to a hung server holds the lock; the others give up.
        if not self._lock.acquire(timeout=self._timeout):
            raise UnavailableError(
                f"the vector store at {self.location} is not answering (still connecting)",
                reason=VECTOR_STORE_UNAVAILABLE,
            )
        try:
            if self._stale and self._host is not None:
                self._forget_client()  # after a failure, connect afresh: the server may be back
            self._stale = False
            if self._client is None:
                self._client = self._make_client()
                try:
                    self._max_batch = int(self._client.get_max_batch_size())
                except Exception:  # noqa: BLE001 - older servers do not say; 1000 is safe
                    self._max_batch = 1000
            return self._client
        finally:
            self._lock.release()

    def _make_client(self) -> Any:
        import chromadb  # noqa: PLC0415 - heavy; imported on first use so the server starts fast
        from chromadb.config import Settings  # noqa: PLC0415

        settings = Settings(anonymized_telemetry=False)
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)
            return chromadb.PersistentClient(path=str(self._path), settings=settings)
        # chromadb's HTTP client waits forever (no timeout) and talks to the server in its
        # constructor: ask first, with a bound, whether anything answers at all.
        _heartbeat(self.location, self._timeout)
        client = chromadb.HttpClient(host=self._host or "", port=self._port, settings=settings)
        _bound_http_timeout(client, self._timeout)
        return client

    def _collection(self, owner: str, model: str | None, dimension: int | None, *, create: bool) -> Any:
        """The owner's collection (None if it does not exist and `create` is false), checked
        against `model` and `dimension` when they are given."""
        client = self._connect()
        name = self.collection_name(owner)
        collection = self._collections.get(name)
        if collection is None:
            from chromadb.errors import NotFoundError  # noqa: PLC0415

            if create:
                collection = client.get_or_create_collection(
                    name,
                    metadata={_MODEL_KEY: model, _DIMENSION_KEY: dimension},
                    configuration={"hnsw": {"space": "cosine"}},
                    embedding_function=None,
                )
            else:
                try:
                    collection = client.get_collection(name, embedding_function=None)
                except NotFoundError:
                    return None
            self._collections[name] = collection
        if model is not None:
            _check_model(name, collection.metadata or {}, model, dimension)
        return collection

    def _forget_client(self) -> None:
        client, self._client = self._client, None
        self._collections.clear()
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("closing the Chroma client failed", exc_info=True)


def _check_model(name: str, metadata: dict[str, Any], model: str, dimension: int | None) -> None:
    stored_model, stored_dimension = metadata.get(_MODEL_KEY), metadata.get(_DIMENSION_KEY)
    if stored_model != model or (dimension is not None and stored_dimension != dimension):
        raise FailedPreconditionError(
            f"collection {name!r} holds vectors of model {stored_model!r} ({stored_dimension} dimensions), "
            f"not of the configured {model!r} ({dimension} dimensions); they are never mixed: "
            "configure that model again, or re-add the documents into a new collection (CHROMA_COLLECTION)",
            reason=EMBEDDING_MODEL_MISMATCH,
        )


def _heartbeat(url: str, timeout: float) -> None:
    """Raises if the Chroma server at `url` does not answer its heartbeat within `timeout`."""
    import httpx  # noqa: PLC0415

    httpx.get(
        f"{url}/api/v2/heartbeat", timeout=httpx.Timeout(timeout, connect=min(3.0, timeout))
    ).raise_for_status()


def _bound_http_timeout(client: Any, timeout: float) -> None:
    """Chroma's HTTP client waits forever by default; a hung server must not hold a thread for good."""
    import httpx  # noqa: PLC0415

    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout, connect=min(3.0, timeout))
