"""The composition root: builds the database, services and gRPC server from Settings, and runs them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import signal
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health

from crewdb import logs
from crewdb.api import reflection
from crewdb.api.conversations import ConversationServicer
from crewdb.api.health import HealthReporter
from crewdb.api.metrics import Metrics
from crewdb.api.middleware import CallLimit, mount
from crewdb.api.system import SystemServicer
from crewdb.api.tasks import TaskServicer
from crewdb.api.users import UserServicer
from crewdb.api.vectors import VectorServicer
from crewdb.clock import Clock
from crewdb.config import MIN_SECRET_BYTES, Settings
from crewdb.db import tasks as task_queries
from crewdb.db.engine import Database
from crewdb.db.migrate import open_database
from crewdb.errors import CrewdbError, FailedPreconditionError
from crewdb.services.conversations import ConversationService
from crewdb.services.events import MessageEvents
from crewdb.services.health import CHROMA, EMBEDDER, SQLITE, Dependencies
from crewdb.services.knowledge import KnowledgeBase
from crewdb.services.pagination import PageTokens
from crewdb.services.passwords import PasswordHasher
from crewdb.services.tasks import TaskEvents, TaskService
from crewdb.services.tokens import AccessTokens
from crewdb.services.users import Accounts
from crewdb.v1 import (
    conversation_service_pb2,
    system_service_pb2,
    task_service_pb2,
    user_service_pb2,
    vector_service_pb2,
)
from crewdb.vectors.chunking import Chunker
from crewdb.vectors.embedders import Embedder, HttpEmbedder, LocalEmbedder
from crewdb.vectors.store import VectorStore

log = logging.getLogger(__name__)

CONVERSATION_DESCRIPTOR = conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"]
CONVERSATION_SERVICE = CONVERSATION_DESCRIPTOR.full_name
USER_DESCRIPTOR = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
TASK_DESCRIPTOR = task_service_pb2.DESCRIPTOR.services_by_name["TaskService"]
VECTOR_DESCRIPTOR = vector_service_pb2.DESCRIPTOR.services_by_name["VectorService"]
SYSTEM_DESCRIPTOR = system_service_pb2.DESCRIPTOR.services_by_name["SystemService"]
# What each name the health service answers for needs (crewdb/v1/system_service.proto).
HEALTH_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "": (SQLITE, CHROMA),
    USER_DESCRIPTOR.full_name: (SQLITE,),
    CONVERSATION_SERVICE: (SQLITE,),
    TASK_DESCRIPTOR.full_name: (SQLITE,),
    VECTOR_DESCRIPTOR.full_name: (SQLITE, CHROMA, EMBEDDER),
    SYSTEM_DESCRIPTOR.full_name: (SQLITE,),
}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

MAX_REQUEST_BYTES = 4 * 1024 * 1024


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The transport's limits (README, "Limits")."""
    options = [
        # Without this, a second server on a busy port would silently share it (SO_REUSEPORT).
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Pings every minute keep long-lived streams open through load balancers and proxies
        # that drop idle connections, and find dead peers (20 s without an answer).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_connection_age > 0:
        # Connections are renewed now and then, so new replicas behind a load balancer get
        # their share; streams in progress get the grace period, then reconnect.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
        ]
    return options


class StartupError(RuntimeError):
    """The server cannot start; the message says why in words an operator can act on."""


