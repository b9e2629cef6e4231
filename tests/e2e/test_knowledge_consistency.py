"""The knowledge base stays consistent when a write fails half-way, is abandoned, or races a read.

Faults are injected where the stores are called (a SQLite write that fails, a Chroma call that
fails or is slow on its thread); the stores themselves are real.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from crewdb.client import Client
from crewdb.db import documents as queries
from crewdb.errors import UnavailableError
from crewdb.v1 import user_service_pb2
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.vectors.store import VectorStore
from tests.conftest import RunningServer, settings_in, sign_in, start_server
from tests.e2e.test_vectors import (
    HYBRID,
    KEYWORD,
    SEMANTIC,
    add,
    delete,
    doc,
    get,
    search,
    struct,
)
from tests.rpc_errors import failure


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server, stop = start_server(settings_in(tmp_path_factory.mktemp("consistency")))
    try:
        yield server
    finally:
        stop()


def paragraphs(word: str, count: int) -> str:
    """`count` chunks' worth of text (the default chunk is 1000 characters), each sentence
    carrying `word`, so a keyword search finds every chunk."""
    sentence = f"The {word} report covers item number {{}} in some detail and then moves on. "
    return "".join(sentence.format(i) for i in range(count * 14))


def chroma_chunks(server: RunningServer, owner: str) -> dict[str, str]:
    """Chunk id -> text of everything Chroma holds for `owner`."""

    async def read() -> dict[str, str]:
        held: dict[str, str] = {}
        async for batch in server.app.vectors.export(500):
            if batch.owner == owner:
                held |= {chunk.id: chunk.text for chunk in batch.chunks}
        return held

    return dict(server.call(read()))


def sqlite_chunks(server: RunningServer, owner: str) -> dict[str, str]:
    """Chunk id -> text of what SQLite says is current for `owner`."""
    found: dict[str, str] = {}
    with sqlite3.connect(server.settings.database_path) as db:
        for doc_id, revision in db.execute("SELECT id, revision FROM documents WHERE owner_id = ?", (owner,)):
            for index, text in db.execute(
                "SELECT chunk_index, text FROM document_chunks WHERE owner_id = ? AND document_id = ?",
                (owner, doc_id),
            ):
                found[f"{doc_id}#{index}@{revision}"] = text
    return found


def me(account: Client) -> str:
    return str(account.users.GetMe(user_service_pb2.GetMeRequest(), timeout=10).id)


def code(error: grpc.RpcError) -> grpc.StatusCode:
    assert isinstance(error, grpc.Call)
    return error.code()


async def cannot_delete(*_: Any) -> None:
    """VectorStore.delete while Chroma refuses deletes."""
    raise UnavailableError("Chroma is down for deletes")


def reconcile(server: RunningServer) -> None:
    server.call(server.app.knowledge.reconcile())


def test_a_failed_write_leaves_no_visible_chunk_and_its_revision_is_never_reused(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = sign_in(running, "failed-write")
    owner = me(account)
    add(account.vectors, doc("report", paragraphs("walrus", 3)))

    # The second write reaches Chroma (12 chunks), then SQLite refuses it; deleting its chunks
    # fails too, so they stay in Chroma under the revision the write would have had.
    def refuse(*_: Any) -> bool:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(queries, "save_document", refuse)
        patch.setattr(running.app.vectors, "delete", cannot_delete)
        with pytest.raises(grpc.RpcError) as failed:
            add(account.vectors, doc("report", paragraphs("zeppelin", 12)))
    assert failure(failed.value).code is grpc.StatusCode.UNAVAILABLE
    assert "walrus" in get(account.vectors, "report").text

    # A shorter third version: 2 chunks. Had it reused the failed revision, chunks 2..11 of
    # the failed write would count as its own.
    added = add(account.vectors, doc("report", "A short note about penguins. " * 40))
    assert [a.chunk_count for a in added] == [2]
    for mode in (SEMANTIC, KEYWORD, HYBRID):
        results = search(account.vectors, "zeppelin report item number", mode=mode, top_k=100)
        assert all("penguins" in r.text for r in results), mode
        assert {r.chunk_id for r in results} <= {"report#0", "report#1"}, mode
    assert "penguins" in get(account.vectors, "report").text

    # The start-up check removes what the failed write left: Chroma then holds exactly SQLite's chunks.
    reconcile(running)
    assert chroma_chunks(running, owner) == sqlite_chunks(running, owner)
    account.close()


def test_a_delete_stands_even_when_chroma_cannot_delete_the_chunks(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = sign_in(running, "delete-first")
    owner = me(account)
    add(account.vectors, doc("keep", "Tulips need cold winters to bloom."), doc("drop", "Cacti store water."))

    drop_keys = {key for key in sqlite_chunks(running, owner) if key.startswith("drop#")}
    with monkeypatch.context() as patch:
        patch.setattr(running.app.vectors, "delete", cannot_delete)
        assert list(delete(account.vectors, ["drop"]).deleted_ids) == ["drop"]
    with pytest.raises(grpc.RpcError) as missing:
        get(account.vectors, "drop")
    assert failure(missing.value).code is grpc.StatusCode.NOT_FOUND
    for mode in (SEMANTIC, KEYWORD, HYBRID):
        assert {r.document_id for r in search(account.vectors, "cacti water desert", mode=mode)} <= {"keep"}
    assert drop_keys <= set(chroma_chunks(running, owner))  # invisible, but still in Chroma
    reconcile(running)
    assert chroma_chunks(running, owner) == sqlite_chunks(running, owner)
    account.close()


def test_a_write_whose_caller_gave_up_finishes_before_the_next_write_starts(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller cancels while Chroma is still writing on its thread; the next write of the
    same document must not interleave with the rest of the first."""
    account = sign_in(running, "abandoned")
    owner = me(account)
    add(account.vectors, doc("plan", paragraphs("first", 2)))
    writing, release, landed = threading.Event(), threading.Event(), threading.Event()
    guarded = VectorStore._guarded

    def held_write(store: VectorStore, work: Any) -> Any:
        if getattr(work, "__name__", "") != "write" or writing.is_set():  # VectorStore.upsert's batches
            return guarded(store, work)
        writing.set()
        release.wait(30)  # a slow Chroma: on the thread, where a cancellation cannot stop it
        try:
            return guarded(store, work)
        finally:
            landed.set()

    monkeypatch.setattr(VectorStore, "_guarded", held_write)
    request = pb.AddDocumentsRequest(documents=[doc("plan", paragraphs("second", 6))])
    call = account.vectors.AddDocuments.future(request, timeout=30)
    assert writing.wait(30)
    call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    third = threading.Thread(target=add, args=(account.vectors, doc("plan", paragraphs("third", 3))))
    third.start()
    time.sleep(0.5)  # the third write is under way (or waiting for the first to end)
    release.set()
    assert landed.wait(30)
    third.join(30)
    assert not third.is_alive()

    assert "third" in get(account.vectors, "plan").text
    # Exactly SQLite's chunks, with SQLite's texts: nothing of the first write overwrote the third.
    assert chroma_chunks(running, owner) == sqlite_chunks(running, owner)
    for result in search(account.vectors, "report covers item", mode=SEMANTIC, top_k=50):
        assert "third" in result.text
    account.close()


