"""VectorService against a real `chroma run` server: the HTTP path, its outages and its recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import chromadb
import grpc
import pytest
from chromadb.config import Settings as ChromaSettings

from crewdb.client import Client
from crewdb.config import Settings
from crewdb.v1 import conversation_service_pb2 as conversation_pb
from crewdb.v1 import user_service_pb2
from crewdb.v1 import vector_service_pb2 as pb
from crewdb.v1.conversation_service_pb2_grpc import ConversationServiceStub
from crewdb.v1.vector_service_pb2_grpc import VectorServiceStub
from tests.conftest import RunningServer, free_port, sign_in, start_server
from tests.rpc_errors import failure

pytestmark = pytest.mark.slow

CHROMA = Path(sys.executable).with_name("chroma")
HOST = "127.0.0.1"
VECTOR_TIMEOUT = 3.0
# Every call gets this deadline; a call failing on a down Chroma must return well before it.
DEADLINE = 10.0
QUICKLY = VECTOR_TIMEOUT + 2.0
# Conversation calls during an outage: under the vector timeout, so a loop blocked by the store
# would show, but with room for a loaded 2-core machine.
PROMPTLY = 2.5
STARTUP_TIMEOUT = 30.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
VECTOR_STORE_UNAVAILABLE = "VECTOR_STORE_UNAVAILABLE"

DOCUMENTS = {
    "bread": "Knead the dough for ten minutes, let it rise for an hour, then bake the loaf at 220 degrees.",
    "tides": "The moon's gravity pulls the oceans, so the sea rises and falls twice a day along the coast.",
    "python": "A Python list comprehension builds a new list by applying an expression to each item.",
}
BREAD_QUERY = "how long should I bake homemade bread in the oven"


class ChromaServer:
    """A `chroma run` subprocess on a fixed port and data folder, so it can be stopped and started again."""

    def __init__(self, path: Path, port: int, log: Path) -> None:
        self.path = path
        self.port = port
        self.log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Starts the server and waits until its heartbeat answers."""
        assert self._process is None, "already running"
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [str(CHROMA), "run", "--path", str(self.path), "--host", HOST, "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(f"chroma exited with {self._process.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"chroma did not answer in {STARTUP_TIMEOUT:g}s: {self._log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL) and waits until its port refuses connections."""
        process, self._process = self._process, None
        if process is None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused process would not act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        assert not self._answers(), "chroma still answers after it stopped"

    def pause(self) -> None:
        """Freezes the server: it still accepts connections (the kernel does) but never answers."""
        assert self._process is not None, "not running"
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None, "not running"
        os.kill(self._process.pid, signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> chromadb.api.ClientAPI:
        """A separate Chroma client, to see what crewdb really stored."""
        return chromadb.HttpClient(
            host=HOST, port=self.port, settings=ChromaSettings(anonymized_telemetry=False)
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as reply:  # noqa: S310 - fixed http URL
                return reply.status == 200  # type: ignore[no-any-return]
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


@pytest.fixture
def chroma_server(tmp_path: Path) -> Iterator[ChromaServer]:
    """A Chroma server on its own port and folder, not yet started."""
    server = ChromaServer(tmp_path / "chroma", free_port(), tmp_path / "chroma.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def chroma(chroma_server: ChromaServer) -> ChromaServer:
    """The Chroma server, running."""
    chroma_server.start()
    return chroma_server


def _crewdb_settings(settings: Settings, chroma: ChromaServer) -> Settings:
    return settings.replace(chroma_host=HOST, chroma_port=chroma.port, vector_timeout=VECTOR_TIMEOUT)


@pytest.fixture
def crewdb(settings: Settings, chroma: ChromaServer) -> Iterator[RunningServer]:
    """crewdb using the running Chroma server."""
    running, stop = start_server(_crewdb_settings(settings, chroma))
    try:
        yield running
    finally:
        stop()


@pytest.fixture
def alice(crewdb: RunningServer) -> Iterator[Client]:
    client = sign_in(crewdb, "alice")
    try:
        yield client
    finally:
        client.close()


def _user_id(client: Client) -> str:
    me: user_service_pb2.User = client.users.GetMe(user_service_pb2.GetMeRequest(), timeout=DEADLINE)
    return me.id


def _add(vectors: VectorServiceStub, documents: dict[str, str]) -> pb.AddDocumentsResponse:
    request = pb.AddDocumentsRequest(
        documents=[pb.DocumentInput(id=id_, text=text, title=id_.title()) for id_, text in documents.items()]
    )
    response: pb.AddDocumentsResponse = vectors.AddDocuments(request, timeout=DEADLINE)
    return response


def _search(vectors: VectorServiceStub, query: str = BREAD_QUERY) -> list[str]:
    """The document ids of a semantic search's results, best first."""
    request = pb.SearchRequest(query=query, top_k=3, mode=pb.SEARCH_MODE_SEMANTIC)
    response: pb.SearchResponse = vectors.Search(request, timeout=DEADLINE)
    return [result.document_id for result in response.results]


def _stats(vectors: VectorServiceStub) -> tuple[int, int]:
    stats: pb.VectorStats = vectors.GetVectorStats(pb.GetVectorStatsRequest(), timeout=DEADLINE)
    return stats.documents, stats.chunks


def _stored_chunks(chroma: ChromaServer, collection: str) -> int:
    return chroma.client().get_collection(collection).count()


def _assert_vector_store_unavailable(vectors: VectorServiceStub) -> None:
    """Search and AddDocuments fail with UNAVAILABLE (VECTOR_STORE_UNAVAILABLE) well inside their deadline."""
    calls: dict[str, Callable[[], object]] = {
        "Search": lambda: _search(vectors),
        "AddDocuments": lambda: _add(vectors, {"outage": "Written while the vector store was down."}),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            call()
        elapsed = time.monotonic() - started
        assert caught.value.code() == UNAVAILABLE, f"{name}: {caught.value.code()} after {elapsed:.1f}s"
        assert failure(caught.value).reason == VECTOR_STORE_UNAVAILABLE, name
        assert elapsed < QUICKLY, f"{name} took {elapsed:.1f}s to fail (deadline {DEADLINE:g}s)"


def _assert_conversations_answer_at_once(conversations: ConversationServiceStub, when: str) -> None:
    """CreateConversation and AddMessage succeed promptly: well within the hang, with room for a
    busy machine (a blocked event loop would hold them for the whole vector timeout and more)."""
    started = time.monotonic()
    try:
        conversation: conversation_pb.Conversation = conversations.CreateConversation(
            conversation_pb.CreateConversationRequest(title="During a Chroma outage"), timeout=PROMPTLY
        )
        conversations.AddMessage(
            conversation_pb.AddMessageRequest(
                conversation_id=conversation.id,
                role=conversation_pb.MESSAGE_ROLE_USER,
                content="still there?",
            ),
            timeout=PROMPTLY,
        )
    except grpc.RpcError as error:
        pytest.fail(
            f"ConversationService failed {when}: {error.code()} after {time.monotonic() - started:.1f}s"
        )
    elapsed = time.monotonic() - started
    assert elapsed < PROMPTLY, f"conversation calls took {elapsed:.1f}s {when}"


def test_documents_are_added_searched_counted_and_deleted_in_the_chroma_server(
    chroma: ChromaServer, alice: Client
) -> None:
    added = _add(alice.vectors, DOCUMENTS)
    assert [(d.id, d.chunk_count, d.replaced) for d in added.documents] == [
        (id_, 1, False) for id_ in DOCUMENTS
    ]
    collection = f"agent-knowledge.{_user_id(alice)}"
    assert _stored_chunks(chroma, collection) == 3

    assert _search(alice.vectors)[0] == "bread"
    assert _search(alice.vectors, "why does the ocean go up and down")[0] == "tides"
    stats: pb.VectorStats = alice.vectors.GetVectorStats(pb.GetVectorStatsRequest(), timeout=DEADLINE)
    assert (stats.documents, stats.chunks) == (3, 3)
    assert (stats.collection, stats.distance) == ("agent-knowledge", "cosine")

    deleted: pb.DeleteDocumentsResponse = alice.vectors.DeleteDocuments(
        pb.DeleteDocumentsRequest(ids=["bread"]), timeout=DEADLINE
    )
    assert list(deleted.deleted_ids) == ["bread"]
    assert _stored_chunks(chroma, collection) == 2
    assert _stats(alice.vectors) == (2, 2)
    assert "bread" not in _search(alice.vectors)


def test_while_chroma_is_down_vector_calls_are_unavailable_and_conversations_keep_working(
    chroma: ChromaServer, alice: Client
) -> None:
    _add(alice.vectors, DOCUMENTS)
    assert _search(alice.vectors)[0] == "bread"  # the model is loaded, so only Chroma can be slow
    collection = f"agent-knowledge.{_user_id(alice)}"

    chroma.stop()
    _assert_vector_store_unavailable(alice.vectors)
    _assert_conversations_answer_at_once(alice.conversations, "while Chroma was down")
    assert _stats(alice.vectors) == (3, 3)

    chroma.start()
    with pytest.raises(grpc.RpcError) as caught:
        alice.vectors.GetDocument(pb.GetDocumentRequest(id="outage"), timeout=DEADLINE)
    failed = failure(caught.value)
    assert (failed.code, failed.reason) == (grpc.StatusCode.NOT_FOUND, "DOCUMENT_NOT_FOUND")
    assert _stats(alice.vectors) == (3, 3)
    assert _stored_chunks(chroma, collection) == 3


@pytest.mark.parametrize(
    "call_during_outage", [True, False], ids=["after-a-failed-call", "without-a-call-during-the-outage"]
)
def test_search_finds_earlier_documents_once_chroma_restarts_without_restarting_crewdb(
    chroma: ChromaServer, alice: Client, call_during_outage: bool
) -> None:
    _add(alice.vectors, DOCUMENTS)
    assert _search(alice.vectors)[0] == "bread"

    if call_during_outage:
        chroma.stop()
        _assert_vector_store_unavailable(alice.vectors)
        chroma.start()
    else:
        chroma.restart()

    assert _search(alice.vectors)[0] == "bread"
    assert _search(alice.vectors, "why does the ocean go up and down")[0] == "tides"
    _add(alice.vectors, {"rust": "Rust's borrow checker rejects code that would let two owners mutate data."})
    assert _stats(alice.vectors) == (4, 4)


def test_crewdb_starts_while_chroma_is_down_and_uses_it_once_it_comes_up(
    settings: Settings, chroma_server: ChromaServer
) -> None:
    started = time.monotonic()
    running, stop = start_server(_crewdb_settings(settings, chroma_server))
    try:
        assert time.monotonic() - started < QUICKLY, "startup waited for Chroma"
        alice = sign_in(running, "alice")
        try:
            _assert_vector_store_unavailable(alice.vectors)

            chroma_server.start()
            _add(alice.vectors, DOCUMENTS)
            assert _search(alice.vectors)[0] == "bread"
            assert _stored_chunks(chroma_server, f"agent-knowledge.{_user_id(alice)}") == 3
        finally:
            alice.close()
    finally:
        stop()


def _failed_search(vectors: VectorServiceStub) -> tuple[grpc.RpcError | None, float]:
    """Runs a Search that should fail: its error (None if it succeeded) and how long it took."""
    started = time.monotonic()
    try:
        _search(vectors)
    except grpc.RpcError as error:
        return error, time.monotonic() - started
    return None, time.monotonic() - started


def test_while_chroma_hangs_each_vector_call_fails_within_the_vector_timeout_and_conversations_keep_working(
    chroma: ChromaServer, alice: Client
) -> None:
    _add(alice.vectors, DOCUMENTS)
    assert _search(alice.vectors)[0] == "bread"

    chroma.pause()
    try:
        with ThreadPoolExecutor(1) as pool:
            # Search 1 times out on crewdb's open client; Search 2 connects afresh to the hung server.
            for attempt in (1, 2):
                pending = pool.submit(_failed_search, alice.vectors)
                _assert_conversations_answer_at_once(alice.conversations, f"while Search {attempt} waited")
                time.sleep(VECTOR_TIMEOUT + 0.5)
                _assert_conversations_answer_at_once(
                    alice.conversations, f"after Search {attempt} passed the vector timeout"
                )
                error, elapsed = pending.result()
                assert error is not None, f"Search {attempt} succeeded against a hung Chroma"
                assert error.code() == UNAVAILABLE, f"Search {attempt}: {error.code()} after {elapsed:.1f}s"
                assert failure(error).reason == VECTOR_STORE_UNAVAILABLE
                assert elapsed < QUICKLY, f"Search {attempt} took {elapsed:.1f}s to fail"
    finally:
        chroma.resume()

    assert _search(alice.vectors)[0] == "bread"


def test_under_load_a_chroma_restart_fails_only_vector_calls_fast_and_they_recover_by_themselves(
    chroma: ChromaServer, crewdb: RunningServer, alice: Client
) -> None:
    _add(alice.vectors, DOCUMENTS)
    conversation = alice.conversations.CreateConversation(
        conversation_pb.CreateConversationRequest(title="under load"), timeout=DEADLINE
    )
    outcomes: dict[str, list[tuple[float, grpc.StatusCode | None, float]]] = {"vectors": [], "chats": []}
    stop = threading.Event()

    def keep_calling(kind: str, call: Callable[[], object]) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                call()
                code = None
            except grpc.RpcError as error:
                code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            outcomes[kind].append((started, code, time.monotonic() - started))

    def chat() -> object:
        request = conversation_pb.AddMessageRequest(
            conversation_id=conversation.id, role=conversation_pb.MESSAGE_ROLE_USER, content="still here"
        )
        return alice.conversations.AddMessage(request, timeout=DEADLINE)

    callers = [
        threading.Thread(target=keep_calling, args=("vectors", lambda: _search(alice.vectors))),
        threading.Thread(target=keep_calling, args=("vectors", lambda: _stats(alice.vectors))),
        threading.Thread(target=keep_calling, args=("chats", chat)),
        threading.Thread(target=keep_calling, args=("chats", chat)),
    ]
    for caller in callers:
        caller.start()
    try:
        time.sleep(1.0)
        chroma.stop()
        time.sleep(2 * VECTOR_TIMEOUT)
        chroma.start()
        recovered_by = time.monotonic() + 30
        while time.monotonic() < recovered_by:  # until searches succeed again, with no restart
            time.sleep(0.5)
            recent = [o for o in outcomes["vectors"] if o[0] > time.monotonic() - 1.5]
            if recent and all(code is None for _, code, _ in recent):
                break
        else:
            pytest.fail("vector calls did not recover after Chroma came back")
    finally:
        stop.set()
        for caller in callers:
            caller.join(timeout=30)

    assert all(code is None for _, code, _ in outcomes["chats"]), "conversation calls failed meanwhile"
    failed = [(code, took) for _, code, took in outcomes["vectors"] if code is not None]
    assert failed, "no vector call ran while Chroma was down"
    assert {code for code, _ in failed} == {UNAVAILABLE}
    assert max(took for _, took in failed) < QUICKLY
