"""Checks of the dependencies (SQLite, ChromaDB, the embedding model), each bounded in time (services)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from crewdb.db.engine import Database
from crewdb.db.health import storage_details
from crewdb.errors import CrewdbError
from crewdb.vectors.embedders import Embedder
from crewdb.vectors.store import VectorStore

log = logging.getLogger(__name__)

SQLITE, CHROMA, EMBEDDER = "sqlite", "chroma", "embedder"
DEPENDENCIES = (SQLITE, CHROMA, EMBEDDER)
# How long the health report waits for a dependency's details (row counts, collection sizes):
# on a large database or behind busy reader threads they take far longer than a probe may.
DETAILS_TIMEOUT = 10.0

Probe = Callable[[], Awaitable[dict[str, Any]]]


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
        self,
        db: Database,
        database_path: Path,
        store: VectorStore,
        embedder: Embedder,
        *,
        timeout: float,
        details_timeout: float = DETAILS_TIMEOUT,
    ) -> None:
        self._db = db
        self._database_path = database_path
        self._store = store
        self._embedder = embedder
        self._timeout = timeout
        self._details_timeout = details_timeout
        # Checks whose last failure was unexpected (a defect, not an outage): logged with the
        # traceback when such a streak starts, not at every round.
        self._defective: set[str] = set()

    async def check(self, *, detailed: bool = False) -> dict[str, CheckResult]:
        """Every dependency's state, checked now and concurrently with cheap probes (`SELECT 1`,
        a heartbeat), each bounded by the check timeout.

        Detailed (the health report): then, for each dependency that is up, what the report
        shows (row counts, collection sizes). Those cost more and may wait behind traffic, so
        they never decide up or down: they have a bound of their own, and a failure shows as
        `details_error` beside the probe's details.
        """
        probes: dict[str, Probe] = {
            SQLITE: self._sqlite,
            CHROMA: self._chroma,
            EMBEDDER: self._embedder_probe,
        }
        checked = await asyncio.gather(*(self._run(name, probe) for name, probe in probes.items()))
        results = {result.name: result for result in checked}
        if detailed:
            extras: dict[str, Probe] = {SQLITE: self._sqlite_details, CHROMA: self._store.details}
            up = [name for name in extras if results[name].up]
            found = await asyncio.gather(*(self._details(name, extras[name]) for name in up))
            for name, details in zip(up, found, strict=True):
                results[name] = dataclasses.replace(
                    results[name], details={**results[name].details, **details}
                )
        return results

    async def _run(self, name: str, probe: Probe) -> CheckResult:
        started = time.perf_counter()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation that
            # shutdown sends when it lands as the check completes (CPython gh-86296).
            async with asyncio.timeout(self._timeout):
                details = await probe()
        except TimeoutError:
            return CheckResult(name, False, time.perf_counter() - started, f"no answer in {self._timeout:g}s")
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - any failure: the dependency is down
            _reraise_if_cancelled(error)
            return CheckResult(name, False, time.perf_counter() - started, self._describe(name, error))
        self._defective.discard(name)
        return CheckResult(name, True, time.perf_counter() - started, details=details)

    async def _details(self, name: str, gather: Probe) -> dict[str, Any]:
        what = f"{name} details"
        try:
            async with asyncio.timeout(self._details_timeout):
                details = await gather()
        except TimeoutError:
            return {"details_error": f"no details in {self._details_timeout:g}s"}
        except (Exception, asyncio.CancelledError) as error:  # noqa: BLE001 - shown, never fatal to a report
            _reraise_if_cancelled(error)
            return {"details_error": self._describe(what, error)}
        self._defective.discard(what)
        return details

    def _describe(self, name: str, error: BaseException) -> str:
        """What went wrong, in a line. An outage (a domain error, a refused connection) is the
        check's result; anything else is a defect in the check, logged with its traceback."""
        if isinstance(error, CrewdbError):
            return error.message
        if not isinstance(error, OSError) and name not in self._defective:
            self._defective.add(name)
            log.error("health check of %s failed unexpectedly", name, exc_info=error)
        return str(error) or type(error).__name__

    async def _sqlite(self) -> dict[str, Any]:
        await self._db.ping()
        return {}

    async def _sqlite_details(self) -> dict[str, Any]:
        return await self._db.read(lambda conn: storage_details(conn, self._database_path))

    async def _chroma(self) -> dict[str, Any]:
        beat = await self._store.heartbeat()
        return {"version": beat.version, "heartbeat_ms": round(beat.latency * 1000, 3)}

    async def _embedder_probe(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._embedder.probe)


def _reraise_if_cancelled(error: BaseException) -> None:
    """Re-raises a cancellation meant for this task (shutdown, a client gone); one that came out
    of a check (a future cancelled under it, e.g. by an executor's shutdown) is a failure."""
    task = asyncio.current_task()
    if isinstance(error, asyncio.CancelledError) and task is not None and task.cancelling():
        raise error
