"""Shared fixtures: a real crewdb server on 127.0.0.1:0 over a temp SQLite file, and its stubs."""

from __future__ import annotations

import asyncio
import hashlib
import math
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crewdb.client import Client
from crewdb.config import Settings
from crewdb.models import UserRole
from crewdb.server import App, build_server
from crewdb.v1 import conversation_service_pb2_grpc

T = TypeVar("T")

TEST_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"  # noqa: S105 - a test fixture
PASSWORD = "correct horse battery staple"  # noqa: S105 - a test fixture


@dataclass
class RunningServer:
    """A crewdb server on its own event loop thread; `call` runs a coroutine on that loop."""

    app: App
    loop: asyncio.AbstractEventLoop
    settings: Settings

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


def settings_in(folder: Path) -> Settings:
    """A test server's settings: loopback on a free port, its data in `folder`, quick health checks."""
    return Settings(
        host="127.0.0.1",
        port=0,
        database_path=folder / "app.db",
        vector_db_path=folder / "vectordb",
        health_check_interval=0.2,
        shutdown_grace=1.0,
        jwt_secret=TEST_SECRET,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_in(tmp_path)


def start_server(settings: Settings) -> tuple[RunningServer, Callable[[], None]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="crewdb-test-server", daemon=True)
    thread.start()
    started: Future[App] = asyncio.run_coroutine_threadsafe(build_server(settings), loop)
    app = started.result(timeout=30)
    running = RunningServer(app=app, loop=loop, settings=settings)

    def stop() -> None:
        running.call(app.stop(grace=1.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()

    return running, stop


@pytest.fixture
def server(settings: Settings) -> Iterator[RunningServer]:
    running, stop = start_server(settings)
    try:
        yield running
    finally:
        stop()


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


def sign_in(server: RunningServer, username: str, role: UserRole = UserRole.USER) -> Client:
    """A Client signed in as a new account `username` with `role`."""
    server.call(server.app.accounts.register(f"{username}@example.com", username, PASSWORD, role=role))
    client = Client(server.address)
    client.login(username, PASSWORD)
    return client


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    """Signed in as `alice`, a plain user."""
    signed_in = sign_in(server, "alice")
    yield signed_in
    signed_in.close()


@pytest.fixture
def conversations(client: Client) -> conversation_service_pb2_grpc.ConversationServiceStub:
    """alice's ConversationService stub: every call carries her access token."""
    return client.conversations


def free_port() -> int:
    """A port nothing listens on right now (for servers started as subprocesses)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HashEmbedder:
    """A fast stand-in for the embedding model: 16 dimensions derived from a hash of the text.

    The real model embeds a few chunks a second on a test machine, and tests that write many or
    long documents are about everything around the model. Patch it in with
    `monkeypatch.setattr("crewdb.server.build_embedder", lambda _settings: HashEmbedder())`."""

    model = "hash-16"
    dimension = 16

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = []
        for text in texts:
            raw = [b - 127.5 for b in hashlib.sha256(text.encode("utf-8", "replace")).digest()[:16]]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors

    def probe(self) -> dict[str, Any]:
        return {"model": self.model, "dimension": self.dimension}

    def close(self) -> None:
        pass


def wait_serving(
    address: str, process: subprocess.Popen[str], service: str = "", timeout: float = 60
) -> None:
    """Waits until the `crewdb serve` process at `address` reports `service` SERVING; fails at
    once, with its standard error, if the process ends first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, f"the server at {address} never reported SERVING"
            time.sleep(0.1)