@dataclass
class App:
    """A running crewdb server and everything it owns."""

    server: aio.Server
    port: int
    db: Database
    health: HealthReporter
    events: MessageEvents
    hasher: PasswordHasher
    accounts: Accounts
    knowledge: KnowledgeBase
    vectors: VectorStore
    task_events: TaskEvents
    background: list[asyncio.Task[None]]
    metrics: Metrics | None = None
    metrics_port: int | None = None

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING, ends every stream, lets in-flight calls finish, closes the database.

        Streams end first (health Watch with OK after NOT_SERVING, WatchMessages and WatchTask
        with UNAVAILABLE, waiting ClaimTask calls with no task): otherwise they would hold the
        drain for the whole grace period, and then end cancelled.
        """
        await self.health.shutdown()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        self.events.close()
        self.task_events.close()
        await self.server.stop(grace)
        await self.knowledge.drain(grace)  # writes whose callers gave up run to the end
        self.hasher.close()
        if self.metrics is not None:
            self.metrics.close()
        await asyncio.to_thread(self.knowledge.close)
        await asyncio.to_thread(self.vectors.close)
        await asyncio.to_thread(self.db.close)


def page_token_key(secret: str) -> bytes:
    """Page tokens are signed with a key derived from the JWT secret, never with the secret itself."""
    return hmac.new(secret.encode(), b"crewdb/page-tokens", hashlib.sha256).digest()


SECRET_FILE = "jwt_secret"  # noqa: S105 - a file name, not a secret


def jwt_secret(settings: Settings) -> str:
    """JWT_SECRET, or with embedded defaults (nothing configured) a secret kept in the data folder.

    Raises:
        StartupError: JWT_SECRET is unset while the data location was configured (a deployment
            must choose its secret), or the secret file cannot be read or written.
    """
    if settings.jwt_secret:
        return settings.jwt_secret
    if not settings.embedded_defaults:
        raise StartupError(
            f"JWT_SECRET is not set: set it to a random string of at least {MIN_SECRET_BYTES} bytes "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    path = settings.database_path.parent / SECRET_FILE
    try:
        if path.exists():
            secret = path.read_text().strip()
            if len(secret.encode()) >= MIN_SECRET_BYTES:
                return secret
            raise StartupError(f"{path} holds a secret shorter than {MIN_SECRET_BYTES} bytes")
        secret = secrets.token_urlsafe(48)
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret + "\n")
    except OSError as error:
        raise StartupError(f"cannot keep a JWT secret at {path}: {error}") from error
    log.warning(
        "JWT_SECRET is not set: generated a random one at %s (embedded defaults). "
        "Set JWT_SECRET for any real deployment.",
        path,
    )
    return secret


def build_embedder(settings: Settings) -> Embedder:
    """The configured embedding model; the in-process one loads on first use."""
    if settings.embedder == "local":
        return LocalEmbedder()
    return HttpEmbedder(
        kind=settings.embedder,
        url=settings.embedder_url or "",
        model_name=settings.embedding_model,
        timeout=settings.embedder_timeout,
        batch_size=settings.embedder_batch_size,
        api_key=settings.embedder_api_key,
    )


def build_vector_store(settings: Settings) -> VectorStore:
    """Chroma embedded at VECTOR_DB_PATH, or the server at CHROMA_HOST; connects on first use."""
    if settings.chroma_host:
        return VectorStore(
            collection=settings.chroma_collection,
            host=settings.chroma_host,
            port=settings.chroma_port,
            timeout=settings.vector_timeout,
        )
    return VectorStore(
        collection=settings.chroma_collection, path=settings.vector_db_path, timeout=settings.vector_timeout
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def build_server(settings: Settings) -> App:  # noqa: PLR0915 - the one place that wires everything
    """Migrates the database, wires every service, binds the port and starts serving.

    Raises:
        StartupError: the port cannot be bound, the database cannot be migrated, or there is no
            usable JWT secret.
    """
    logs.stamp_request_ids()
    try:
        engine, _, _ = await asyncio.to_thread(
            open_database, settings.database_path, pool_size=settings.db_read_threads + 1
        )
    except FailedPreconditionError as error:
        raise StartupError(f"DATABASE_PATH={settings.database_path}: {error.message}") from error
    try:
        secret = await asyncio.to_thread(jwt_secret, settings)
    except StartupError:
        engine.dispose()
        raise
    db = Database(engine, read_threads=settings.db_read_threads)
    events = MessageEvents()
    clock = Clock()
    page_tokens = PageTokens(page_token_key(secret))
    hasher = PasswordHasher(settings.bcrypt_rounds)
    accounts = Accounts(
        db,
        hasher,
        AccessTokens(secret, settings.access_token_ttl),
        page_tokens,
        clock,
        refresh_ttl=settings.refresh_token_ttl,
        refresh_grace=settings.refresh_grace,
    )
    conversations = ConversationService(db, events, page_tokens, clock)
    task_events = TaskEvents()
    tasks = TaskService(db, task_events, page_tokens, clock)
    vectors = build_vector_store(settings)
    try:
        vectors.claim()
    except FailedPreconditionError as error:
        db.close()
        hasher.close()
        raise StartupError(error.message) from error
    embedder = build_embedder(settings)
    knowledge = KnowledgeBase(
        db,
        vectors,
        embedder,
        chunker=Chunker(settings.chunk_size, settings.chunk_overlap),
        page_tokens=page_tokens,
        clock=clock,
    )

    # No `maximum_concurrent_rpcs` here: grpc would count health probes too. The limit is
    # kept for crewdb's own calls only (CallLimit), so a probe is always answered.
    server = aio.server(options=server_options(settings))
    metrics = Metrics() if settings.metrics_port is not None else None
    auth = accounts.authenticate
    limit = CallLimit(settings.max_concurrent_rpcs)
    mount(server, UserServicer(accounts), USER_DESCRIPTOR, auth, metrics, limit=limit)
    mount(server, ConversationServicer(conversations), CONVERSATION_DESCRIPTOR, auth, metrics, limit=limit)
    mount(server, TaskServicer(tasks), TASK_DESCRIPTOR, auth, metrics, limit=limit)
    mount(server, VectorServicer(knowledge), VECTOR_DESCRIPTOR, auth, metrics, limit=limit)
    dependencies = Dependencies(
        db, settings.database_path, vectors, embedder, timeout=settings.health_check_timeout
    )
    reporter = HealthReporter(
        server,
        dependencies,
        HEALTH_DEPENDENCIES,
        settings.health_check_interval,
        on_results=metrics.record_checks if metrics else None,
    )
    system = SystemServicer(dependencies, reporter, vectors)
    mount(server, system, SYSTEM_DESCRIPTOR, auth, metrics, limit=limit)
    services = [name for name in HEALTH_DEPENDENCIES if name]
    reflection.enable(server, [*services, health.SERVICE_NAME])

    address = _address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        port = 0
        cause: Exception | None = error
    else:
        cause = None

    def release() -> None:  # what start-up opened, if it cannot finish
        db.close()
        hasher.close()
        knowledge.close()
        vectors.close()

    if port == 0:
        release()
        raise StartupError(
            f"cannot listen on {address}: the address is in use or not available "
            "(set CREWDB_PORT or --port to another port)"
        ) from cause
    # The first checks run before the port opens: the health service's first answer is true.
    await reporter.start()
    metrics_port = None
    if metrics is not None and settings.metrics_port is not None:
        metrics.watch_queue(lambda: db.read_sync(lambda conn: task_queries.queue_stats(conn, owner=None)[0]))
        try:
            metrics_port = metrics.serve(settings.host, settings.metrics_port)
        except OSError as error:
            await reporter.shutdown()
            release()
            raise StartupError(f"cannot serve metrics on port {settings.metrics_port}: {error}") from error
    await server.start()
    background = [
        asyncio.create_task(tasks.sweep(), name="crewdb-lease-sweep"),
        asyncio.create_task(_reconcile(knowledge), name="crewdb-knowledge-check"),
    ]
    log.info("crewdb serving on %s (database %s)", _address(settings.host, port), settings.database_path)
    return App(
        server=server,
        port=port,
        db=db,
        health=reporter,
        events=events,
        hasher=hasher,
        accounts=accounts,
        knowledge=knowledge,
        vectors=vectors,
        task_events=task_events,
        background=background,
        metrics=metrics,
        metrics_port=metrics_port,
    )


async def _reconcile(knowledge: KnowledgeBase) -> None:
    """Start-up check that Chroma holds exactly the chunks SQLite describes; repairs and reports."""
    try:
        result = await knowledge.reconcile()
    except CrewdbError as error:
        log.warning("knowledge base check skipped (%s): it runs again at the next start", error.message)
        return
    if result.stale_chunks_deleted or result.documents_incomplete:
        log.warning(
            "knowledge base repaired: %d chunks of deleted or replaced documents removed from Chroma, "
            "%d documents with missing chunks embedded again (%d chunks)",
            result.stale_chunks_deleted,
            result.documents_incomplete,
            result.chunks_embedded,
        )
    else:
        log.info("knowledge base check: Chroma and SQLite agree (%d accounts)", result.owners)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # before starting: a signal while starting stops too
        loop.add_signal_handler(signum, stopping.set)
    app = await build_server(settings)
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await app.stop(settings.shutdown_grace)
    log.info("stopped")
