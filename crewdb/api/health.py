"""The standard grpc.health.v1 service, with statuses that follow a periodic database probe."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A probe that takes longer than this counts as failed.
PROBE_TIMEOUT_SECONDS = 2.0


class HealthReporter:
    """Runs `SELECT 1` every `interval` seconds and sets `""` and each service accordingly."""

    def __init__(
        self,
        server: aio.Server,
        probe: Callable[[], Awaitable[None]],
        services: Iterable[str],
        interval: float,
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self._probe = probe
        self._services = ["", *services]
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._healthy: bool | None = None

    async def start(self) -> None:
        """Probes once (so the first answer is already true) and keeps probing."""
        await self.probe()
        self._task = asyncio.create_task(self._run(), name="crewdb-health")

    async def probe(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancellation
            # that shutdown sends when it lands as the probe completes (CPython gh-86296).
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await self._probe()
            healthy = True
        except Exception as error:  # noqa: BLE001 - any failure means not serving
            healthy = False
            if self._healthy is not False:
                log.warning("database probe failed: %s", str(error) or type(error).__name__)
        if healthy != self._healthy:
            if healthy and self._healthy is False:
                log.info("database probe passes again")
            for service in self._services:
                await self.servicer.set(service, SERVING if healthy else NOT_SERVING)
            self._healthy = healthy
        return healthy

    async def shutdown(self) -> None:
        """Reports NOT_SERVING for good, so probes stop sending traffic during the drain."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()
