"""Backup and restore through the CLI, ExportVectors access, graceful shutdown, and the metrics endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from crewdb.cli import main
from crewdb.client import Client
from crewdb.config import Settings
from crewdb.db.schema import metadata
from crewdb.models import UserRole
from crewdb.server import build_vector_store
from crewdb.v1 import conversation_service_pb2 as cpb
from crewdb.v1 import system_service_pb2, system_service_pb2_grpc, user_service_pb2
from crewdb.v1 import task_service_pb2 as tpb
from crewdb.v1 import vector_service_pb2 as vpb
from crewdb.vectors.filters import Scalar
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, free_port, sign_in, start_server
from tests.rpc_errors import failure

TIMEOUT = 30.0
BACKUP_FILES = {"app.db", "vectors.jsonl", "manifest.json"}
USER_ROLE = cpb.MESSAGE_ROLE_USER
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ADD_MESSAGE = "/crewdb.v1.ConversationService/AddMessage"
ADD_DOCUMENTS = "/crewdb.v1.VectorService/AddDocuments"
WATCH_MESSAGES = "/crewdb.v1.ConversationService/WatchMessages"
CLAIM_TASK = "/crewdb.v1.TaskService/ClaimTask"

# Short chunks: documents of a few hundred characters span several chunks, which keeps the
# embedding work (the slow part of every test here) small.
CHUNKED = {"chunk_size": 200, "chunk_overlap": 40}


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


TOPICS = {
    "refunds": "Customers may return an unused item within 30 days of purchase for a full refund.",
    "passwords": "To reset a forgotten password, open the sign-in page and follow the emailed link.",
    "shipping": "Parcels are shipped by courier and arrive within three to five working days.",
    "volcanoes": (
        "Volcanoes form where magma rises through the crust. Lava flows, ash clouds and "
        "pyroclastic surges are their main hazards. Some volcanoes sleep for centuries before "
        "erupting again. Geologists watch for swelling ground, small earthquakes and gas "
        "emissions. The largest eruptions can cool the climate of the whole planet for years."
    ),
}
# About 23 chunks of 200 characters: a call that takes a second or so to embed, well within
# the 5 s grace period even on a busy machine.
LONG_TEXT = TOPICS["volcanoes"] * 8
QUERIES = ("how do I get my money back", "when will my package arrive", "eruption hazards of magma")
# Searches whose answers a restore must keep: by meaning, by words and meaning, and filtered on
# numbers, booleans and strings in the metadata (which crosses google.protobuf.Struct on export).
SEARCHES = [
    *(vpb.SearchRequest(query=query, top_k=5) for query in QUERIES),
    vpb.SearchRequest(query="refund parcels", top_k=5, mode=vpb.SEARCH_MODE_HYBRID),
    vpb.SearchRequest(query="anything at all", top_k=5, filter=_struct({"year": 2023})),
    vpb.SearchRequest(query="anything at all", top_k=5, filter=_struct({"public": True})),
    vpb.SearchRequest(query="anything at all", top_k=5, filter=_struct({"topic": "shipping"})),
]


# --- helpers ----------------------------------------------------------------------------------


def _env(settings: Settings, port: int) -> dict[str, str]:
    """What `crewdb backup`/`restore` read: the data paths and where a server would listen."""
    return {
        "CREWDB_HOST": "127.0.0.1",
        "CREWDB_PORT": str(port),
        "DATABASE_PATH": str(settings.database_path),
        "VECTOR_DB_PATH": str(settings.vector_db_path),
        "JWT_SECRET": TEST_SECRET,
    }


def _cli(argv: list[str], env: dict[str, str], password: str | None = None) -> int:
    """Runs `crewdb` in-process, with `password` on standard input."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO("" if password is None else password + "\n"))
        return main(argv, env)


def _backup_as_admin(server: RunningServer, destination: Path, username: str) -> int:
    argv = ["backup", str(destination), "--username", username, "--password-stdin", "--no-progress"]
    return _cli(argv, _env(server.settings, server.app.port), PASSWORD)


def _restore(source: Path, target: Settings) -> int:
    return _cli(["restore", str(source), "--no-progress"], _env(target, free_port()))


