"""Settings: every knob crewdb has, read from the environment once, validated, then passed down."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EMBEDDERS = ("local", "ollama", "openai")
LOG_FORMATS = ("text", "json")
# What each embedder uses when CREWDB_EMBEDDING_MODEL and CREWDB_EMBEDDER_URL are unset.
DEFAULT_EMBEDDING_MODELS = {
    "local": "all-MiniLM-L6-v2",
    "ollama": "nomic-embed-text",
    "openai": "text-embedding-3-small",
}
DEFAULT_EMBEDDER_URLS = {"ollama": "http://localhost:11434", "openai": "https://api.openai.com/v1"}
# Chroma's rule for collection names (the owner's id is appended after a dot).
_COLLECTION_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){1,60}[A-Za-z0-9]")
MIN_SECRET_BYTES = 32
# Setting any of these means someone is deploying crewdb, not trying it on a laptop: then the
# server must not make up its own JWT secret.
EMBEDDED_UNLESS_SET = ("DATABASE_PATH", "CREWDB_HOST", "VECTOR_DB_PATH", "CHROMA_HOST")


class ConfigError(ValueError):
    """One or more settings are invalid; `problems` (and the message) name each variable and value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Settings:
    """The service's configuration. Build it with `from_env`; tests build it directly."""

    host: str = "127.0.0.1"
    port: int = 50051
    database_path: Path = Path("./data/app.db")
    vector_db_path: Path = Path("./data/vectordb")
    chroma_host: str | None = None
    chroma_port: int | None = None
    # Never printed: repr=False keeps it out of logs and tracebacks.
    jwt_secret: str | None = field(default=None, repr=False)
    # True when nothing chose where data lives: `make run` on a fresh machine. Only then may
    # the server make up its own JWT secret (kept in the data folder).
    embedded_defaults: bool = False
    access_token_ttl: int = 15 * 60
    refresh_token_ttl: int = 7 * 24 * 3600
    # Seconds after a refresh token is spent during which presenting it again is refused
    # without ending its session (two tabs refreshing at once); 0 ends it at once.
    refresh_grace: float = 0.0
    bcrypt_rounds: int = 10
    log_level: str = "INFO"
    log_format: str = "text"
    # Seconds between the health checker's rounds, and the time each dependency's check may take.
    health_check_interval: float = 5.0
    health_check_timeout: float = 2.0
    # Threads that run read queries; writes always go through one writer thread.
    db_read_threads: int = 4
    # Seconds that in-flight calls get to finish on SIGTERM before they are cancelled.
    shutdown_grace: float = 10.0
    # The knowledge base: Chroma collection (prefix), chunking, and the embedding model.
    chroma_collection: str = "agent-knowledge"
    chunk_size: int = 1000
    chunk_overlap: int = 200
    embedder: str = "local"
    embedding_model: str = "all-MiniLM-L6-v2"
    embedder_url: str | None = None
    embedder_api_key: str | None = field(default=None, repr=False)
    embedder_timeout: float = 30.0
    embedder_batch_size: int = 32
    # Seconds a call to Chroma may take before the vector call fails with UNAVAILABLE.
    vector_timeout: float = 10.0
    # Prometheus metrics over HTTP on this port (same host as gRPC); None: no metrics endpoint.
    metrics_port: int | None = None
    # Transport limits: calls (streams included) in progress at once, beyond which new calls get
    # RESOURCE_EXHAUSTED; and how long a connection lives before the server asks the client to
    # reconnect (0: forever), with a grace period for calls and streams in progress.
    max_concurrent_rpcs: int = 2000
    max_connection_age: float = 3600.0
    max_connection_age_grace: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Reads the environment (or any mapping); raises ConfigError listing every bad value."""
        parser = _Parser(env)
        default = cls()
        embedder = parser.get("CREWDB_EMBEDDER", str.lower, default.embedder, _one_of(EMBEDDERS))
        settings = cls(
            host=parser.get("CREWDB_HOST", str, default.host, _non_empty),
            port=parser.get("CREWDB_PORT", int, default.port, _port(allow_zero=True)),
            database_path=parser.get("DATABASE_PATH", Path, default.database_path),
            vector_db_path=parser.get("VECTOR_DB_PATH", Path, default.vector_db_path),
            chroma_host=parser.get_optional("CHROMA_HOST", str, _non_empty),
            chroma_port=parser.get_optional("CHROMA_PORT", int, _port(allow_zero=False)),
            jwt_secret=parser.get_optional("JWT_SECRET", str),
            log_level=parser.get("CREWDB_LOG_LEVEL", str.upper, default.log_level, _log_level),
            log_format=parser.get("CREWDB_LOG_FORMAT", str.lower, default.log_format, _one_of(LOG_FORMATS)),
            health_check_interval=parser.get(
                "CREWDB_HEALTH_CHECK_INTERVAL", float, default.health_check_interval, _positive
            ),
            health_check_timeout=parser.get(
                "CREWDB_HEALTH_CHECK_TIMEOUT", float, default.health_check_timeout, _positive
            ),
            db_read_threads=parser.get(
                "CREWDB_DB_READ_THREADS", int, default.db_read_threads, _between(1, 64)
            ),
            shutdown_grace=parser.get("CREWDB_SHUTDOWN_GRACE", float, default.shutdown_grace, _non_negative),
            embedded_defaults=not any(env.get(name) for name in EMBEDDED_UNLESS_SET),
            access_token_ttl=parser.get(
                "CREWDB_ACCESS_TOKEN_TTL", int, default.access_token_ttl, _between(60, 24 * 3600)
            ),
            refresh_token_ttl=parser.get(
                "CREWDB_REFRESH_TOKEN_TTL", int, default.refresh_token_ttl, _between(300, 90 * 24 * 3600)
            ),
            refresh_grace=parser.get(
                "CREWDB_REFRESH_GRACE_SECONDS", float, default.refresh_grace, _non_negative
            ),
            bcrypt_rounds=parser.get("CREWDB_BCRYPT_ROUNDS", int, default.bcrypt_rounds, _between(10, 16)),
            chroma_collection=parser.get(
                "CHROMA_COLLECTION", str, default.chroma_collection, _collection_name
            ),
            chunk_size=parser.get("CREWDB_CHUNK_SIZE", int, default.chunk_size, _between(100, 100_000)),
            chunk_overlap=parser.get("CREWDB_CHUNK_OVERLAP", int, default.chunk_overlap, _between(0, 99_999)),
            embedder=embedder,
            embedding_model=parser.get(
                "CREWDB_EMBEDDING_MODEL", str, DEFAULT_EMBEDDING_MODELS[embedder], _non_empty
            ),
            embedder_url=parser.get_optional("CREWDB_EMBEDDER_URL", str, _http_url)
            or DEFAULT_EMBEDDER_URLS.get(embedder),
            embedder_api_key=parser.get_optional("CREWDB_EMBEDDER_API_KEY", str),
            embedder_timeout=parser.get(
                "CREWDB_EMBEDDER_TIMEOUT", float, default.embedder_timeout, _positive
            ),
            embedder_batch_size=parser.get(
                "CREWDB_EMBEDDER_BATCH_SIZE", int, default.embedder_batch_size, _between(1, 2048)
            ),
            vector_timeout=parser.get("CREWDB_VECTOR_TIMEOUT", float, default.vector_timeout, _positive),
            metrics_port=parser.get_optional("CREWDB_METRICS_PORT", int, _port(allow_zero=True)),
            max_concurrent_rpcs=parser.get(
                "CREWDB_MAX_CONCURRENT_RPCS", int, default.max_concurrent_rpcs, _between(10, 1_000_000)
            ),
            max_connection_age=parser.get(
                "CREWDB_MAX_CONNECTION_AGE", float, default.max_connection_age, _non_negative
            ),
            max_connection_age_grace=parser.get(
                "CREWDB_MAX_CONNECTION_AGE_GRACE", float, default.max_connection_age_grace, _non_negative
            ),
        )
        if settings.chunk_overlap >= settings.chunk_size:
            parser.errors.append(
                f"CREWDB_CHUNK_OVERLAP={settings.chunk_overlap}: must be less than CREWDB_CHUNK_SIZE "
                f"({settings.chunk_size})"
            )
        if embedder == "local" and settings.embedding_model != DEFAULT_EMBEDDING_MODELS["local"]:
            parser.errors.append(
                f"CREWDB_EMBEDDING_MODEL={settings.embedding_model!r}: the local embedder runs only "
                f"{DEFAULT_EMBEDDING_MODELS['local']!r}; set CREWDB_EMBEDDER=ollama or openai for others"
            )
        if str(settings.database_path).startswith(":memory:") or not settings.database_path.name:
            parser.errors.append(f"DATABASE_PATH={env.get('DATABASE_PATH')!r}: expected a file path")
        if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < MIN_SECRET_BYTES:
            parser.errors.append(f"JWT_SECRET: must be at least {MIN_SECRET_BYTES} bytes (value not shown)")
        if settings.chroma_port is not None and settings.chroma_host is None:
            parser.errors.append("CHROMA_PORT is set but CHROMA_HOST is not: set both or neither")
        if parser.errors:
            raise ConfigError(parser.errors)
        return settings

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (command-line flags override the environment)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def logging_level(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


Check = Callable[[T], str | None]


class _Parser:
    """Collects every problem instead of stopping at the first, so one run shows them all."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def get(self, name: str, cast: Callable[[str], T], default: T, check: Check[T] | None = None) -> T:
        value = self.get_optional(name, cast, check)
        return default if value is None else value

    def get_optional(self, name: str, cast: Callable[[str], T], check: Check[T] | None = None) -> T | None:
        """The cast value, or None when unset, empty or invalid (then noted in `errors`)."""
        raw = self.env.get(name)
        if raw is None or raw == "":
            return None
        try:
            value = cast(raw.strip())
        except ValueError:
            self.errors.append(f"{name}={_shown(raw)!r}: expected {_type_name(cast)}")
            return None
        problem = check(value) if check else None
        if problem:
            self.errors.append(f"{name}={_shown(raw)!r}: {problem}")
            return None
        return value


