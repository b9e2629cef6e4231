"""The `crewdb` command: `serve` and admin subcommands; the only module that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from crewdb import logs
from crewdb.clock import Clock
from crewdb.config import ConfigError, Settings
from crewdb.db.engine import Database
from crewdb.db.migrate import open_database
from crewdb.errors import CrewdbError, InvalidArgumentError
from crewdb.models import UserRole
from crewdb.server import StartupError, serve
from crewdb.services.passwords import PasswordHasher
from crewdb.services.users import create_user

log = logging.getLogger("crewdb")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crewdb",
        description="crewdb: typed gRPC data service for AI-agent applications.",
        epilog="Configuration comes from environment variables; see README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cmd = commands.add_parser("serve", help="migrate the database and serve gRPC")
    serve_cmd.add_argument("--host", help="address to listen on (env CREWDB_HOST)")
    serve_cmd.add_argument(
        "--port", type=_port, help="port to listen on, 0 for any free one (env CREWDB_PORT)"
    )
    serve_cmd.add_argument(
        "--metrics-port", type=_port, help="serve Prometheus metrics over HTTP here (env CREWDB_METRICS_PORT)"
    )
    commands.add_parser("migrate", help="upgrade the database schema to this release")
    admin = commands.add_parser("create-admin", help="create an admin account (to bootstrap the first one)")
    admin.add_argument("--email", required=True)
    admin.add_argument("--username", required=True)
    admin.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password from standard input (never from the command line, which `ps` shows)",
    )
    probe = commands.add_parser(
        "health",
        help="ask a server's grpc.health.v1 service; exit codes as grpc_health_probe",
        description="Exit 0 when SERVING, 2 when the server cannot be reached, 3 when the call "
        "fails (an unknown service among others), 4 when it answers NOT_SERVING.",
    )
    probe.add_argument("--host", help="server address (env CREWDB_HOST; 0.0.0.0 means this machine)")
    probe.add_argument("--port", type=_port, help="server port (env CREWDB_PORT)")
    probe.add_argument(
        "--service", default="", help="'' (readiness, the default), 'liveness', or a service's full name"
    )
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds to connect, and again to answer")
    ingest = commands.add_parser(
        "ingest",
        help="add .txt/.md files (folders recursively) to a running server's knowledge base",
        description="Each file becomes a document whose id is its path; ingesting again replaces it.",
    )
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument("--username", required=True, help="the account that will own the documents")
    ingest.add_argument(
        "--password-stdin", action="store_true", required=True, help="read the password from standard input"
    )
    ingest.add_argument("--host", help="server address (env CREWDB_HOST; 0.0.0.0 means this machine)")
    ingest.add_argument("--port", type=_port, help="server port (env CREWDB_PORT)")
    ingest.add_argument(
        "--batch-size",
        type=int,
        default=32,
        choices=range(1, 101),
        metavar="1-100",
        help="documents per call",
    )
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ if env is None else env)
    except ConfigError as error:
        print(f"crewdb: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.logging_level, settings.log_format)
    if args.command == "serve":
        return _serve(settings, args)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "health":
        return _health(_target(settings, args), args.service, args.timeout)
    password = sys.stdin.readline().rstrip("\r\n")
    if args.command == "create-admin":
        return _create_admin(settings, args.email, args.username, password)
    return _ingest(settings, args, password)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    names = ("host", "port", "metrics_port")
    overrides = {name: value for name in names if (value := getattr(args, name)) is not None}
    if "host" in overrides:
        overrides["embedded_defaults"] = False  # choosing where to listen is deploying
    try:
        asyncio.run(serve(settings.replace(**overrides)))
    except StartupError as error:
        log.error("%s", error)
        return 1
    return 0


def _migrate(settings: Settings) -> int:
    try:
        engine, before, after = open_database(settings.database_path)
    except CrewdbError as error:
        log.error("DATABASE_PATH=%s: %s", settings.database_path, error.message)
        return 1
    engine.dispose()
    print(f"database {settings.database_path}: {before or 'empty'} -> {after}")
    return 0


def _create_admin(settings: Settings, email: str, username: str, password: str) -> int:
    try:
        engine, _, _ = open_database(settings.database_path)
    except CrewdbError as error:
        log.error("DATABASE_PATH=%s: %s", settings.database_path, error.message)
        return 1
    db = Database(engine, read_threads=1)
    hasher = PasswordHasher(settings.bcrypt_rounds)
    try:
        user = asyncio.run(
            create_user(
                db, hasher, Clock(), email=email, username=username, password=password, role=UserRole.ADMIN
            )
        )
    except InvalidArgumentError as error:
        problems = "; ".join(f"{v.field}: {v.description}" for v in error.violations) or error.message
        log.error("cannot create the admin: %s", problems)
        return 1
    except CrewdbError as error:
        log.error("cannot create the admin: %s", error.message)
        return 1
    finally:
        hasher.close()
        db.close()
    print(f"created admin {user.username} <{user.email}> with id {user.id}")
    return 0


def _target(settings: Settings, args: argparse.Namespace) -> str:
    """host:port of the server to call: the flags, else where `serve` would listen."""
    host = args.host or settings.host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - listening everywhere includes this machine
        host = "127.0.0.1"
    return f"[{host}]:{args.port or settings.port}" if ":" in host else f"{host}:{args.port or settings.port}"


# grpc_health_probe's exit codes.
HEALTH_SERVING, HEALTH_CONNECTION_FAILURE, HEALTH_RPC_FAILURE, HEALTH_UNHEALTHY = 0, 2, 3, 4


def _health(target: str, service: str, timeout: float) -> int:
    import grpc  # noqa: PLC0415 - only the client commands need it
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            print(f"error: cannot connect to {target} in {timeout:g}s", file=sys.stderr)
            return HEALTH_CONNECTION_FAILURE
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            print(f"error: health check failed: {code.name if code else error}", file=sys.stderr)
            return HEALTH_RPC_FAILURE
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"status: {status}")
    return HEALTH_SERVING if answer.status == health_pb2.HealthCheckResponse.SERVING else HEALTH_UNHEALTHY


def _ingest(settings: Settings, args: argparse.Namespace, password: str) -> int:
    import grpc  # noqa: PLC0415 - only this command is a client

    from crewdb.client import Client  # noqa: PLC0415
    from crewdb.ingest import describe, ingest  # noqa: PLC0415

    target = _target(settings, args)
    try:
        with Client(target) as client:
            client.login(args.username, password)
            outcome = ingest(client, args.paths, batch_size=args.batch_size, progress=not args.no_progress)
    except grpc.RpcError as error:
        log.error("ingest into %s failed: %s", target, describe(error))
        return 1
    for path, reason in outcome.skipped:
        log.warning("skipped %s: %s", path, reason)
    print(f"ingested {outcome.files} files ({outcome.chunks} chunks); skipped {len(outcome.skipped)}")
    return 1 if outcome.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