def _restored_settings(settings: Settings, folder: Path) -> Settings:
    return settings.replace(database_path=folder / "app.db", vector_db_path=folder / "vectordb")


def _table_rows(database: Path) -> dict[str, int]:
    with sqlite3.connect(database) as conn:
        # Table names come from crewdb's own schema, never from input.
        rows = {
            table.name: int(conn.execute(f'SELECT COUNT(*) FROM "{table.name}"').fetchone()[0])  # noqa: S608
            for table in metadata.sorted_tables
        }
    conn.close()
    return rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _documents(client: Client) -> list[vpb.Document]:
    listed = client.vectors.ListDocuments(vpb.ListDocumentsRequest(page_size=100), timeout=TIMEOUT)
    assert not listed.next_page_token
    return list(listed.documents)


def _add_documents(client: Client, texts: dict[str, str], metadata: dict[str, Any] | None = None) -> None:
    inputs = [
        vpb.DocumentInput(id=id_, title=id_, text=text, metadata=_struct(metadata or {}))
        for id_, text in texts.items()
    ]
    client.vectors.AddDocuments(vpb.AddDocumentsRequest(documents=inputs), timeout=TIMEOUT)


def _conversation(client: Client, title: str, messages: int) -> cpb.Conversation:
    stub = client.conversations
    created = stub.CreateConversation(cpb.CreateConversationRequest(title=title), timeout=TIMEOUT)
    for n in range(messages):
        content = f"{title}: message {n}"
        request = cpb.AddMessageRequest(conversation_id=created.id, role=USER_ROLE, content=content)
        stub.AddMessage(request, timeout=TIMEOUT)
    return created


def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met in {timeout}s"
        time.sleep(0.02)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> tuple[str, Samples]:
    """The /metrics page as text, and its samples by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def _sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _registry_value(server: RunningServer, name: str, **labels: str) -> float:
    """A sample from the server's own metrics registry (no HTTP), 0 when absent."""
    assert server.app.metrics is not None
    value = server.app.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- a populated server, its backup, and a restore of it (shared by read-only tests) ----------


@dataclass
class Deployment:
    server: RunningServer
    alice: Client
    bob: Client
    owners: dict[str, str]  # username -> user id
    backup: Path
    rows_at_backup: dict[str, int]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("original")
    settings = Settings(
        host="127.0.0.1",
        port=0,
        database_path=root / "app.db",
        vector_db_path=root / "vectordb",
        health_check_interval=0.2,
        jwt_secret=TEST_SECRET,
    ).replace(**CHUNKED)
    server, stop = start_server(settings)
    clients: list[Client] = []
    try:
        sign_in(server, "root", UserRole.ADMIN).close()
        alice, bob = sign_in(server, "alice"), sign_in(server, "bob")
        clients += [alice, bob]
        for year, (id_, text) in enumerate(TOPICS.items(), start=2020):
            _add_documents(alice, {id_: text}, {"year": year, "public": year % 2 == 0, "topic": id_})
        _add_documents(bob, {"bob-notes": "Bob keeps notes about refunds and parcels here."})
        _conversation(alice, "trip", 3)
        _conversation(alice, "groceries", 2)
        _conversation(bob, "bob's", 1)
        owners = {
            name: client.users.GetMe(user_service_pb2.GetMeRequest(), timeout=TIMEOUT).id
            for name, client in (("alice", alice), ("bob", bob))
        }
        backup = root.parent / f"{root.name}-backup"
        assert _backup_as_admin(server, backup, "root") == 0
        rows = _table_rows(settings.database_path)
        yield Deployment(server, alice, bob, owners, backup, rows)
    finally:
        for client in clients:
            client.close()
        stop()


