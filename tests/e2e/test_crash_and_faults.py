"""Crash safety and faults: kill -9 under writes, a database locked by another process, repairs at start."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crewdb.cli import main
from crewdb.client import Client
from crewdb.config import Settings
from crewdb.models import UserRole
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import system_service_pb2 as system_pb
from crewdb.v1 import system_service_pb2_grpc as system_grpc
from crewdb.v1 import task_service_pb2 as tasks_pb
from crewdb.v1 import user_service_pb2 as users_pb
from crewdb.v1 import vector_service_pb2 as vectors_pb
from crewdb.vectors.filters import Scalar
from tests.conftest import PASSWORD, TEST_SECRET, RunningServer, free_port, sign_in, start_server
from tests.rpc_errors import failure

SERVING = health_pb2.HealthCheckResponse.SERVING


class ServeProcess:
    """`python -m crewdb serve` on fixed data paths, started, killed and started again."""

    def __init__(self, data: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "DATABASE_PATH": str(data / "app.db"),
            "VECTOR_DB_PATH": str(data / "vectordb"),
            "CREWDB_PORT": str(self.port),
            "JWT_SECRET": TEST_SECRET,
            "CREWDB_HEALTH_CHECK_INTERVAL": "0.5",
        }
        self.process: subprocess.Popen[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "crewdb", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert self.process.poll() is None, self.process.communicate()[1]
                assert time.monotonic() < deadline, "the server never reported SERVING"
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> str:
        """SIGTERM; returns what the server wrote on stderr."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=30)
        return stderr


@contextmanager
def serving(data: Path) -> Iterator[ServeProcess]:
    server = ServeProcess(data)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.communicate()


