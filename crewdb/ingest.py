"""`crewdb ingest`: bulk-loads .txt and .md files into a running server's knowledge base, as a client.

A document's id is the file's path from the folder named on the command line (`guide/intro.md`
for docs/guide/intro.md given `docs`), or the file's name when the file itself is named: the same
argument gives the same ids from any working directory, so ingesting again replaces. A file that
cannot be a document is reported and skipped; the others go on.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from tqdm import tqdm

from crewdb.client import Client
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.vectors.filters import has_control_characters

log = logging.getLogger(__name__)

EXTENSIONS = (".txt", ".md", ".markdown")
# The server's limits (crewdb/services/knowledge.py): AddDocuments takes at most 100 documents,
# ids of at most 256 characters without control characters; a request stays under its 4 MiB.
MAX_BATCH_DOCUMENTS = 100
MAX_BATCH_BYTES = 3 * 1024 * 1024
MAX_TEXT = 1_000_000
MAX_ID = 256
# Embedding a full batch on a small CPU takes a while; this is per request.
REQUEST_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Outcome:
    files: int
    chunks: int
    skipped: list[tuple[Path, str]]


@dataclass(frozen=True, slots=True)
class Found:
    """A file to ingest and its document id, or (`problem`) why it cannot be one."""

    path: Path
    id: str
    problem: str | None = None


def find_files(paths: Sequence[Path]) -> Iterator[Found]:
    """The .txt/.md files among `paths` (folders searched recursively, in a stable order; a file
    named itself is taken whatever its extension), each with its document id. Folders that
    cannot be read come with the reason."""
    for root in paths:
        if root.is_dir():
            yield from _walk(root)
        else:
            yield _found(root, root.name)


def _walk(root: Path) -> Iterator[Found]:
    unreadable: list[OSError] = []
    for folder, folders, files in os.walk(root, onerror=unreadable.append):
        yield from _unreadable_folders(unreadable)
        folders.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if path.suffix.lower() in EXTENSIONS:
                yield _found(path, path.relative_to(root).as_posix())
    yield from _unreadable_folders(unreadable)


def _unreadable_folders(errors: list[OSError]) -> Iterator[Found]:
    while errors:
        error = errors.pop(0)
        yield Found(Path(str(error.filename)), "", f"cannot read the folder: {error.strerror or error}")


def _found(path: Path, document_id: str) -> Found:
    """`document_id` checked as the server would check it, so that one bad name is skipped
    instead of failing the batch it is in."""
    problem = None
    try:
        str(path).encode()
    except UnicodeEncodeError:
        problem = "its name is not valid UTF-8"
    else:
        if has_control_characters(document_id):
            problem = "its name has control characters"
        elif len(document_id) > MAX_ID:
            problem = f"its document id {document_id[:40]!r}... is longer than {MAX_ID} characters"
    return Found(path, document_id, problem)


def _document(found: Found) -> pb.DocumentInput:
    """Raises ValueError (with the reason) for a file that cannot be a document."""
    if found.problem:
        raise ValueError(found.problem)
    path = found.path
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError("not a regular file")  # a pipe or device would block or never end
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except OSError as error:
        raise ValueError(error.strerror or str(error)) from None
    if not text.strip():
        raise ValueError("empty")
    if len(text) > MAX_TEXT:
        raise ValueError(f"longer than {MAX_TEXT:,} characters")
    metadata = struct_pb2.Struct()
    metadata.update({"source": path.as_posix(), "extension": path.suffix.lower().lstrip(".")})
    return pb.DocumentInput(id=found.id, text=text, title=_title(path, text), metadata=metadata)


def _title(path: Path, text: str) -> str:
    """A Markdown file's first heading, else the file name without extension."""
    if path.suffix.lower() != ".txt":
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()[:500]
    return path.stem[:500]


def ingest(client: Client, paths: Sequence[Path], *, batch_size: int = 32, progress: bool = True) -> Outcome:
    """Adds every file as a document (re-running with the same arguments replaces, never
    duplicates); files that cannot be documents, or that the server refuses, are skipped.

    Raises:
        grpc.RpcError: the server failed, or refused a call for a reason other than a bad document.
    """
    files = list(find_files(paths))
    skipped: list[tuple[Path, str]] = []
    added = chunks = 0
    batch: list[tuple[Path, pb.DocumentInput]] = []
    owners: dict[str, Path] = {}  # document id -> the file that has it
    size = 0

    def flush() -> None:
        nonlocal added, chunks, size
        if not batch:
            return
        documents, refused = _add(client, batch)
        added += len(documents)
        chunks += sum(d.chunk_count for d in documents)
        skipped.extend(refused)
        bar.update(len(batch))
        batch.clear()
        size = 0

    with tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr) as bar:
        for found in files:
            path = found.path
            try:
                document = _document(found)
                first = owners.setdefault(document.id, path)
                if first is not path and _same_file(first, path):
                    bar.update(1)  # named twice (a folder and a file in it): once is enough
                    continue
                if first is not path:
                    raise ValueError(f"the same document id {document.id!r} as {first}")
            except ValueError as error:
                skipped.append((path, str(error)))
                bar.update(1)
                continue
            length = len(document.text.encode())
            if batch and (
                len(batch) >= min(batch_size, MAX_BATCH_DOCUMENTS) or size + length > MAX_BATCH_BYTES
            ):
                flush()
            batch.append((path, document))
            size += length
        flush()
    return Outcome(added, chunks, skipped)


def _add(
    client: Client, batch: list[tuple[Path, pb.DocumentInput]]
) -> tuple[list[pb.AddedDocument], list[tuple[Path, str]]]:
    """Adds a batch. When the server refuses it as invalid, adds its documents one by one, so that
    only the documents it refuses are skipped: (added, refused with the server's reason)."""
    try:
        return list(_call(client, [doc for _, doc in batch]).documents), []
    except grpc.RpcError as error:
        if _code(error) != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        if len(batch) == 1:
            return [], [(batch[0][0], f"refused by the server: {describe(error)}")]
    added: list[pb.AddedDocument] = []
    refused: list[tuple[Path, str]] = []
    for item in batch:
        documents, refusal = _add(client, [item])
        added += documents
        refused += refusal
    return added, refused


def _call(client: Client, documents: list[pb.DocumentInput]) -> pb.AddDocumentsResponse:
    response: pb.AddDocumentsResponse = client.vectors.AddDocuments(
        pb.AddDocumentsRequest(documents=documents), timeout=REQUEST_TIMEOUT
    )
    return response


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.Call) else None


def describe(error: grpc.RpcError) -> str:
    """A one-line account of a failed call for the terminal."""
    code = _code(error)
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"