def test_searches_racing_deletes_and_replacements_never_fail(running: RunningServer) -> None:
    account = sign_in(running, "racer")
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                add(
                    account.vectors,
                    *(doc(f"d{i}", f"Lighthouse keeper log {n} for day {i}.", kind="log") for i in range(5)),
                )
                delete(account.vectors, [f"d{i}" for i in range(0, 5, 2)])
                delete(account.vectors, filter_={"kind": "log"})
            except grpc.RpcError as error:
                errors.append(f"write {code(error)}: {error}")

    def searching(mode: pb.SearchMode.ValueType) -> None:
        request = pb.SearchRequest(
            query="lighthouse keeper log", mode=mode, top_k=10, filter=struct({"kind": "log"})
        )
        while not stop.is_set():
            try:
                account.vectors.Search(request, timeout=10)
            except grpc.RpcError as error:
                errors.append(f"search {code(error)}: {error}")

    threads = [threading.Thread(target=churn)] + [
        threading.Thread(target=searching, args=(mode,)) for mode in (KEYWORD, HYBRID, SEMANTIC)
    ]
    for thread in threads:
        thread.start()
    time.sleep(6)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    account.close()


def test_embedding_stops_soon_after_the_caller_gives_up(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large upload whose deadline passes: embedding stops after the slice in progress, not
    after the whole document (several hundred chunks, tens of seconds of CPU here)."""
    account = sign_in(running, "gives-up")
    embedder = running.app.knowledge._embedder
    handed: list[int] = []
    embed = embedder.embed

    def counted(texts: Any) -> Any:
        if len(texts) > 1:  # not the health check's one-word probe
            handed.append(len(texts))
        return embed(texts)

    monkeypatch.setattr(embedder, "embed", counted)
    big = doc("big", paragraphs("glacier", 300))
    with pytest.raises(grpc.RpcError) as gave_up:
        account.vectors.AddDocuments(pb.AddDocumentsRequest(documents=[big]), timeout=1.0)
    assert code(gave_up.value) is grpc.StatusCode.DEADLINE_EXCEEDED
    settled = time.monotonic() + 30
    while time.monotonic() < settled:  # until nothing more is handed to the model
        seen = len(handed)
        time.sleep(1.0)
        if len(handed) == seen:
            break
    chunks = len(running.app.knowledge._chunker.split(big.text))
    assert chunks > 300
    assert sum(handed) <= 3 * 64 < chunks
    with pytest.raises(grpc.RpcError) as absent:
        get(account.vectors, "big")
    assert failure(absent.value).code is grpc.StatusCode.NOT_FOUND
    account.close()


def test_a_late_chroma_delete_never_touches_the_chunks_of_a_document_added_again(
    running: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete whose Chroma call times out still lands later, from its thread; by then the
    document may have been added again. Its chunks must not be the ones deleted."""
    account = sign_in(running, "late-delete")
    owner = me(account)
    add(account.vectors, doc("note", "Herons stand still in shallow water."))
    held, release, landed = threading.Event(), threading.Event(), threading.Event()
    guarded = VectorStore._guarded

    def late_delete(store: VectorStore, work: Any) -> Any:
        if held.is_set() or "delete" not in getattr(work, "__qualname__", ""):
            return guarded(store, work)
        held.set()
        release.wait(30)  # the caller has given up on it by now (the store's time-out)
        try:
            return guarded(store, work)
        finally:
            landed.set()

    monkeypatch.setattr(VectorStore, "_guarded", late_delete)
    monkeypatch.setattr(running.app.vectors, "_timeout", 0.5)
    assert list(delete(account.vectors, ["note"]).deleted_ids) == ["note"]
    assert held.is_set()
    monkeypatch.setattr(running.app.vectors, "_timeout", 10.0)
    add(account.vectors, doc("note", "Herons stand still in shallow water, then strike."))
    release.set()
    assert landed.wait(30)

    assert chroma_chunks(running, owner) == sqlite_chunks(running, owner) != {}
    assert [r.document_id for r in search(account.vectors, "wading bird hunting")] == ["note"]
    account.close()
