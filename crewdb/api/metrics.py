"""Prometheus metrics on an optional HTTP port: calls, latency, streams, refusals, queue, dependencies."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from crewdb.services.health import CheckResult

log = logging.getLogger(__name__)

# Unary calls here take from a fraction of a millisecond (reads) to seconds (embedding).
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class MethodMetrics:
    """One method's instruments, resolved once at start-up so a call does no label lookups."""

    metrics: Metrics
    method: str
    in_flight: Any
    latency: Any
    streams: Any | None
    refused: Any

    def begin(self) -> float:
        self.in_flight.inc()
        if self.streams is not None:
            self.streams.inc()
        return time.perf_counter()

    def end(self, code: str, started: float) -> None:
        self.in_flight.dec()
        if self.streams is not None:
            self.streams.dec()
        self.latency.observe(time.perf_counter() - started)
        self.metrics.calls.labels(self.method, code).inc()


class Metrics:
    """crewdb's instruments in a registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "crewdb_rpc_calls",
            "Finished calls, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "crewdb_rpc_duration_seconds",
            "Call duration",
            ["method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "crewdb_rpc_in_flight", "Calls in progress", ["method"], registry=self.registry
        )
        self._streams = Gauge(
            "crewdb_streams_open", "Open server streams", ["method"], registry=self.registry
        )
        self._refused = Counter(
            "crewdb_rpc_refused",
            "Calls refused at once because CREWDB_MAX_CONCURRENT_RPCS calls were in progress",
            ["method"],
            registry=self.registry,
        )
        self._up = Gauge(
            "crewdb_dependency_up",
            "1 if the dependency passed its last check",
            ["dependency"],
            registry=self.registry,
        )
        self._check = Gauge(
            "crewdb_dependency_check_seconds",
            "Duration of the dependency's last check",
            ["dependency"],
            registry=self.registry,
        )
        self._server: Any = None

    def for_method(self, method: str, *, streaming: bool) -> MethodMetrics:
        return MethodMetrics(
            self,
            method,
            self._in_flight.labels(method),
            self._latency.labels(method),
            self._streams.labels(method) if streaming else None,
            self._refused.labels(method),
        )

    def record_checks(self, results: dict[str, CheckResult]) -> None:
        for name, result in results.items():
            self._up.labels(name).set(1 if result.up else 0)
            self._check.labels(name).set(result.latency)

    def watch_queue(self, read_counts: Callable[[], dict[str, int]]) -> None:
        """Reports the task queue's size per status at each scrape (one indexed read)."""
        self.registry.register(_QueueCollector(read_counts))

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP on a thread; returns the bound port (port 0 picks one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound: int = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QueueCollector(Collector):
    def __init__(self, read_counts: Callable[[], dict[str, int]]) -> None:
        self._read_counts = read_counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("crewdb_tasks", "Tasks in the queue, by status", labels=["status"])
        try:
            counts = self._read_counts()
        except Exception:
            log.warning("could not read the task queue for metrics", exc_info=True)
            return
        for status, count in sorted(counts.items()):
            family.add_metric([status], count)
        yield family
