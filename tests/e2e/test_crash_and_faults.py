"""Crash safety and faults: kill -9 mid-write, a locked database, start-up repairs, deadlines, disconnects."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chromadb
import grpc
import pytest
from chromadb.config import Settings as ChromaSettings
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

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
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from crewdb.vectors.filters import Scalar
from tests.conftest import (
    PASSWORD,
    TEST_SECRET,
    HashEmbedder,
    RunningServer,
    free_port,
    sign_in,
    start_server,
)
from tests.rpc_errors import failure

SERVING = health_pb2.HealthCheckResponse.SERVING
COLLECTION = "agent-knowledge"  # the default CHROMA_COLLECTION: ServeProcess passes no CHROMA_ variable


class ServeProcess:
    """`python -m crewdb serve` on fixed data paths, started, killed and started again; its
    stderr is read as it comes (a full pipe would block the server's logging)."""

    def __init__(self, data: Path) -> None:
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("CREWDB_", "CHROMA_"))},
            "DATABASE_PATH": str(data / "app.db"),
            "VECTOR_DB_PATH": str(data / "vectordb"),
            "CREWDB_PORT": str(self.port),
            "JWT_SECRET": TEST_SECRET,
            "CREWDB_HEALTH_CHECK_INTERVAL": "0.5",
        }
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # stderr since the last start
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "crewdb", "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, args=(self.process, self.lines), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING:
                        return
                except grpc.RpcError:
                    pass
                assert self.process.poll() is None, self.log
                assert time.monotonic() < deadline, "the server never reported SERVING"
                time.sleep(0.1)

    @staticmethod
    def _read(process: subprocess.Popen[str], lines: list[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)

    def wait_for_line(self, *fragments: str, seconds: float = 60) -> str:
        """The first stderr line that holds one of `fragments`, waiting for it as long as `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            for line in list(self.lines):
                if any(fragment in line for fragment in fragments):
                    return line
            assert self.process is not None
            assert self.process.poll() is None, f"the server exited: {self.log}"
            assert time.monotonic() < deadline, f"no line with any of {fragments} in: {self.log}"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._join()

    def stop(self) -> str:
        """SIGTERM; returns what the server wrote on stderr."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self._join()
        return self.log

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)


@contextmanager
def serving(data: Path) -> Iterator[ServeProcess]:
    server = ServeProcess(data)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


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


@dataclass
class Acknowledged:
    """What the writers were told was stored, and the document write in flight when the server died."""

    messages: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    # Per document, the texts of its acknowledged writes in order; each was a new revision.
    documents: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    in_flight: dict[str, str] = field(default_factory=dict)
    unexpected: list[grpc.RpcError] = field(default_factory=list)

    def gone(self, error: grpc.RpcError) -> bool:
        """True when the call failed because the server died; anything else is a defect."""
        code = error.code() if isinstance(error, grpc.Call) else None
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.unexpected.append(error)
        return True

    def going(self) -> bool:
        """Whether every kind of write has been acknowledged many times, each document replaced."""
        replaced = len(self.documents) == 5 and all(len(texts) >= 3 for texts in self.documents.values())
        return len(self.messages) >= 100 and len(self.tasks) >= 100 and replaced


