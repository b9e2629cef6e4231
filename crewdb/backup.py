"""`crewdb backup` and `crewdb restore`: SQLite's online copy plus every Chroma chunk, checked by a manifest.

A backup folder holds:
  app.db          SQLite's online backup (one read transaction: the database as of one moment)
  vectors.jsonl   one chunk per line: owner, collection, model, dimension, id, text, metadata,
                  embedding; only chunks of the documents (and revisions) in app.db
  manifest.json   format, times, crewdb version, schema revision, each file's size and
                  SHA-256, row counts per table, chunk counts, and the documents whose vectors
                  changed between the copy and the export (`reembed`: a restore embeds them
                  again from their text in app.db)

The copy of SQLite comes first, then the chunks are exported: a chunk written after the copy
belongs to a revision the copy does not have and is left out, so the two always agree. The
manifest is written last and everything is fsynced (files, then the folder) before `backup`
returns: a folder with a manifest is a whole backup, one without it is not a backup.

An embedded Chroma must be opened by one process only (two corrupt it): a command that opens
one itself first takes its folder (`VectorStore.claim`), as the server does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crewdb.db.backup import CopyContents, contents, online_copy
from crewdb.errors import FailedPreconditionError
from crewdb.services.knowledge import KnowledgeBase
from crewdb.vectors.store import ExportBatch, ExportedChunk, VectorStore

log = logging.getLogger(__name__)

FORMAT = 1
DB_FILE, VECTORS_FILE, MANIFEST_FILE = "app.db", "vectors.jsonl", "manifest.json"
_RESERVED_INTS = ("_idx", "_rev", "_start", "_end")
_RESTORE_BATCH = 500

Progress = Callable[[int], object]


@dataclass(frozen=True, slots=True)
class BackupSummary:
    rows: dict[str, int]
    chunks: int
    reembed: int


async def backup(
    database: Path, destination: Path, export: AsyncIterator[ExportBatch], progress: Progress | None = None
) -> BackupSummary:
    """Writes a backup of `database` and the exported chunks into `destination` (new or empty).

    Raises:
        FailedPreconditionError: (BACKUP_SOURCE_INVALID) `database` is missing or not a crewdb
            database; (BACKUP_TARGET_NOT_EMPTY) `destination` holds files already;
            (BACKUP_TARGET_INVALID) it is not a folder or cannot be written.
        UnavailableError: the export failed (the partial folder is left for inspection).
    """
    copy = await asyncio.to_thread(_copy_database, database, destination)
    written: dict[tuple[str, str], int] = {}
    chunks = 0
    # Written as the export streams in: a backup is a command-line run with nothing else to do.
    with (destination / VECTORS_FILE).open("w", encoding="utf-8") as out:
        async for batch in export:
            for chunk in batch.chunks:
                metadata = _normalised(chunk.metadata)
                key = (batch.owner, str(metadata.get("_doc")))
                stored = copy.documents.get(key)
                if stored is None or metadata.get("_rev") != stored.revision:
                    continue  # written after the copy (or left by a failed write): not in this backup
                line = {
                    "owner": batch.owner,
                    "model": batch.model,
                    "dimension": batch.dimension,
                    "id": chunk.id,
                    "text": chunk.text,
                    "metadata": metadata,
                    "embedding": chunk.embedding,
                }
                out.write(json.dumps(line, separators=(",", ":")) + "\n")
                written[key] = written.get(key, 0) + 1
                chunks += 1
            if progress is not None:
                progress(len(batch.chunks))
        out.flush()
        os.fsync(out.fileno())
    reembed = sorted(
        [owner, doc_id]
        for (owner, doc_id), stored in copy.documents.items()
        if written.get((owner, doc_id), 0) != stored.chunk_count
    )
    manifest = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema_revision": copy.schema_revision,
        "files": {name: _describe(destination / name) for name in (DB_FILE, VECTORS_FILE)},
        "rows": copy.rows,
        "chunks": chunks,
        "reembed": reembed,
    }
    await asyncio.to_thread(
        _write_durably, destination / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n"
    )
    return BackupSummary(copy.rows, chunks, len(reembed))


def _copy_database(database: Path, destination: Path) -> CopyContents:
    if not database.is_file():
        problem = "is not a file" if database.exists() else "does not exist"
        raise FailedPreconditionError(
            f"the database {database} (DATABASE_PATH) {problem}", reason="BACKUP_SOURCE_INVALID"
        )
    created = not destination.exists()
    try:
        if not created and any(destination.iterdir()):
            raise FailedPreconditionError(f"{destination} is not empty", reason="BACKUP_TARGET_NOT_EMPTY")
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FailedPreconditionError(
            f"cannot use {destination} as the backup folder: {error.strerror or error}",
            reason="BACKUP_TARGET_INVALID",
        ) from error
    try:
        online_copy(database, destination / DB_FILE)
        copy = contents(destination / DB_FILE)
    except Exception as error:  # sqlite3 and SQLAlchemy raise many types: the source is not usable
        if created:
            shutil.rmtree(destination, ignore_errors=True)
        else:
            (destination / DB_FILE).unlink(missing_ok=True)
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise FailedPreconditionError(
            f"cannot copy the database {database}: {first_line}", reason="BACKUP_SOURCE_INVALID"
        ) from error
    _fsync(destination / DB_FILE)
    return copy


def _write_durably(path: Path, text: str) -> None:
    """Writes `path` whole or not at all, and on disk (with its folder's entry) when this returns."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, path)
    _fsync(path.parent)
    _fsync(path.parent.parent)  # the folder itself may be new


def _fsync(path: Path) -> None:
    """Flushes a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(source: Path) -> dict[str, Any]:
    """The manifest, after checking every file against its size and SHA-256.

    Raises:
        FailedPreconditionError: (BACKUP_INVALID) no manifest, an unknown format, or a file
            missing or changed.
    """
    try:
        manifest = json.loads((source / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as error:
        problem = (error.strerror or str(error)) if isinstance(error, OSError) else f"not JSON ({error})"
        raise FailedPreconditionError(
            f"{source / MANIFEST_FILE}: {problem}", reason="BACKUP_INVALID"
        ) from error
    format_ = manifest.get("format") if isinstance(manifest, dict) else None
    if format_ != FORMAT:
        raise FailedPreconditionError(f"unknown backup format {format_!r}", reason="BACKUP_INVALID")
    if not all(isinstance(manifest.get(key), dict) for key in ("files", "rows")):
        raise FailedPreconditionError(
            f"{source / MANIFEST_FILE} does not list the files and rows of a backup", reason="BACKUP_INVALID"
        )
    checked: dict[str, Any] = manifest
    for name, expected in checked["files"].items():
        path = source / name
        if not path.is_file() or _describe(path) != expected:
            raise FailedPreconditionError(
                f"{path} is missing or differs from the manifest (size or SHA-256)", reason="BACKUP_INVALID"
            )
    return checked


def manifest_rows(source: Path) -> dict[str, int]:
    rows: dict[str, int] = json.loads((source / MANIFEST_FILE).read_text())["rows"]
    return rows


async def refuse_unless_empty(database: Path | None, store: VectorStore) -> None:
    """Raises FailedPreconditionError (RESTORE_TARGET_NOT_EMPTY) unless the database file (if
    given) does not exist yet and the vector store holds no collection of crewdb's.

    Raises:
        UnavailableError: the vector store cannot be reached.
    """
    if database is not None and database.exists() and database.stat().st_size > 0:  # noqa: ASYNC240
        raise FailedPreconditionError(
            f"{database} exists: restore only into an empty location", reason="RESTORE_TARGET_NOT_EMPTY"
        )
    if not await store.is_empty():
        raise FailedPreconditionError(
            f"the vector store at {store.location} holds collections already: restore only into an empty one",
            reason="RESTORE_TARGET_NOT_EMPTY",
        )


def place_database(source: Path, database: Path) -> None:
    """Copies the backup's database to `database` (check it with `refuse_unless_empty` first).

    Raises:
        FailedPreconditionError: (RESTORE_TARGET_INVALID) `database` cannot be written;
            (RESTORE_MISMATCH) the copy does not hold the rows the manifest lists.
    """
    partial = database.with_name(database.name + ".restoring")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / DB_FILE, partial)
        os.replace(partial, database)
    except OSError as error:
        raise FailedPreconditionError(
            f"cannot write the database {database} (DATABASE_PATH): {error.strerror or error}",
            reason="RESTORE_TARGET_INVALID",
        ) from error
    rows = contents(database).rows
    if rows != manifest_rows(source):
        raise FailedPreconditionError(
            f"{database} does not hold the rows the manifest lists", reason="RESTORE_MISMATCH"
        )


async def restore_vectors(
    source: Path,
    manifest: dict[str, Any],
    store: VectorStore,
    knowledge: KnowledgeBase,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Loads the backup's chunks into `store` (which must be empty) and embeds the documents
    listed under `reembed` again; returns (chunks loaded, chunks embedded).

    Raises:
        FailedPreconditionError: (RESTORE_TARGET_NOT_EMPTY) the store holds collections already.
        UnavailableError: Chroma or the embedder failed.
    """
    await refuse_unless_empty(None, store)
    loaded = 0
    for batch in _batches(source / VECTORS_FILE):
        await store.restore(batch)
        loaded += len(batch.chunks)
        if progress is not None:
            progress(len(batch.chunks))
    embedded = 0
    for owner, document_id in manifest.get("reembed", []):
        embedded += await knowledge.reembed(owner, document_id)
    stored = (await store.details())["chunks"]
    if stored != loaded + embedded:
        raise FailedPreconditionError(
            f"the vector store holds {stored} chunks after the restore, not {loaded + embedded}",
            reason="RESTORE_MISMATCH",
        )
    return loaded, embedded


def _batches(path: Path) -> Iterator[ExportBatch]:
    """The lines of vectors.jsonl, grouped by owner in batches."""
    current: ExportBatch | None = None
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            item = json.loads(line)
            chunk = ExportedChunk(item["id"], item["text"], item["metadata"], item["embedding"])
            if current is None or current.owner != item["owner"] or len(current.chunks) >= _RESTORE_BATCH:
                if current is not None:
                    yield current
                current = ExportBatch(item["owner"], "", item["model"], item["dimension"], [])
            current.chunks.append(chunk)
    if current is not None:
        yield current


def _normalised(metadata: dict[str, Any]) -> dict[str, Any]:
    """crewdb's own keys as integers again (a trip through google.protobuf.Struct makes them floats)."""
    return {key: int(value) if key in _RESERVED_INTS else value for key, value in metadata.items()}


def _describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


async def export_through_server(client: Any) -> AsyncIterator[ExportBatch]:
    """The chunks as the running server exports them (SystemService/ExportVectors, admin)."""
    from crewdb.v1 import system_service_pb2, system_service_pb2_grpc  # noqa: PLC0415

    stub = system_service_pb2_grpc.SystemServiceStub(client.channel)
    # A command-line run: nothing else waits on this loop while the stream is read.
    for response in stub.ExportVectors(system_service_pb2.ExportVectorsRequest(batch_size=500)):
        yield ExportBatch(
            owner=response.owner_id,
            collection=response.collection,
            model=response.embedding_model,
            dimension=response.dimension,
            chunks=[
                ExportedChunk(c.id, c.text, dict(c.metadata.items()), list(c.embedding))
                for c in response.chunks
            ],
        )
