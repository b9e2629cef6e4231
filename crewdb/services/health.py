"""Checks of the dependencies (SQLite, ChromaDB, the embedding model), each bounded in time (services)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from crewdb.db.engine import Database
from crewdb.db.health import storage_details
from crewdb.vectors.embedders import Embedder
from crewdb.vectors.store import VectorStore

log = logging.getLogger(__name__)

SQLITE, CHROMA, EMBEDDER = "sqlite", "chroma", "embedder"
DEPENDENCIES = (SQLITE, CHROMA, EMBEDDER)


class Verdict(StrEnum):
    """HEALTHY: all up. UNHEALTHY: SQLite down (nothing works). DEGRADED: only the knowledge base is down."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    up: bool
    latency: float
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def verdict(results: dict[str, CheckResult]) -> Verdict:
    if not results[SQLITE].up:
        return Verdict.UNHEALTHY
    return Verdict.HEALTHY if all(result.up for result in results.values()) else Verdict.DEGRADED


class Dependencies:
    """Runs each dependency's check with its own time limit; a check that fails or overruns is down."""

    def __init__(
        self, db: Database, database_path: Path, store: VectorStore, embedder: Embedder, *, timeout: float
    ) -> None:
        self._db = db
        self._database_path = database_path
        self._store = store
        self._embedder = embedder
        self._timeout = timeout

    async def check(self, *, detailed: bool = False) -> dict[str, CheckResult]:
        """Every dependency's state, checked now and concurrently. Detailed checks also gather
        what the health report shows (row counts, collection sizes), which costs more."""
        probes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
            SQLITE: self._sqlite_details if detailed else self._sqlite,
            CHROMA: self._store.details if detailed else self._chroma,
            EMBEDDER: self._embedder_probe,
        }
        results = await asyncio.gather(*(self._run(name, probe) for name, probe in probes.items()))
        return {result.name: result for result in results}

    async def _run(self, name: str, probe: Callable[[], Awaitable[dict[str, Any]]]) -> CheckResult:
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation that
            # shutdown sends when it lands as the check completes (CPython gh-86296).
            async with asyncio.timeout(self._timeout):
                details = await probe()
        except TimeoutError:
            return CheckResult(name, False, time.perf_counter() - started, f"no answer in {self._timeout:g}s")
        except Exception as error:  # noqa: BLE001 - any failure means the dependency is down
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            return CheckResult(name, False, time.perf_counter() - started, message)
        return CheckResult(name, True, time.perf_counter() - started, details=details)

    async def _sqlite(self) -> dict[str, Any]:
        await self._db.ping()
        return {}

    async def _sqlite_details(self) -> dict[str, Any]:
        return await self._db.read(lambda conn: storage_details(conn, self._database_path))

    async def _chroma(self) -> dict[str, Any]:
        beat = await self._store.heartbeat()
        return {"version": beat.version}

    async def _embedder_probe(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._embedder.probe)