@pytest.fixture(scope="module")
def restored(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    target = _restored_settings(deployment.server.settings, tmp_path_factory.mktemp("restored"))
    assert _restore(deployment.backup, target) == 0
    server, stop = start_server(target)
    try:
        yield server
    finally:
        stop()


# --- 1. backup while the server runs ----------------------------------------------------------


def test_backup_while_serving_writes_a_database_copy_vectors_and_a_manifest_that_agree(
    deployment: Deployment,
) -> None:
    backup, server = deployment.backup, deployment.server
    assert {path.name for path in backup.iterdir()} == BACKUP_FILES
    manifest = json.loads((backup / "manifest.json").read_text())

    assert manifest["rows"] == deployment.rows_at_backup == _table_rows(backup / "app.db")
    assert manifest["rows"]["users"] == 3
    assert manifest["rows"]["messages"] == 6
    for name in ("app.db", "vectors.jsonl"):
        described = manifest["files"][name]
        assert described == {"bytes": (backup / name).stat().st_size, "sha256": _sha256(backup / name)}
    lines = [json.loads(line) for line in (backup / "vectors.jsonl").read_text().splitlines()]
    in_chroma = {
        name: server.call(server.app.vectors.count(owner)) for name, owner in deployment.owners.items()
    }
    in_sqlite = {
        name: client.vectors.GetVectorStats(vpb.GetVectorStatsRequest(), timeout=TIMEOUT).chunks
        for name, client in (("alice", deployment.alice), ("bob", deployment.bob))
    }
    assert in_chroma == in_sqlite
    assert in_sqlite["alice"] > len(TOPICS)  # one document spans several chunks
    assert manifest["chunks"] == len(lines) == sum(in_chroma.values())
    assert manifest["reembed"] == []
    by_owner = {
        owner: sum(1 for line in lines if line["owner"] == owner) for owner in deployment.owners.values()
    }
    assert by_owner == {deployment.owners[name]: count for name, count in in_chroma.items()}
    assert all(len(line["embedding"]) == line["dimension"] > 0 for line in lines)
    assert {line["metadata"]["_doc"] for line in lines} == {*TOPICS, "bob-notes"}


def test_backup_while_serving_without_credentials_fails_and_exports_nothing(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    destination = tmp_path / "backup"
    server = deployment.server

    code = _cli(["backup", str(destination), "--no-progress"], _env(server.settings, server.app.port))

    assert code == 1
    assert not destination.exists() or not any(destination.iterdir())
    assert "--username" in caplog.text


def test_backup_into_a_folder_that_holds_files_fails_and_leaves_it_alone(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    destination = tmp_path / "backup"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")

    assert _backup_as_admin(deployment.server, destination, "root") == 1

    assert [path.name for path in destination.iterdir()] == ["keep.txt"]
    assert "not empty" in caplog.text


# --- 2. a backup taken while writes go on ------------------------------------------------------


def _text(slot: int, round_: int) -> str:
    """A replacement text whose length (and so chunk count) changes from round to round."""
    topic = ("gardening and compost", "chess openings", "sailing knots")[slot % 3]
    sentence = f"Round {round_} of the notes on {topic}, kept in slot {slot}. "
    return sentence * (1 + round_ % 4)


def test_a_backup_taken_during_writes_restores_to_a_consistent_state(
    settings: Settings, tmp_path: Path
) -> None:
    server, stop_server = start_server(settings.replace(**CHUNKED))
    alice = sign_in(server, "alice")
    sign_in(server, "root", UserRole.ADMIN).close()
    try:
        _add_documents(alice, {"anchor": TOPICS["volcanoes"]})
        _conversation(alice, "before", 2)
        rounds = [0]
        errors: list[BaseException] = []
        stop_writing = threading.Event()

        def write() -> None:
            try:
                while not stop_writing.is_set():
                    n = rounds[0]
                    _conversation(alice, f"during {n}", 2)
                    # The same ids again and again: each call makes a new revision.
                    _add_documents(alice, {f"shared-{slot}": _text(slot, n) for slot in range(2)})
                    _add_documents(alice, {f"new-{n}": _text(2, n)})
                    rounds[0] = n + 1
            except BaseException as error:  # noqa: BLE001 - reported by the test thread
                errors.append(error)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_until(lambda: rounds[0] >= 1 or bool(errors), what="a first round of writes")
        assert _backup_as_admin(server, tmp_path / "backup", "root") == 0
        after_backup = rounds[0]
        wait_until(lambda: rounds[0] >= after_backup + 1 or bool(errors), what="writes after the backup")
        stop_writing.set()
        writer.join(TIMEOUT)
        assert not errors, errors
        written = {
            c.id
            for c in alice.conversations.ListConversations(
                cpb.ListConversationsRequest(page_size=100)
            ).conversations
        }
    finally:
        alice.close()
        stop_server()

    target = _restored_settings(settings, tmp_path / "restored")
    assert _restore(tmp_path / "backup", target) == 0

    with sqlite3.connect(target.database_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        counts = conn.execute(
            "SELECT c.id, c.message_count, COUNT(m.id) FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id"
        ).fetchall()
        documents = conn.execute("SELECT owner_id, id, revision, chunk_count FROM documents").fetchall()
    conn.close()
    assert [(id_, stored) for id_, stored, actual in counts if stored != actual] == []
    assert {id_ for id_, _, _ in counts} <= written
    assert {"anchor", "shared-0", "shared-1"} <= {doc_id for _, doc_id, _, _ in documents}

    # Chroma as the restore left it, before a server starts (and repairs whatever it finds).
    store = build_vector_store(target)
    try:
        for owner, doc_id, revision, chunk_count in documents:
            found = asyncio.run(store.matching(owner, {"_doc": doc_id}))
            assert {chunk.id for chunk in found} == {f"{doc_id}#{i}@{revision}" for i in range(chunk_count)}
        assert asyncio.run(store.details())["chunks"] == sum(row[3] for row in documents)
    finally:
        store.close()

    restored, stop_restored = start_server(target)
    try:
        with Client(restored.address) as again:
            owner = again.login("alice", PASSWORD).id
            stats = again.vectors.GetVectorStats(vpb.GetVectorStatsRequest(), timeout=TIMEOUT)
            assert stats.documents == len(documents)
            assert (
                stats.chunks
                == sum(row[3] for row in documents)
                == restored.call(restored.app.vectors.count(owner))
            )
            for doc_id in ("anchor", "shared-0", "shared-1"):
                text = again.vectors.GetDocument(vpb.GetDocumentRequest(id=doc_id), timeout=TIMEOUT).text
                hits = again.vectors.Search(
                    vpb.SearchRequest(query=text[:150], top_k=3), timeout=TIMEOUT
                ).results
                assert doc_id in [hit.document_id for hit in hits]
    finally:
        stop_restored()


# --- 3. a restored server answers as the original did -----------------------------------------


def _answers(client: Client) -> dict[str, Any]:
    """Everything a user can read back, in comparable form."""
    conversations = client.conversations.ListConversations(
        cpb.ListConversationsRequest(page_size=100), timeout=TIMEOUT
    ).conversations
    messages = {
        c.id: list(
            client.conversations.ListMessages(
                cpb.ListMessagesRequest(conversation_id=c.id, page_size=100), timeout=TIMEOUT
            ).messages
        )
        for c in conversations
    }
    documents = {
        d.id: client.vectors.GetDocument(vpb.GetDocumentRequest(id=d.id), timeout=TIMEOUT)
        for d in _documents(client)
    }
    searches = [
        [
            (hit.document_id, hit.chunk_id, round(hit.score, 4), hit.metadata)
            for hit in client.vectors.Search(request, timeout=TIMEOUT).results
        ]
        for request in SEARCHES
    ]
    stats = client.vectors.GetVectorStats(vpb.GetVectorStatsRequest(), timeout=TIMEOUT)
    return {
        "conversations": list(conversations),
        "messages": messages,
        "documents": documents,
        "searches": searches,
        "stats": stats,
    }


def test_a_restored_server_answers_as_the_original_did(
    deployment: Deployment, restored: RunningServer
) -> None:
    answers: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for username, original in (("alice", deployment.alice), ("bob", deployment.bob)):
        with Client(restored.address) as client:
            assert client.login(username, PASSWORD).id == deployment.owners[username]
            answers[username] = (_answers(original), _answers(client))

    for before, after in answers.values():
        assert after == before
        assert before["conversations"]
        assert before["documents"]
    alice = answers["alice"][0]
    assert [hit[0] for hit in alice["searches"][0]][:1] == ["refunds"]
    assert [hit[0] for hit in alice["searches"][4]] == ["volcanoes", "volcanoes"]  # year 2023, two chunks
    assert {hit[0] for hit in alice["searches"][5]} == {"refunds", "shipping"}
    assert {hit[0] for hit in alice["searches"][6]} == {"shipping"}
    assert alice["stats"].chunks > len(TOPICS)


# --- 4. what a restore refuses, and a backup with the server stopped ---------------------------


def _copy_of_backup(deployment: Deployment, tmp_path: Path) -> Path:
    copy = tmp_path / "backup"
    shutil.copytree(deployment.backup, copy)
    return copy


def test_restore_over_an_existing_database_is_refused(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = _restored_settings(deployment.server.settings, tmp_path / "target")
    target.database_path.parent.mkdir()
    target.database_path.write_bytes(b"someone's data")

    assert _restore(deployment.backup, target) == 1

    assert target.database_path.read_bytes() == b"someone's data"
    assert not target.vector_db_path.exists()
    assert "restore only into an empty location" in caplog.text


def test_restore_of_a_backup_whose_vectors_were_altered_is_refused(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup = _copy_of_backup(deployment, tmp_path)
    vectors = backup / "vectors.jsonl"
    data = bytearray(vectors.read_bytes())
    at = data.index(b'"embedding":[') + len(b'"embedding":[') + 1
    data[at] = ord("7") if data[at] != ord("7") else ord("3")  # one digit of one number
    vectors.write_bytes(bytes(data))
    target = _restored_settings(deployment.server.settings, tmp_path / "target")

    assert _restore(backup, target) == 1

    assert "differs from the manifest" in caplog.text
    assert not target.database_path.exists()


def test_restore_of_a_backup_without_its_manifest_is_refused(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup = _copy_of_backup(deployment, tmp_path)
    (backup / "manifest.json").unlink()
    target = _restored_settings(deployment.server.settings, tmp_path / "target")

    assert _restore(backup, target) == 1

    assert "manifest.json" in caplog.text
    assert not target.database_path.exists()


def test_restore_into_a_vector_store_that_holds_data_is_refused_before_placing_the_database(
    deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = _restored_settings(deployment.server.settings, tmp_path / "target")
    store = build_vector_store(target)
    try:
        chunk: dict[str, Scalar] = {"_doc": "other", "_idx": 0, "_rev": 1, "_start": 0, "_end": 5}
        upsert = store.upsert(
            "someone", "m", ids=["other#0@1"], embeddings=[[0.1, 0.2]], texts=["other"], metadatas=[chunk]
        )
        asyncio.run(upsert)  # another deployment's vectors
    finally:
        store.close()

    assert _restore(deployment.backup, target) == 1

    assert "holds collections already" in caplog.text
    # Nothing changed, so the same restore can run again once the vector store is emptied.
    assert not target.database_path.exists(), "the database was restored although the restore was refused"


def test_restore_embeds_again_the_documents_the_backup_lists_under_reembed(
    deployment: Deployment, tmp_path: Path
) -> None:
    backup = _copy_of_backup(deployment, tmp_path)
    alice = deployment.owners["alice"]
    lines = (backup / "vectors.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["metadata"]["_doc"] != "volcanoes"]
    (backup / "vectors.jsonl").write_text("".join(kept))
    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["chunks"] = len(kept)
    manifest["reembed"] = [[alice, "volcanoes"]]
    vectors = backup / "vectors.jsonl"
    manifest["files"]["vectors.jsonl"] = {"bytes": vectors.stat().st_size, "sha256": _sha256(vectors)}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    target = _restored_settings(deployment.server.settings, tmp_path / "target")

    assert _restore(backup, target) == 0

    store = build_vector_store(target)
    try:
        found = asyncio.run(store.matching(alice, {"_doc": "volcanoes"}))
    finally:
        store.close()
    with sqlite3.connect(target.database_path) as db:
        (revision,) = db.execute("SELECT revision FROM documents WHERE id = 'volcanoes'").fetchone()
    assert sorted(chunk.id for chunk in found) == [f"volcanoes#0@{revision}", f"volcanoes#1@{revision}"]
    restored, stop = start_server(target)
    try:
        with Client(restored.address) as client:
            client.login("alice", PASSWORD)
            assert _answers(client) == _answers(deployment.alice)
    finally:
        stop()


def test_backup_with_the_server_stopped_reads_chroma_directly_without_credentials(
    settings: Settings, tmp_path: Path
) -> None:
    server, stop = start_server(settings.replace(**CHUNKED))
    with sign_in(server, "alice") as alice:
        _add_documents(alice, {"volcanoes": TOPICS["volcanoes"]})
        _conversation(alice, "kept", 2)
        (document,) = _documents(alice)
    stop()
    destination = tmp_path / "backup"

    code = _cli(["backup", str(destination), "--no-progress"], _env(settings, free_port()))

    assert code == 0
    manifest = json.loads((destination / "manifest.json").read_text())
    lines = (destination / "vectors.jsonl").read_text().splitlines()
    assert manifest["chunks"] == len(lines) == document.chunk_count > 1
    assert manifest["reembed"] == []
    assert (manifest["rows"]["conversations"], manifest["rows"]["messages"]) == (1, 2)


# --- 5. ExportVectors is for admins ------------------------------------------------------------


@pytest.mark.parametrize(
    ("signed_in", "code", "reason"),
    [
        pytest.param(True, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", id="plain-user"),
        pytest.param(False, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", id="no-token"),
    ],
)
def test_export_vectors_is_refused_to_anyone_but_an_admin(
    server: RunningServer, signed_in: bool, code: grpc.StatusCode, reason: str
) -> None:
    with sign_in(server, "alice") as alice:
        _add_documents(alice, {"refunds": TOPICS["refunds"]})
        channel = alice.channel if signed_in else grpc.insecure_channel(server.address)
        stub = system_service_pb2_grpc.SystemServiceStub(channel)

        with pytest.raises(grpc.RpcError) as raised:
            list(stub.ExportVectors(system_service_pb2.ExportVectorsRequest(), timeout=TIMEOUT))

        problem = failure(raised.value)
        assert (problem.code, problem.reason) == (code, reason)
        if not signed_in:
            channel.close()


# --- 6. graceful shutdown ----------------------------------------------------------------------


class HealthWatch:
    """The readiness status as a grpc.health.v1 Watch stream reports it, with arrival times."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
        self.seen: list[tuple[int, float]] = []
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.seen.append((response.status, time.monotonic()))
        except grpc.RpcError as error:
            self.error = error  # the server went away: the statuses seen are what counts
        finally:
            self.ended.set()

    def first(self, status: int) -> float | None:
        return next((at for seen, at in self.seen if seen == status), None)

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(TIMEOUT)
        self._channel.close()


class StreamWatch:
    """A server stream read on a thread; records how many messages came and how it ended."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.received = 0
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.received += 1
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()


def message_watch(client: Client, conversation_id: str) -> StreamWatch:
    request = cpb.WatchMessagesRequest(conversation_id=conversation_id)
    return StreamWatch(client.conversations.WatchMessages(request, timeout=TIMEOUT))


def task_watch(client: Client, task_id: str) -> StreamWatch:
    return StreamWatch(client.tasks.WatchTask(tpb.WatchTaskRequest(id=task_id), timeout=TIMEOUT))


def _timed(call: Callable[[int], Any], n: int) -> tuple[Any, float]:
    """The call's reply and when it came."""
    return call(n), time.monotonic()


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones(settings: Settings) -> None:
    server, cleanup = start_server(settings.replace(metrics_port=0, **CHUNKED))
    alice = sign_in(server, "alice")
    pool = ThreadPoolExecutor(max_workers=20)
    try:
        _add_documents(alice, {"warm-up": "Loads the embedding model before the test starts."})
        conversation = _conversation(alice, "busy", 0)
        watch = message_watch(alice, conversation.id)
        wait_until(lambda: _registry_value(server, "crewdb_streams_open", method=WATCH_MESSAGES) == 1)
        health = HealthWatch(server.address)
        wait_until(lambda: bool(health.seen), what="a first health status")
        stub = alice.conversations

        def add_message(n: int) -> Any:
            request = cpb.AddMessageRequest(conversation_id=conversation.id, role=USER_ROLE, content=f"m{n}")
            return stub.AddMessage(request, timeout=TIMEOUT)

        def add_document(n: int) -> Any:
            text = f"Long document {n}. " + LONG_TEXT
            document = vpb.DocumentInput(id=f"long-{n}", text=text)
            return alice.vectors.AddDocuments(vpb.AddDocumentsRequest(documents=[document]), timeout=TIMEOUT)

        messages = [pool.submit(_timed, add_message, n) for n in range(17)]
        documents = [pool.submit(_timed, add_document, n) for n in range(2)]

        def received(method: str, count: int) -> bool:
            finished = sum(
                _registry_value(server, "crewdb_rpc_calls_total", method=method, code=code)
                for code in ("OK", "CANCELLED", "UNAVAILABLE", "INTERNAL")
            )
            return finished + _registry_value(server, "crewdb_rpc_in_flight", method=method) == count

        # Every call has reached the server (in flight or done) before the stop begins.
        wait_until(
            lambda: received(ADD_MESSAGE, 17) and received(ADD_DOCUMENTS, 3), what="all calls received"
        )
        assert _registry_value(server, "crewdb_rpc_in_flight", method=ADD_DOCUMENTS) >= 1
        stopping: Future[Any] = pool.submit(lambda: server.call(server.app.stop(grace=5.0)))

        finished: list[tuple[Any, float]] = [future.result(TIMEOUT) for future in messages + documents]
        stopping.result(TIMEOUT)

        assert [reply.content for reply, _ in finished[:17]] == [f"m{n}" for n in range(17)]
        assert [reply.documents[0].chunk_count > 1 for reply, _ in finished[17:]] == [True, True]
        went_not_serving = health.first(NOT_SERVING)
        assert went_not_serving is not None, health.seen
        # At least one document was in flight when the stop began (checked above), so the last
        # to finish ended after it: NOT_SERVING must come before that, not after the drain.
        assert went_not_serving < max(at for _, at in finished[17:]), "NOT_SERVING only after the drain"
        assert watch.ended.wait(TIMEOUT)
        assert watch.error is None or watch.error.code() == grpc.StatusCode.UNAVAILABLE, watch.error
        with pytest.raises(grpc.RpcError) as refused:
            add_message(99)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        health.close()
    finally:
        pool.shutdown(wait=True)
        alice.close()
        cleanup()


def test_stop_with_only_streams_open_ends_each_stream_cleanly_and_returns_well_within_the_grace(
    settings: Settings,
) -> None:
    grace = 5.0
    server, cleanup = start_server(settings.replace(metrics_port=0))
    alice = sign_in(server, "alice")
    worker = sign_in(server, "worker", UserRole.WORKER)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        conversation = _conversation(alice, "watched", 0)
        messages = message_watch(alice, conversation.id)
        task = alice.tasks.CreateTask(tpb.CreateTaskRequest(type="idle", data=_struct({})), timeout=TIMEOUT)
        tasks = task_watch(alice, task.id)
        health = HealthWatch(server.address)
        wait_until(lambda: _registry_value(server, "crewdb_streams_open", method=WATCH_MESSAGES) == 1)
        wait_until(lambda: tasks.received == 1, what="the task's first state")
        wait_until(lambda: bool(health.seen), what="a first health status")
        # A worker waiting for work of a type nobody creates: a long poll, not a stream, held
        # up the drain the same way.
        request = tpb.ClaimTaskRequest(worker_id="w1", types=["nothing"], wait_seconds=30)
        claim = pool.submit(lambda: worker.tasks.ClaimTask(request, timeout=TIMEOUT))
        wait_until(lambda: _registry_value(server, "crewdb_rpc_in_flight", method=CLAIM_TASK) == 1)

        started = time.monotonic()
        server.call(server.app.stop(grace=grace))
        took = time.monotonic() - started

        assert took < grace / 2, f"stop waited {took:.1f}s for streams that should have ended"
        for stream in (messages, tasks, health):
            assert stream.ended.wait(TIMEOUT)
        # The documented endings: watchers are told to come back (UNAVAILABLE, never UNKNOWN or
        # CANCELLED); health watchers see NOT_SERVING and then the stream ends with OK.
        for stream in (messages, tasks):
            assert stream.error is not None
            problem = failure(stream.error)
            assert (problem.code, problem.reason) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
            assert "shutting down" in problem.message
        assert health.error is None, health.error
        assert health.seen[-1][0] == NOT_SERVING
        assert not claim.result(TIMEOUT).HasField("task")  # "no task", answered at once
    finally:
        pool.shutdown(wait=True)
        worker.close()
        alice.close()
        cleanup()


@pytest.mark.slow
def test_sigterm_lets_a_long_call_finish_then_exits_cleanly(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "CREWDB_HOST": "127.0.0.1",
        "CREWDB_PORT": str(port),
        "CREWDB_METRICS_PORT": str(metrics_port),
        "DATABASE_PATH": str(tmp_path / "app.db"),
        "VECTOR_DB_PATH": str(tmp_path / "vectordb"),
        "JWT_SECRET": TEST_SECRET,
        "CREWDB_SHUTDOWN_GRACE": "5",
        "CREWDB_CHUNK_SIZE": "200",
        "CREWDB_CHUNK_OVERLAP": "40",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "crewdb", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        with Client(f"127.0.0.1:{port}") as client, ThreadPoolExecutor(max_workers=1) as pool:
            client.register("long@example.com", "long", PASSWORD)
            client.login("long", PASSWORD)
            _add_documents(client, {"warm-up": "Loads the embedding model before the long call."})
            request = vpb.AddDocumentsRequest(documents=[vpb.DocumentInput(id="long", text=LONG_TEXT)])
            # On a thread, not `.future()`: the Client's retry-on-UNAUTHENTICATED waits for the outcome.
            call = pool.submit(lambda: client.vectors.AddDocuments(request, timeout=TIMEOUT))

            def in_flight() -> bool:
                samples = _scrape(metrics_port)[1]
                return _sample(samples, "crewdb_rpc_in_flight", method=ADD_DOCUMENTS) == 1.0

            wait_until(lambda: in_flight() or call.done(), what="AddDocuments in flight")
            assert not call.done(), "the call finished before the signal: make LONG_TEXT longer"
            process.send_signal(signal.SIGTERM)

            failed = call.exception(timeout=TIMEOUT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert failed is None, f"{failed}\n{stderr}"
    assert call.result().documents[0].chunk_count > 15
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    # The drain began while the call ran, and the call still finished.
    assert stderr.index("shutting down") < stderr.rindex("/crewdb.v1.VectorService/AddDocuments OK"), stderr
    assert "stopped" in stderr


# --- 7. the metrics endpoint -------------------------------------------------------------------


def test_metrics_endpoint_reports_calls_latency_dependencies_tasks_and_open_streams(
    settings: Settings,
) -> None:
    server, stop = start_server(settings.replace(metrics_port=0))
    try:
        port = server.app.metrics_port
        assert port is not None
        assert port > 0
        with sign_in(server, "alice") as alice:
            stub = alice.conversations
            created = stub.CreateConversation(cpb.CreateConversationRequest(title="m"), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetConversation(cpb.GetConversationRequest(id="no-such-conversation"), timeout=TIMEOUT)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            alice.tasks.CreateTask(
                tpb.CreateTaskRequest(type="metrics", data=struct_pb2.Struct()), timeout=TIMEOUT
            )
            watch = message_watch(alice, created.id)

            def streams_open() -> float | None:
                return _sample(_scrape(port)[1], "crewdb_streams_open", method=WATCH_MESSAGES)

            wait_until(lambda: streams_open() == 1.0, what="the stream counted open")
            text, samples = _scrape(port)
            watch.call.cancel()
            assert watch.ended.wait(TIMEOUT)
            wait_until(lambda: streams_open() == 0.0, what="the stream counted closed")

        create, get = (
            "/crewdb.v1.ConversationService/CreateConversation",
            "/crewdb.v1.ConversationService/GetConversation",
        )
        assert _sample(samples, "crewdb_rpc_calls_total", method=create, code="OK") == 1.0
        assert _sample(samples, "crewdb_rpc_calls_total", method=get, code="NOT_FOUND") == 1.0
        assert _sample(samples, "crewdb_rpc_duration_seconds_bucket", method=create, le="+Inf") == 1.0
        assert "crewdb_rpc_duration_seconds_bucket{" in text
        assert _sample(samples, "crewdb_rpc_duration_seconds_count", method=get) == 1.0
        assert _sample(samples, "crewdb_dependency_up", dependency="sqlite") == 1.0
        assert _sample(samples, "crewdb_tasks", status="queued") == 1.0
    finally:
        stop()


def test_a_server_without_a_metrics_port_serves_no_metrics(server: RunningServer) -> None:
    assert server.app.metrics_port is None
    assert server.app.metrics is None
