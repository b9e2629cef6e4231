"""Faults around embedding: a server that hangs or answers garbage, health checks that embed nothing,
and deadlines that expire mid-work."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crewdb.config import Settings
from crewdb.v1 import conversation_service_pb2 as pb
from crewdb.v1 import vector_service_pb2 as vectors_pb
from tests.conftest import RunningServer, sign_in, start_server
from tests.rpc_errors import failure


class EmbeddingServer:
    """A local Ollama: `POST /api/embed` whose behaviour the test switches (answer, hang, garbage,
    JSON nested too deep to parse), and `GET /api/tags` listing `listed`. Keeps every request line."""

    def __init__(self) -> None:
        self.mode = "answer"
        self.listed = ["tiny:latest"]
        self.requests: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests.append(f"POST {self.path}")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.mode == "hang":
                    outer.release.wait(30)
                if outer.mode == "garbage":
                    payload = b"<html>502 Bad Gateway</html>"
                elif outer.mode == "nested":
                    payload = b"[" * 100_000 + b"]" * 100_000
                else:
                    vectors = [
                        [float(len(text) % 7 + 1), 1.0, float(i % 3)] for i, text in enumerate(body["input"])
                    ]
                    payload = json.dumps({"embeddings": vectors}).encode()
                self._send(payload)

            def do_GET(self) -> None:
                outer.requests.append(f"GET {self.path}")
                models = [{"name": name, "model": name} for name in outer.listed]
                self._send(json.dumps({"models": models}).encode())

            def _send(self, payload: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def embedding_server() -> Iterator[EmbeddingServer]:
    server = EmbeddingServer()
    yield server
    server.close()


@pytest.fixture
def crewdb(settings: Settings, embedding_server: EmbeddingServer) -> Iterator[RunningServer]:
    running, stop = start_server(
        settings.replace(
            embedder="ollama", embedding_model="tiny", embedder_url=embedding_server.url, embedder_timeout=1.0
        )
    )
    try:
        yield running
    finally:
        stop()


def _document(
    doc_id: str, text: str = "Bread needs flour, water, salt and time."
) -> vectors_pb.AddDocumentsRequest:
    return vectors_pb.AddDocumentsRequest(documents=[vectors_pb.DocumentInput(id=doc_id, text=text)])


@pytest.mark.parametrize("mode", ["hang", "garbage", "nested"])
def test_an_embedding_server_that_hangs_or_answers_garbage_is_unavailable_and_nothing_else_suffers(
    crewdb: RunningServer, embedding_server: EmbeddingServer, mode: str
) -> None:
    alice = sign_in(crewdb, "alice")
    alice.vectors.AddDocuments(_document("kept"))
    embedding_server.mode = mode

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as searched:
        alice.vectors.Search(vectors_pb.SearchRequest(query="how is bread made"), timeout=10)
    with pytest.raises(grpc.RpcError) as added:
        alice.vectors.AddDocuments(_document("new"), timeout=10)
    elapsed = time.monotonic() - started

    for caught in (searched, added):
        problem = failure(caught.value)
        assert problem.code == grpc.StatusCode.UNAVAILABLE
        assert problem.reason == "EMBEDDER_UNAVAILABLE"
    assert elapsed < 6  # the embedder's 1 s time-out (twice), not the caller's 10 s deadline
    # Nothing half-written, and everything else keeps serving meanwhile.
    stats = alice.vectors.GetVectorStats(vectors_pb.GetVectorStatsRequest())
    assert (stats.documents, stats.chunks) == (1, 1)
    created = alice.conversations.CreateConversation(
        pb.CreateConversationRequest(title="still here"), timeout=2
    )
    assert created.id
    # Recovery needs no restart.
    embedding_server.mode = "answer"
    embedding_server.release.set()
    alice.vectors.AddDocuments(_document("new"), timeout=10)
    assert alice.vectors.GetVectorStats(vectors_pb.GetVectorStatsRequest()).documents == 2
    alice.close()


def _vector_service_status(server: RunningServer) -> int:
    with grpc.insecure_channel(server.address) as channel:
        request = health_pb2.HealthCheckRequest(service="crewdb.v1.VectorService")
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def _wait_for_status(server: RunningServer, status: int) -> None:
    deadline = time.monotonic() + 10
    while _vector_service_status(server) != status:
        assert time.monotonic() < deadline, f"VectorService never became {status}"
        time.sleep(0.1)


def test_the_health_checker_lists_the_embedding_servers_models_and_never_embeds(
    crewdb: RunningServer, embedding_server: EmbeddingServer
) -> None:
    # Embedding text to see whether the server is up would be billed on a paid API, every 0.2 s here.
    deadline = time.monotonic() + 10
    while embedding_server.requests.count("GET /api/tags") < 5:
        assert time.monotonic() < deadline, embedding_server.requests
        time.sleep(0.05)
    assert _vector_service_status(crewdb) == health_pb2.HealthCheckResponse.SERVING
    assert set(embedding_server.requests) == {"GET /api/tags"}

    embedding_server.listed = ["llama3:latest"]  # the model was removed: embedding would fail
    _wait_for_status(crewdb, health_pb2.HealthCheckResponse.NOT_SERVING)
    embedding_server.listed = ["tiny:latest"]
    _wait_for_status(crewdb, health_pb2.HealthCheckResponse.SERVING)
    assert set(embedding_server.requests) == {"GET /api/tags"}