def _write_under_load(
    client: Client, conversation: str, done: threading.Event
) -> tuple[Acknowledged, list[threading.Thread]]:
    """Three writers (messages, tasks, documents), each until `done` or its first failed call."""
    seen = Acknowledged()

    def write_messages() -> None:
        i = 0
        while not done.is_set():
            request = pb.AddMessageRequest(
                conversation_id=conversation, role=pb.MESSAGE_ROLE_USER, content=f"message {i}"
            )
            try:
                seen.messages.append(client.conversations.AddMessage(request, timeout=5).id)
            except grpc.RpcError as error:
                if seen.gone(error):
                    return
            i += 1

    def write_tasks() -> None:
        while not done.is_set():
            request = tasks_pb.CreateTaskRequest(type="crash")
            request.data.update({"n": 1})
            try:
                seen.tasks.append(client.tasks.CreateTask(request, timeout=5).id)
            except grpc.RpcError as error:
                if seen.gone(error):
                    return

    def write_documents() -> None:
        i = 0
        while not done.is_set():
            # Five documents replaced in turn, each version a different length (chunk count).
            document = vectors_pb.DocumentInput(
                id=f"doc-{i % 5}", text=f"Version {i} of a document. " * (40 + i)
            )
            seen.in_flight[document.id] = document.text
            try:
                client.vectors.AddDocuments(vectors_pb.AddDocumentsRequest(documents=[document]), timeout=30)
            except grpc.RpcError as error:
                if seen.gone(error):
                    return
            del seen.in_flight[document.id]
            seen.documents[document.id].append(document.text)
            i += 1

    writers = [threading.Thread(target=w) for w in (write_messages, write_tasks, write_documents)]
    for writer in writers:
        writer.start()
    return seen, writers


def _expected_chunks(database: Path) -> dict[str, set[str]]:
    """Per owner, the ids of the chunks SQLite describes: `<doc id>#<index>@<revision>`."""
    expected: dict[str, set[str]] = defaultdict(set)
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        for owner, doc, count, revision in db.execute(
            "SELECT owner_id, id, chunk_count, revision FROM documents"
        ):
            expected[owner] |= {f"{doc}#{index}@{revision}" for index in range(count)}
    return expected


def _chroma_ids(vectordb: Path) -> dict[str, set[str]]:
    """Per collection, the ids of the chunks Chroma holds (read from its files: the server is stopped)."""
    # Any: `close` (which releases the files) is not in chromadb's ClientAPI type.
    chroma: Any = chromadb.PersistentClient(
        str(vectordb), settings=ChromaSettings(anonymized_telemetry=False)
    )
    try:
        return {c.name: set(c.get(include=[])["ids"]) for c in chroma.list_collections()}
    finally:
        chroma.close()


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
        done = threading.Event()
        seen, writers = _write_under_load(client, conversation.id, done)
        deadline = time.monotonic() + 60
        while not seen.going():
            assert time.monotonic() < deadline, "the load never got going"
            assert not seen.unexpected, [str(e) for e in seen.unexpected]
            time.sleep(0.05)
        # Then another hundred messages: the kill lands at no set point of a document write.
        target = len(seen.messages) + 100
        while len(seen.messages) < target:
            assert time.monotonic() < deadline, "the load stalled"
            time.sleep(0.01)
        server.kill()
        done.set()
        for writer in writers:
            writer.join(timeout=60)
        client.close()
        assert not seen.unexpected, [str(e) for e in seen.unexpected]
        assert _integrity(tmp_path / "app.db") == "ok"

        server.start()
        # The start-up check (in the background) has made Chroma agree with SQLite.
        line = server.wait_for_line("knowledge base check", "knowledge base repaired")
        assert "skipped" not in line, line
        with Client(server.address) as alice:
            alice.login("alice", PASSWORD)
            owner = alice.users.GetMe(users_pb.GetMeRequest()).id
            stored = _message_ids(alice, conversation.id)
            assert set(seen.messages) <= stored
            got = alice.conversations.GetConversation(pb.GetConversationRequest(id=conversation.id))
            assert got.message_count == len(stored)
            for task_id in seen.tasks:
                task = alice.tasks.GetTask(tasks_pb.GetTaskRequest(id=task_id))
                assert (task.id, json_format.MessageToDict(task.data)) == (task_id, {"n": 1})
            for document_id, texts in seen.documents.items():
                document = alice.vectors.GetDocument(vectors_pb.GetDocumentRequest(id=document_id))
                # The last acknowledged version, or the one in flight if it committed before the kill.
                assert document.text in {texts[-1], seen.in_flight.get(document_id)}, document_id
        assert "Traceback" not in server.stop()

    # The files of the stopped server: Chroma's ids per owner exactly SQLite's chunks (each
    # document's text was checked above; revisions are write times, not counts).
    expected = _expected_chunks(tmp_path / "app.db")
    held = _chroma_ids(tmp_path / "vectordb")
    assert expected[owner], "no chunks to compare"
    for collection in set(held) | {f"{COLLECTION}.{o}" for o in expected}:
        in_sqlite = expected.get(collection.removeprefix(f"{COLLECTION}."), set())
        in_chroma = held.get(collection, set())
        assert in_chroma == in_sqlite, (
            f"{collection}: missing in Chroma {sorted(in_sqlite - in_chroma)[:5]}, "
            f"stray {sorted(in_chroma - in_sqlite)[:5]}"
        )
    assert _integrity(tmp_path / "app.db") == "ok"


