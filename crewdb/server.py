"""The composition root: builds the database, services and gRPC server from Settings, and runs them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import signal
from dataclasses import dataclass

from grpc import aio
from grpc_health.v1 import health

from crewdb.api import reflection
from crewdb.api.conversations import ConversationServicer
from crewdb.api.health import HealthReporter
from crewdb.api.middleware import mount
from crewdb.clock import Clock
from crewdb.config import Settings
from crewdb.db.engine import Database
from crewdb.db.migrate import open_database
from crewdb.errors import FailedPreconditionError
from crewdb.services.conversations import ConversationService
from crewdb.services.events import MessageEvents
from crewdb.services.pagination import PageTokens
from crewdb.v1 import conversation_service_pb2

log = logging.getLogger(__name__)

CONVERSATION_DESCRIPTOR = conversation_service_pb2.DESCRIPTOR.services_by_name["ConversationService"]
CONVERSATION_SERVICE = CONVERSATION_DESCRIPTOR.full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SERVER_OPTIONS = [
    # Without this, a second server on a busy port would silently share it (SO_REUSEPORT).
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Find dead peers of long-lived WatchMessages streams.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


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

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING, ends watchers, lets in-flight calls finish, closes the database."""
        await self.health.shutdown()
        self.events.close()
        await self.server.stop(grace)
        await asyncio.to_thread(self.db.close)


def page_token_key(settings: Settings) -> bytes:
    """Derived from JWT_SECRET so tokens survive restarts; random per process without one."""
    if settings.jwt_secret:
        return hmac.new(settings.jwt_secret.encode(), b"crewdb/page-tokens", hashlib.sha256).digest()
    return os.urandom(32)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def build_server(settings: Settings) -> App:
    """Migrates the database, wires every service, binds the port and starts serving.

    Raises:
        StartupError: the port cannot be bound or the database cannot be migrated.
    """
    try:
        engine, _, _ = await asyncio.to_thread(
            open_database, settings.database_path, pool_size=settings.db_read_threads + 1
        )
    except FailedPreconditionError as error:
        raise StartupError(f"DATABASE_PATH={settings.database_path}: {error.message}") from error
    db = Database(engine, read_threads=settings.db_read_threads)
    events = MessageEvents()
    conversations = ConversationService(db, events, PageTokens(page_token_key(settings)), Clock())

    server = aio.server(options=_SERVER_OPTIONS)
    mount(server, ConversationServicer(conversations), CONVERSATION_DESCRIPTOR)
    reporter = HealthReporter(server, db.ping, [CONVERSATION_SERVICE], settings.health_check_interval)
    reflection.enable(server, [CONVERSATION_SERVICE, health.SERVICE_NAME])

    address = _address(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        port = 0
        cause: Exception | None = error
    else:
        cause = None
    if port == 0:
        db.close()
        raise StartupError(
            f"cannot listen on {address}: the address is in use or not available "
            "(set CREWDB_PORT or --port to another port)"
        ) from cause
    await server.start()
    await reporter.start()
    log.info("crewdb serving on %s (database %s)", _address(settings.host, port), settings.database_path)
    return App(server=server, port=port, db=db, health=reporter, events=events)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    app = await build_server(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await app.stop(settings.shutdown_grace)
    log.info("stopped")
