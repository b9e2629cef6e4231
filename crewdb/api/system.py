"""crewdb.v1.SystemService: the admin health report and the vector export behind `crewdb backup`."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2

from crewdb.api import convert
from crewdb.api.health import HealthReporter
from crewdb.services.health import Dependencies, verdict
from crewdb.v1 import system_service_pb2 as pb
from crewdb.v1 import system_service_pb2_grpc as pb_grpc
from crewdb.vectors.store import VectorStore

Context = Any  # grpc.aio.ServicerContext

_VERDICTS = {
    "healthy": pb.VERDICT_HEALTHY,
    "degraded": pb.VERDICT_DEGRADED,
    "unhealthy": pb.VERDICT_UNHEALTHY,
}
DEFAULT_EXPORT_BATCH, MAX_EXPORT_BATCH = 256, 1000


def version() -> str:
    try:
        return importlib.metadata.version("crewdb")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


class SystemServicer(pb_grpc.SystemServiceServicer):
    def __init__(self, dependencies: Dependencies, reporter: HealthReporter, store: VectorStore) -> None:
        self._dependencies = dependencies
        self._reporter = reporter
        self._store = store
        self._started = datetime.now(UTC)
        self._started_monotonic = time.monotonic()
        self._version = version()

    async def GetHealthReport(self, request: pb.GetHealthReportRequest, context: Context) -> pb.HealthReport:
        results = await self._dependencies.check(detailed=True)
        report = pb.HealthReport(
            verdict=_VERDICTS[verdict(results).value],
            services=self._reporter.statuses(),
            started_at=convert.timestamp(self._started),
            uptime_seconds=time.monotonic() - self._started_monotonic,
            version=self._version,
        )
        for result in results.values():
            details = struct_pb2.Struct()
            details.update(result.details)
            report.dependencies.append(
                pb.DependencyHealth(
                    name=result.name,
                    status=pb.DEPENDENCY_STATUS_UP if result.up else pb.DEPENDENCY_STATUS_DOWN,
                    latency_ms=result.latency * 1000,
                    error=result.error,
                    details=details,
                )
            )
        return report

    async def ExportVectors(
        self, request: pb.ExportVectorsRequest, context: Context
    ) -> AsyncIterator[pb.ExportVectorsResponse]:
        size = convert.bounded_batch(
            request.batch_size, default=DEFAULT_EXPORT_BATCH, maximum=MAX_EXPORT_BATCH
        )
        async for batch in self._store.export(size):
            response = pb.ExportVectorsResponse(
                owner_id=batch.owner,
                collection=batch.collection,
                embedding_model=batch.model,
                dimension=batch.dimension,
            )
            for chunk in batch.chunks:
                exported = response.chunks.add(id=chunk.id, text=chunk.text, embedding=chunk.embedding)
                exported.metadata.update(chunk.metadata)
            yield response
