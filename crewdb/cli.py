"""The `crewdb` command: `serve` and admin subcommands; the only module that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

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

# Exit status of a command given bad flags or configuration: argparse's 2, except for `health`,
# which follows grpc_health_probe (1 there; 2 means the server cannot be reached).
USAGE_STATUS = 2
HEALTH_USAGE_STATUS = 1
# How long backup and restore wait to see whether a server answers at --host/--port.
SERVER_WAIT = 1.0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line and their exit status set per command."""

    usage_status = USAGE_STATUS
    commands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        self.exit(self.usage_status, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0 < value <= 3600):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0 and at most 3600")
    return value


def _parser() -> _Parser:
    parser = _Parser(
        prog="crewdb",
        description="crewdb: typed gRPC data service for AI-agent applications.",
        epilog="Configuration comes from environment variables; see README.md. Exit status: 0 on "
        "success, 1 on failure, 2 for bad flags or configuration, with one line on standard error "
        "saying why; `health` follows grpc_health_probe instead (see crewdb health --help).",
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
        description="Asks the server's grpc.health.v1 service. Exit status as grpc_health_probe's: "
        "0 SERVING; 1 bad flags or a bad environment value; 2 the server cannot be reached; 3 the "
        "call fails (an unknown service among others); 4 it answers NOT_SERVING.",
    )
    probe.usage_status = HEALTH_USAGE_STATUS
    probe.add_argument("--host", help="server address (env CREWDB_HOST; 0.0.0.0 means this machine)")
    probe.add_argument("--port", type=_port, help="server port (env CREWDB_PORT)")
    probe.add_argument(
        "--service", default="", help="'' (readiness, the default), 'liveness', or a service's full name"
    )
    probe.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds to connect, and again to answer (default 5)"
    )
    ingest = commands.add_parser(
        "ingest",
        help="add .txt/.md files (folders recursively) to a running server's knowledge base",
        description="Each file becomes a document. Its id is its path from the folder given "
        "(`guide/intro.md` for docs/guide/intro.md when the argument is `docs`, from any working "
        "directory), or its name when the file itself is given; ingesting the same argument again "
        "replaces those documents. A file that cannot be a document (unreadable, not UTF-8, empty, "
        "a name the server refuses, the same id as another file) is reported and skipped, and the "
        "rest go on. Exit 0 when every file was added, 1 when any was skipped or the server "
        "failed, 2 for bad flags or configuration.",
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
    backup = commands.add_parser(
        "backup",
        help="copy the database and every vector into a new folder, with a manifest",
        description="Safe while the server runs. An embedded Chroma (no CHROMA_HOST) may be opened "
        "by one process only, as two corrupt it: when a server answers at --host/--port within "
        f"{SERVER_WAIT:g} s, the vectors come through it (give an admin's --username and "
        "--password-stdin); otherwise backup opens VECTOR_DB_PATH itself, but only after taking the "
        "lock a server holds on it (VECTOR_DB_PATH/crewdb.lock), and it stops with exit 1, naming "
        "the process, when another has it. With "
        "CHROMA_HOST the vectors come from the Chroma server. The manifest is written last and "
        "everything is on disk (fsynced) before it reports success. Exit 0 on success, 1 on any "
        "failure, 2 for bad flags or configuration.",
    )
    backup.add_argument("destination", type=Path, metavar="DEST", help="a new or empty folder")
    backup.add_argument("--username", help="an admin account (needed while the server runs)")
    backup.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    backup.add_argument("--host", help="the running server's address (env CREWDB_HOST)")
    backup.add_argument("--port", type=_port, help="the running server's port (env CREWDB_PORT)")
    backup.add_argument("--no-progress", action="store_true", help="no progress bar")
    restore = commands.add_parser(
        "restore",
        help="restore a backup into empty data paths (DATABASE_PATH, VECTOR_DB_PATH or the Chroma server)",
        description="Checks the backup against its manifest and refuses data paths that are not empty. "
        "With an embedded Chroma it stops with exit 1, naming the process, when another process holds "
        "VECTOR_DB_PATH (stop the server first). Exit 0 on success, 1 on any "
        "failure, 2 for bad flags or configuration.",
    )
    restore.add_argument("source", type=Path, metavar="SRC", help="a folder written by `crewdb backup`")
    restore.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.commands = dict(commands.choices)
    return parser


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse reports these through the top parser: the command's own exit status applies
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _arguments(argv)
    try:
        settings = Settings.from_env(os.environ if env is None else env)
    except ConfigError as error:
        print(f"crewdb {args.command}: invalid configuration: {'; '.join(error.problems)}", file=sys.stderr)
        return HEALTH_USAGE_STATUS if args.command == "health" else USAGE_STATUS
    logs.configure(settings.logging_level, settings.log_format)
    # Passwords come on standard input, never on the command line (which `ps` shows).
    password = sys.stdin.readline().rstrip("\r\n") if getattr(args, "password_stdin", False) else None
    commands: dict[str, Callable[[], int]] = {
        "serve": lambda: _serve(settings, args),
        "migrate": lambda: _migrate(settings),
        "health": lambda: _health(_target(settings, args), args.service, args.timeout),
        "create-admin": lambda: _create_admin(settings, args.email, args.username, password or ""),
        "ingest": lambda: _ingest(settings, args, password or ""),
        "backup": lambda: _backup(settings, args, password),
        "restore": lambda: _restore(settings, args.source, progress=not args.no_progress),
    }
    try:
        return commands[args.command]()
    except KeyboardInterrupt:
        print(f"crewdb {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the last resort: one line, the traceback only at DEBUG
        log.debug("crewdb %s failed", args.command, exc_info=True)
        log.error("crewdb %s failed: %s: %s", args.command, type(error).__name__, _first_line(error))
        return 1


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0]


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


def _reachable(channel: Any, timeout: float) -> bool:
    import grpc  # noqa: PLC0415 - only the client commands need it

    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


def _health(target: str, service: str, timeout: float) -> int:
    import grpc  # noqa: PLC0415 - only the client commands need it
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        if not _reachable(channel, timeout):
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


def _backup(settings: Settings, args: argparse.Namespace, password: str | None) -> int:
    import grpc  # noqa: PLC0415 - only the client commands need it
    from tqdm import tqdm  # noqa: PLC0415

    from crewdb.backup import backup, export_through_server  # noqa: PLC0415
    from crewdb.client import Client  # noqa: PLC0415
    from crewdb.server import build_vector_store  # noqa: PLC0415
    from crewdb.vectors.store import DATA_IN_USE  # noqa: PLC0415

    target = _target(settings, args)
    with grpc.insecure_channel(target) as channel:
        through_server = settings.chroma_host is None and _reachable(channel, SERVER_WAIT)
    if through_server and (not args.username or password is None):
        log.error(
            "a server is running at %s with an embedded Chroma, which only it may open: give an "
            "admin's --username and --password-stdin so that it exports the vectors",
            target,
        )
        return 1
    store = None if through_server else build_vector_store(settings)
    if store is not None:
        # No server answered, but one too busy to answer in time, or listening elsewhere, may
        # have Chroma open; holding the folder also keeps a server from starting on it meanwhile.
        try:
            store.claim()
        except CrewdbError as error:
            store.close()
            hint = (
                "; if it is the crewdb server, give the --host and --port it listens on (and an admin's "
                "--username and --password-stdin) so that the vectors come through it"
                if error.reason == DATA_IN_USE
                else ""
            )
            log.error("backup refused: %s%s", error.message, hint)
            return 1
    client = Client(target) if through_server else None
    try:
        with tqdm(unit=" chunks", disable=args.no_progress, file=sys.stderr) as bar:
            if client is not None:
                client.login(args.username, password or "")
                export = export_through_server(client)
            else:
                assert store is not None  # noqa: S101 - one of the two is always made
                export = store.export(256)
            summary = asyncio.run(backup(settings.database_path, args.destination, export, bar.update))
    except CrewdbError as error:
        log.error("backup failed: %s", error.message)
        return 1
    except grpc.RpcError as error:
        log.error("backup failed: %s", error.details() if isinstance(error, grpc.Call) else error)
        return 1
    finally:
        if store is not None:
            store.close()
        if client is not None:
            client.close()
    again = f"; {summary.reembed} documents will be embedded again on restore" if summary.reembed else ""
    rows = sum(summary.rows.values())
    print(f"backed up {rows} rows and {summary.chunks} chunks to {args.destination}{again}")
    return 0


def _restore(settings: Settings, source: Path, *, progress: bool) -> int:
    from crewdb.backup import read_manifest  # noqa: PLC0415

    try:
        manifest = read_manifest(source)
        chunks, embedded = asyncio.run(_restore_vectors(settings, source, manifest, progress=progress))
    except CrewdbError as error:
        log.error("restore failed: %s", error.message)
        return 1
    rows = sum(manifest.get("rows", {}).values())
    print(f"restored {rows} rows and {chunks} chunks ({embedded} embedded again) from {source}")
    return 0


async def _restore_vectors(
    settings: Settings, source: Path, manifest: dict[str, Any], *, progress: bool
) -> tuple[int, int]:
    import secrets  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    from crewdb.backup import place_database, refuse_unless_empty, restore_vectors  # noqa: PLC0415
    from crewdb.server import build_embedder, build_vector_store  # noqa: PLC0415
    from crewdb.services.knowledge import KnowledgeBase  # noqa: PLC0415
    from crewdb.services.pagination import PageTokens  # noqa: PLC0415
    from crewdb.vectors.chunking import Chunker  # noqa: PLC0415

    # Both targets are checked before either is written: a refused restore changes nothing.
    store = build_vector_store(settings)
    made = settings.chroma_host is None and not settings.vector_db_path.exists()
    try:
        store.claim()
        await refuse_unless_empty(settings.database_path, store)
        await asyncio.to_thread(place_database, source, settings.database_path)
    except BaseException:
        store.close()
        if made:  # a refused restore leaves nothing behind
            shutil.rmtree(settings.vector_db_path, ignore_errors=True)
        raise
    engine, _, _ = await asyncio.to_thread(open_database, settings.database_path)  # older backups migrate
    db = Database(engine, read_threads=1)
    knowledge = KnowledgeBase(
        db,
        store,
        build_embedder(settings),
        chunker=Chunker(settings.chunk_size, settings.chunk_overlap),
        page_tokens=PageTokens(secrets.token_bytes(32)),  # lists nothing here
        clock=Clock(),
    )
    try:
        with tqdm(total=manifest.get("chunks"), unit=" chunks", disable=not progress, file=sys.stderr) as bar:
            return await restore_vectors(source, manifest, store, knowledge, bar.update)
    finally:
        knowledge.close()
        store.close()
        db.close()


if __name__ == "__main__":
    sys.exit(main())