def _message_ids(client: Client, conversation: str) -> set[str]:
    ids: set[str] = set()
    token = ""
    while True:
        listed = client.conversations.ListMessages(
            pb.ListMessagesRequest(conversation_id=conversation, page_size=200, page_token=token)
        )
        ids |= {m.id for m in listed.messages}
        token = listed.next_page_token
        if not token:
            return ids


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
        with sqlite3.connect(settings.database_path) as db:
            (revision,) = db.execute("SELECT revision FROM documents WHERE id = 'doc-1'").fetchone()
        missing = f"doc-1#0@{revision}"
        running.call(store.delete(owner, [missing]))
        assert running.call(store.count(owner)) == total + 1
        alice.close()
    finally:
        stop()

    running, stop = start_server(settings)
    try:
        deadline = time.monotonic() + 30
        while running.call(running.app.vectors.count(owner)) != total or (
            missing not in {label[0] for label in running.call(running.app.vectors.chunk_labels(owner))}
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


# --- deadlines and disconnects ---------------------------------------------------------------------


class Gate:
    """Holds one step of the server's work for `seconds`, once, when armed; records when it ran."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.entered = threading.Event()
        self.left = threading.Event()

    def arm(self, seconds: float) -> None:
        self.seconds = seconds

    def _take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        if seconds:
            self.entered.set()
        return seconds

    def hold(self) -> None:
        """On a worker thread (the embedder's)."""
        if seconds := self._take():
            time.sleep(seconds)
            self.left.set()

    async def hold_async(self) -> None:
        """On the server's event loop."""
        if seconds := self._take():
            try:
                await asyncio.sleep(seconds)
            finally:
                self.left.set()


class GatedEmbedder(HashEmbedder):
    def __init__(self, gate: Gate | None) -> None:
        self.gate = gate

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.gate is not None:
            self.gate.hold()
        return super().embed(texts)


OLD_TEXT = "Flour, water and salt rest overnight before the dough is shaped. " * 80
NEW_TEXT = "The oven stays hot for an hour and the loaves bake in steam. " * 140
WRITE_DEADLINE = 1.0  # seconds the client gives the replacement
HOLD = 3.0  # seconds the held step takes: the deadline expires while it runs


def _document_request(doc_id: str, text: str) -> vectors_pb.AddDocumentsRequest:
    return vectors_pb.AddDocumentsRequest(documents=[vectors_pb.DocumentInput(id=doc_id, text=text)])


@pytest.mark.parametrize("stage", ["embedding", "chroma written", "sqlite committed"])
def test_a_deadline_that_expires_mid_write_leaves_the_old_or_the_new_document_whole(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """The deadline expires while the replacement is embedded, after its chunks are in Chroma
    but before SQLite commits, or after the commit but before the old chunks are deleted. Once
    the server has settled, the document is the old one or the new one, whole in SQLite and
    Chroma, no search shows the other; and the server goes on serving."""
    gate = Gate()
    monkeypatch.setattr(
        "crewdb.server.build_embedder",
        lambda _settings: GatedEmbedder(gate if stage == "embedding" else None),
    )
    running, stop = start_server(settings)
    try:
        alice = sign_in(running, "alice")
        owner = alice.users.GetMe(users_pb.GetMeRequest()).id
        alice.vectors.AddDocuments(_document_request("bread", OLD_TEXT), timeout=30)
        store = running.app.vectors
        if stage == "chroma written":
            upsert = store.upsert

            async def upsert_then_hold(*args: Any, **kwargs: Any) -> None:
                await upsert(*args, **kwargs)
                await gate.hold_async()

            monkeypatch.setattr(store, "upsert", upsert_then_hold)
        elif stage == "sqlite committed":
            delete = store.delete  # after the commit, the old revision's chunks are deleted

            async def hold_then_delete(*args: Any, **kwargs: Any) -> None:
                await gate.hold_async()
                await delete(*args, **kwargs)

            monkeypatch.setattr(store, "delete", hold_then_delete)
        gate.arm(HOLD)
        with pytest.raises(grpc.RpcError) as caught:
            alice.vectors.AddDocuments(_document_request("bread", NEW_TEXT), timeout=WRITE_DEADLINE)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Not vacuous: the held step had begun when the deadline expired, and had not ended.
        assert gate.entered.is_set(), f"the deadline expired before the write reached the {stage} step"
        assert not gate.left.is_set()

        # Settled: the held step is over, then a write of alice's own goes through (writes of one
        # owner take turns, so any write still under way is finished).
        assert gate.left.wait(30)
        alice.vectors.AddDocuments(_document_request("probe", "A probe of the write lock."), timeout=30)

        document = alice.vectors.GetDocument(vectors_pb.GetDocumentRequest(id="bread"))
        assert document.text in (OLD_TEXT, NEW_TEXT)
        other = NEW_TEXT if document.text == OLD_TEXT else OLD_TEXT
        with closing(sqlite3.connect(f"file:{settings.database_path}?mode=ro", uri=True)) as db:
            revision, rows = db.execute(
                "SELECT revision, (SELECT count(*) FROM document_chunks k"
                " WHERE k.owner_id = d.owner_id AND k.document_id = d.id)"
                " FROM documents d WHERE owner_id = ? AND id = ?",
                (owner, "bread"),
            ).fetchone()
        assert rows == document.chunk_count
        labels = running.call(store.chunk_labels(owner))
        in_chroma = {chunk for chunk, doc, _ in labels if doc == "bread"}
        assert in_chroma == {f"bread#{index}@{revision}" for index in range(document.chunk_count)}
        for mode in (vectors_pb.SEARCH_MODE_SEMANTIC, vectors_pb.SEARCH_MODE_KEYWORD):
            found = alice.vectors.Search(
                vectors_pb.SearchRequest(query=other[:60], top_k=50, mode=mode), timeout=30
            )
            for hit in found.results:
                if hit.document_id == "bread":
                    assert hit.text in document.text, "a search shows the version that is not stored"

        # It goes on serving: the replacement, sent again with time enough, lands whole.
        alice.vectors.AddDocuments(_document_request("bread", NEW_TEXT), timeout=30)
        assert alice.vectors.GetDocument(vectors_pb.GetDocumentRequest(id="bread")).text == NEW_TEXT
        alice.close()
    finally:
        stop()


def test_a_claim_whose_deadline_expires_leaves_no_task_leased_to_nobody(server: RunningServer) -> None:
    """A worker gives up on a long poll; a task created after that goes to the next worker at once,
    not to the one that left."""
    alice = sign_in(server, "alice")
    runner = sign_in(server, "runner", UserRole.WORKER)
    try:
        for attempt in range(3):
            kind = f"poll-{attempt}"
            waiting = tasks_pb.ClaimTaskRequest(worker_id="gone", types=[kind], wait_seconds=20)
            with pytest.raises(grpc.RpcError) as caught:
                runner.tasks.ClaimTask(waiting, timeout=0.5 + attempt * 0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            data = struct_pb2.Struct()
            task = alice.tasks.CreateTask(tasks_pb.CreateTaskRequest(type=kind, data=data), timeout=10)
            claim = tasks_pb.ClaimTaskRequest(worker_id="present", types=[kind])
            claimed = runner.tasks.ClaimTask(claim, timeout=10)
            assert claimed.task.id == task.id, "the task went to the worker that had given up"
            held = runner.tasks.GetTask(tasks_pb.GetTaskRequest(id=task.id))
            assert (held.status, held.worker_id) == (tasks_pb.TASK_STATUS_RUNNING, "present")
    finally:
        alice.close()
        runner.close()


WATCH_METHOD = "/crewdb.v1.ConversationService/WatchMessages"
# A client that watches a conversation until it is killed, printing a line for each message.
WATCHER_SCRIPT = """
import sys
import grpc
from crewdb.v1 import conversation_service_pb2 as pb, conversation_service_pb2_grpc as pb_grpc
address, token, conversation = sys.argv[1:]
channel = grpc.insecure_channel(address)
stream = pb_grpc.ConversationServiceStub(channel).WatchMessages(
    pb.WatchMessagesRequest(conversation_id=conversation), metadata=(("authorization", "Bearer " + token),)
)
for response in stream:
    print(response.message.id, flush=True)
"""


def _open_streams(metrics_port: int) -> float:
    """crewdb_streams_open for WatchMessages, as Prometheus would scrape it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "crewdb_streams_open" and sample.labels.get("method") == WATCH_METHOD:
                return float(sample.value)
    return 0.0


def _wait_until(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["channel closed", "client killed"])
def test_a_client_that_disconnects_mid_watch_releases_its_stream_and_the_server_keeps_serving(
    settings: Settings, how: str
) -> None:
    running, stop = start_server(settings.replace(metrics_port=0))
    try:
        metrics_port = running.app.metrics_port
        assert metrics_port is not None
        events = running.app.events
        alice = sign_in(running, "alice")
        conversation = alice.conversations.CreateConversation(pb.CreateConversationRequest(title="watched"))
        streams, watchers = _open_streams(metrics_port), events.watcher_count()

        def say(content: str) -> str:
            request = pb.AddMessageRequest(
                conversation_id=conversation.id, role=pb.MESSAGE_ROLE_USER, content=content
            )
            return str(alice.conversations.AddMessage(request, timeout=10).id)

        token = alice.access_token()
        assert token is not None
        if how == "client killed":
            client = subprocess.Popen(
                [sys.executable, "-c", WATCHER_SCRIPT, running.address, token, conversation.id],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                _wait_until(lambda: events.watcher_count() == watchers + 1, "the watch never opened", 60)
                said = say("first")
                assert client.stdout is not None
                assert client.stdout.readline().strip() == said  # the stream was live
                client.send_signal(signal.SIGKILL)  # no goodbye: the socket just goes
            finally:
                client.kill()
                client.wait(timeout=10)
        else:
            channel = grpc.insecure_channel(running.address)
            stream = ConversationServiceStub(channel).WatchMessages(
                pb.WatchMessagesRequest(conversation_id=conversation.id),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            said = say("first")
            assert next(stream).message.id == said
            channel.close()  # the call is never cancelled on its own
        assert _open_streams(metrics_port) in (streams, streams + 1)

        _wait_until(
            lambda: events.watcher_count() == watchers and _open_streams(metrics_port) == streams,
            f"the stream was not released: {events.watcher_count()} watchers, "
            f"{_open_streams(metrics_port)} open streams",
        )
        # It goes on serving, watches included.
        with grpc.insecure_channel(running.address) as channel:
            stream = ConversationServiceStub(channel).WatchMessages(
                pb.WatchMessagesRequest(conversation_id=conversation.id),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
            _wait_until(lambda: events.watcher_count() == watchers + 1, "a new watch never opened")
            said = say("second")
            assert next(stream).message.id == said
            stream.cancel()
        got = alice.conversations.GetConversation(pb.GetConversationRequest(id=conversation.id))
        assert got.message_count == 2
        alice.close()
    finally:
        stop()
