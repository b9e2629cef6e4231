"""The standard grpc.health.v1 service: statuses that follow periodic dependency checks, read from a cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crewdb.services.health import CheckResult, Dependencies

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
LIVENESS = "liveness"


class HealthService(health_pb2_grpc.HealthServicer):  # type: ignore[misc] # grpc_health ships no types
    """grpc.health.v1 Check and Watch over a table of statuses.

    In place of grpcio-health-checking's servicer, whose Watch streams never end: they held a
    shutdown for its whole grace period. Here `shutdown` reports NOT_SERVING to every watcher
    and then ends each Watch with OK. A slow watcher never delays `set` (no lock is shared).
    """

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._ended = False

    def set(self, service: str, status: int) -> None:
        """Sets a name's status and wakes its watchers; ignored after `shutdown`."""
        if not self._ended:
            self._statuses[service] = status
            self._wake()

    def shutdown(self) -> None:
        """Every name NOT_SERVING for good; each Watch sends that, then ends."""
        self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
        self._ended = True
        self._wake()

    async def Check(self, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no health status for {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        last = None
        while True:
            changed = self._changed  # taken before reading: a change after the read sets it
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._ended:
                return
            await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()  # watchers hold the old one, now set


class HealthReporter:
    """Checks the dependencies every `interval` seconds and sets each served name accordingly.

    `services` maps each name the health service answers for to the dependencies it needs:
    SERVING when all of them passed their last check. Probes read these statuses; they never
    reach a dependency themselves. `liveness` needs nothing: it is SERVING while the event loop
    answers, and turns NOT_SERVING only on shutdown.
    """

    def __init__(
        self,
        server: aio.Server,
        dependencies: Dependencies,
        services: Mapping[str, tuple[str, ...]],
        interval: float,
        *,
        on_results: Callable[[dict[str, CheckResult]], None] | None = None,
    ) -> None:
        self.servicer = HealthService()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self._dependencies = dependencies
        self._services = {LIVENESS: (), **services}
        self._interval = interval
        self._on_results = on_results
        self._task: asyncio.Task[None] | None = None
        self._serving: dict[str, bool] = {}
        self.results: dict[str, CheckResult] = {}

    async def start(self) -> None:
        """Checks once (so the first answer is already true) and keeps checking."""
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="crewdb-health")

    async def refresh(self) -> dict[str, CheckResult]:
        """Checks every dependency now and updates the statuses; logs each change once."""
        results = await self._dependencies.check()
        for name, result in results.items():
            before = self.results.get(name)
            if before is None or before.up != result.up:
                if result.up and before is not None:
                    log.info("dependency %s is up again", name)
                elif not result.up:
                    log.warning("dependency %s is down: %s", name, result.error)
        self.results = results
        for service, needs in self._services.items():
            serving = all(results[need].up for need in needs)
            if self._serving.get(service) != serving:
                self.servicer.set(service, SERVING if serving else NOT_SERVING)
                self._serving[service] = serving
        if self._on_results is not None:
            self._on_results(results)
        return results

    def statuses(self) -> dict[str, str]:
        """Each served name's current status, as the health service reports it."""
        return {name: "SERVING" if serving else "NOT_SERVING" for name, serving in self._serving.items()}

    async def shutdown(self) -> None:
        """Reports NOT_SERVING for good, so probes stop sending traffic during the drain, and
        ends every Watch stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.servicer.shutdown()
        self._serving = dict.fromkeys(self._serving, False)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:
                # A failure in one check is that check's result (Dependencies); this is for a
                # defect anywhere else in a round. The statuses keep their last values and the
                # next round tries again: a checker that died would leave them stale for good.
                log.exception("health check round failed; the next one runs in %gs", self._interval)