_CREDENTIALS = re.compile(r"//[^/?#]*@")


def _type_name(cast: Callable[[str], object]) -> str:
    names: dict[object, str] = {int: "an integer", float: "a number"}
    return names.get(cast, "a valid value")


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _port(*, allow_zero: bool) -> Check[int]:
    low = 0 if allow_zero else 1

    def check(value: int) -> str | None:
        return None if low <= value <= 65535 else f"expected a port number from {low} to 65535"

    return check


def _between(low: int, high: int) -> Check[int]:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"expected {low} to {high}"

    return check


def _positive(value: float) -> str | None:
    return None if value > 0 and value != float("inf") else "expected a number above 0"


def _non_negative(value: float) -> str | None:
    return None if 0 <= value != float("inf") else "expected a number of 0 or more"


def _one_of(choices: tuple[str, ...]) -> Check[str]:
    def check(value: str) -> str | None:
        return None if value in choices else f"expected one of {', '.join(choices)}"

    return check


def _collection_name(value: str) -> str | None:
    if _COLLECTION_NAME.fullmatch(value):
        return None
    return "expected 3 to 62 letters, digits, '.', '_' or '-', starting and ending with a letter or digit"


def _http_url(value: str) -> str | None:
    if not value.startswith(("http://", "https://")):
        return "expected an http:// or https:// URL"
    if _CREDENTIALS.search(value):
        # It would be shown in errors and logs; the key has a variable of its own, never shown.
        return "must not carry a user name or password: use CREWDB_EMBEDDER_API_KEY"
    return None


def _shown(raw: str) -> str:
    """A value as an error message may show it: without credentials in a URL."""
    return _CREDENTIALS.sub("//***@", raw)


def _log_level(value: str) -> str | None:
    return None if value in LOG_LEVELS else f"expected one of {', '.join(LOG_LEVELS)}"
