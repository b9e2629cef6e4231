"""`crewdb ingest`: bulk-loads .txt and .md files into a running server's knowledge base, as a client."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from tqdm import tqdm

from crewdb.client import Client
from crewdb.v1 import vector_service_pb2 as pb

log = logging.getLogger(__name__)

EXTENSIONS = (".txt", ".md", ".markdown")
# AddDocuments takes at most 100 documents, and a request must stay under the server's 4 MiB.
MAX_BATCH_DOCUMENTS = 100
MAX_BATCH_BYTES = 3 * 1024 * 1024
MAX_TEXT = 1_000_000
# Embedding a full batch on a small CPU takes a while; this is per request.
REQUEST_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Outcome:
    files: int
    chunks: int
    skipped: list[tuple[Path, str]]


def find_files(paths: Sequence[Path]) -> Iterator[Path]:
    """The .txt/.md files among `paths`, folders searched recursively, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        else:
            yield path


def _document(path: Path) -> pb.DocumentInput:
    """Raises ValueError (with the reason) for a file that cannot be a document."""
    try:
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
    return pb.DocumentInput(id=path.as_posix()[-256:], text=text, title=_title(path, text), metadata=metadata)


def _title(path: Path, text: str) -> str:
    """A Markdown file's first heading, else the file name without extension."""
    if path.suffix.lower() != ".txt":
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()[:500]
    return path.stem[:500]


def ingest(client: Client, paths: Sequence[Path], *, batch_size: int = 32, progress: bool = True) -> Outcome:
    """Adds every file as a document whose id is its path (re-running replaces, never duplicates).

    Raises:
        grpc.RpcError: the server refused a batch for a reason other than a bad document.
    """
    files = list(find_files(paths))
    skipped: list[tuple[Path, str]] = []
    added = chunks = 0
    batch: list[tuple[Path, pb.DocumentInput]] = []
    size = 0

    def flush() -> None:
        nonlocal added, chunks, size
        if not batch:
            return
        request = pb.AddDocumentsRequest(documents=[doc for _, doc in batch])
        response = client.vectors.AddDocuments(request, timeout=REQUEST_TIMEOUT)
        added += len(response.documents)
        chunks += sum(d.chunk_count for d in response.documents)
        bar.update(len(batch))
        batch.clear()
        size = 0

    with tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr) as bar:
        for path in files:
            try:
                document = _document(path)
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


def describe(error: grpc.RpcError) -> str:
    """A one-line account of a failed call for the terminal."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return f"{code.name if code else 'ERROR'}: {details}"
