"""The `crewdb` command: `serve` and admin subcommands; the only module that reads the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

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
    return parser


def configure_logging(level: int) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Alembic narrates every step at INFO; crewdb.db.migrate logs what matters.
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(os.environ if env is None else env)
    except ConfigError as error:
        print(f"crewdb: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.logging_level)

    if args.command == "serve":
        overrides = {name: value for name in ("host", "port") if (value := getattr(args, name)) is not None}
        if "host" in overrides:
            overrides["embedded_defaults"] = False  # choosing where to listen is deploying
        settings = settings.replace(**overrides)
        try:
            asyncio.run(serve(settings))
        except StartupError as error:
            log.error("%s", error)
            return 1
        return 0

    if args.command == "migrate":
        try:
            engine, before, after = open_database(settings.database_path)
        except CrewdbError as error:
            log.error("DATABASE_PATH=%s: %s", settings.database_path, error.message)
            return 1
        engine.dispose()
        print(f"database {settings.database_path}: {before or 'empty'} -> {after}")
        return 0
    if args.command == "create-admin":
        password = sys.stdin.readline().rstrip("\r\n")
        return _create_admin(settings, args.email, args.username, password)
    raise AssertionError(args.command)  # argparse allows only the commands above


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


if __name__ == "__main__":
    sys.exit(main())
