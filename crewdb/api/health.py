"""The standard grpc.health.v1 service: statuses that follow periodic dependency checks, read from a cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from crewdb.services.health import CheckResult, Dependencies

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"


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
        self.servicer = health.aio.HealthServicer()
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
                await self.servicer.set(service, SERVING if serving else NOT_SERVING)
                self._serving[service] = serving
        if self._on_results is not None:
            self._on_results(results)
        return results

    def statuses(self) -> dict[str, str]:
        """Each served name's current status, as the health service reports it."""
        return {name: "SERVING" if serving else "NOT_SERVING" for name, serving in self._serving.items()}

    async def shutdown(self) -> None:
        """Reports NOT_SERVING for good, so probes stop sending traffic during the drain."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
        self._serving = dict.fromkeys(self._serving, False)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