def _create_admin(server: ServeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    argv = ["create-admin", "--email", "root@example.com", "--username", "root", "--password-stdin"]
    assert main(argv, {k: v for k, v in server.env.items() if k in ("DATABASE_PATH", "JWT_SECRET")}) == 0


def _integrity(path: Path) -> str:
    with sqlite3.connect(path) as raw:
        result: str = raw.execute("PRAGMA integrity_check").fetchone()[0]
    raw.close()
    return result


def _chroma_chunks(client: Client) -> tuple[int, int]:
    """(chunks in Chroma, chunks SQLite describes), from the admin health report."""
    report = system_grpc.SystemServiceStub(client.channel).GetHealthReport(system_pb.GetHealthReportRequest())
    details = {d.name: json_format.MessageToDict(d.details) for d in report.dependencies}
    return int(details["chroma"]["chunks"]), int(details["sqlite"]["rows"]["document_chunks"])


@pytest.mark.slow
def test_kill_9_under_writes_loses_no_acknowledged_write_and_leaves_a_sound_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(tmp_path) as server:
        _create_admin(server, monkeypatch)
        client = Client(server.address)
        client.register("alice@example.com", "alice", PASSWORD)
        client.login("alice", PASSWORD)
        conversation = client.conversations.CreateConversation(pb.CreateConversationRequest(title="crash"))
        acknowledged: dict[str, list[str]] = {"messages": [], "tasks": [], "documents": []}
        unexpected: list[grpc.RpcError] = []
        stop = threading.Event()

        def gone(error: grpc.RpcError) -> bool:
            """True when the call failed because the server died; anything else is a defect."""
            code = error.code() if isinstance(error, grpc.Call) else None
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                unexpected.append(error)
            return True

        def write_messages() -> None:
            i = 0
            while not stop.is_set():
                request = pb.AddMessageRequest(
                    conversation_id=conversation.id, role=pb.MESSAGE_ROLE_USER, content=f"message {i}"
                )
                try:
                    acknowledged["messages"].append(client.conversations.AddMessage(request, timeout=5).id)
                except grpc.RpcError as error:
                    if gone(error):
                        return
                i += 1

        def write_tasks() -> None:
            while not stop.is_set():
                request = tasks_pb.CreateTaskRequest(type="crash")
                request.data.update({"n": 1})
                try:
                    task = client.tasks.CreateTask(request, timeout=5)
                except grpc.RpcError as error:
                    if gone(error):
                        return
                acknowledged["tasks"].append(task.id)

        def write_documents() -> None:
            i = 0
            while not stop.is_set():
                document = vectors_pb.DocumentInput(
                    id=f"doc-{i % 5}", text=f"Version {i} of a document. " * 40
                )
                try:
                    client.vectors.AddDocuments(
                        vectors_pb.AddDocumentsRequest(documents=[document]), timeout=30
                    )
                except grpc.RpcError as error:
                    if gone(error):
                        return
                acknowledged["documents"].append(document.id)
                i += 1

        writers = [threading.Thread(target=w) for w in (write_messages, write_tasks, write_documents)]
        for writer in writers:
            writer.start()
        time.sleep(4)
        server.kill()
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
        client.close()
        assert not unexpected, [str(e) for e in unexpected]
        assert all(acknowledged.values()), "the load never got going"

        assert _integrity(tmp_path / "app.db") == "ok"
        server.start()
        with Client(server.address) as alice:
            alice.login("alice", PASSWORD)
            listed = alice.conversations.ListMessages(
                pb.ListMessagesRequest(conversation_id=conversation.id, page_size=200)
            )
            stored = {m.id for m in listed.messages}
            while listed.next_page_token:
                listed = alice.conversations.ListMessages(
                    pb.ListMessagesRequest(
                        conversation_id=conversation.id, page_size=200, page_token=listed.next_page_token
                    )
                )
                stored |= {m.id for m in listed.messages}
            assert set(acknowledged["messages"]) <= stored
            got = alice.conversations.GetConversation(pb.GetConversationRequest(id=conversation.id))
            assert got.message_count == len(stored)
            for task_id in acknowledged["tasks"]:
                assert alice.tasks.GetTask(tasks_pb.GetTaskRequest(id=task_id)).id == task_id
            for document_id in set(acknowledged["documents"]):
                document = alice.vectors.GetDocument(vectors_pb.GetDocumentRequest(id=document_id))
                assert document.chunk_count >= 1
        # The start-up check makes Chroma hold exactly the chunks SQLite describes.
        with Client(server.address) as root:
            root.login("root", PASSWORD)
            deadline = time.monotonic() + 60
            while (counts := _chroma_chunks(root))[0] != counts[1]:
                assert time.monotonic() < deadline, f"Chroma and SQLite disagree: {counts}"
                time.sleep(0.5)
        assert "Traceback" not in server.stop()


def test_the_startup_check_removes_stray_chunks_and_embeds_missing_ones(settings: Settings) -> None:
    running, stop = start_server(settings)
    try:
        alice = sign_in(running, "alice")
        owner = alice.users.GetMe(users_pb.GetMeRequest()).id
        documents = [
            vectors_pb.DocumentInput(id=f"doc-{i}", text=f"Document {i} is about bread and ovens. " * 40)
            for i in range(3)
        ]
        alice.vectors.AddDocuments(vectors_pb.AddDocumentsRequest(documents=documents))
        total = alice.vectors.GetVectorStats(vectors_pb.GetVectorStatsRequest()).chunks
        store = running.app.vectors
        # What a crash between Chroma and SQLite can leave: chunks of a document SQLite never
        # committed, chunks of a revision it replaced, and a document with chunks missing.
        stray: dict[str, Scalar] = {"_doc": "ghost", "_idx": 0, "_rev": 1, "_start": 0, "_end": 5}
        old: dict[str, Scalar] = {"_doc": "doc-0", "_idx": 0, "_rev": 0, "_start": 0, "_end": 5}
        running.call(
            store.upsert(
                owner,
                "all-MiniLM-L6-v2-int8",
                ids=["ghost#0@1", "doc-0#0@0"],
                embeddings=[[1.0] + [0.0] * 383, [0.0, 1.0] + [0.0] * 382],
                texts=["ghost", "old"],
                metadatas=[stray, old],
            )
        )
        running.call(store.delete(owner, ["doc-1#0@1"]))
        assert running.call(store.count(owner)) == total + 1
        alice.close()
    finally:
        stop()

    running, stop = start_server(settings)
    try:
        deadline = time.monotonic() + 30
        while running.call(running.app.vectors.count(owner)) != total or (
            "doc-1#0@1" not in {label[0] for label in running.call(running.app.vectors.chunk_labels(owner))}
        ):
            assert time.monotonic() < deadline, "the start-up check did not repair the knowledge base"
            time.sleep(0.2)
        labels = {label[0] for label in running.call(running.app.vectors.chunk_labels(owner))}
        assert "ghost#0@1" not in labels
        assert "doc-0#0@0" not in labels
    finally:
        stop()


@pytest.mark.slow
def test_a_database_locked_by_another_process_makes_writes_unavailable_then_recovers(
    server: RunningServer, client: Client
) -> None:
    conversation = client.conversations.CreateConversation(pb.CreateConversationRequest(title="locked"))
    hold = 8.0
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
            "c.execute('ROLLBACK')\n",
            str(server.settings.database_path),
            str(hold),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None
        assert locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        request = pb.AddMessageRequest(
            conversation_id=conversation.id, role=pb.MESSAGE_ROLE_USER, content="x"
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.conversations.AddMessage(request, timeout=30)
        waited = time.monotonic() - started
        assert failure(caught.value).code == grpc.StatusCode.UNAVAILABLE
        assert waited < hold  # bounded waiting, not until the lock goes
        # Reads go on meanwhile (WAL), and the server stays up.
        assert client.conversations.GetConversation(pb.GetConversationRequest(id=conversation.id)).id
    finally:
        locker.wait(timeout=30)
    added = client.conversations.AddMessage(request, timeout=30)
    listed = client.conversations.ListMessages(pb.ListMessagesRequest(conversation_id=conversation.id))
    assert [m.id for m in listed.messages] == [added.id]  # the refused write left nothing behind
    assert _integrity(server.settings.database_path) == "ok"


def test_an_admin_can_read_a_health_report_after_a_user_signs_in(server: RunningServer) -> None:
    # A smoke check of the report the crash test relies on, without subprocesses.
    root = sign_in(server, "root", UserRole.ADMIN)
    chroma, described = _chroma_chunks(root)
    assert (chroma, described) == (0, 0)
    root.close()
