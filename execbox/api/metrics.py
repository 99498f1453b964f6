"""Prometheus metrics of the service, in one registry per app (see docs/operations.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from execbox.errors import UnavailableError
from execbox.models import ExecutionRequest, ExecutionResult

__all__ = ["Metrics"]


class Metrics:
    """The series the service exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.executions = Counter(
            "execbox_executions_total", "Executions by language and verdict", ["language", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "execbox_execution_seconds", "Time from request to verdict", ["language"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.ready = Gauge("execbox_pool_ready", "Ready sandboxes", ["pool"], registry=self.registry)
        self.leased = Gauge("execbox_pool_leased", "Sandboxes running code", ["pool"], registry=self.registry)
        self.quota_refusals = Counter(
            "execbox_quota_refusals_total",
            "Requests refused by a quota, by API key name (empty: no key) and quota "
            "(rate, concurrency, address_rate, store_unavailable)",
            ["key", "quota"], registry=self.registry,
        )
        self.unauthenticated = Counter(
            "execbox_unauthenticated_requests_total", "Requests refused for a missing or wrong API key",
            registry=self.registry,
        )

    def refused(self, key: str | None, exc: Exception) -> None:
        """A request a quota refused (``key`` is the key's name, never the key)."""
        quota = "store_unavailable" if isinstance(exc, UnavailableError) else getattr(exc, "quota", "") or "other"
        self.quota_refusals.labels(key or "", quota).inc()

    def observe(self, request: ExecutionRequest, result: ExecutionResult, duration_s: float) -> None:
        """One execution that reached a verdict."""
        self.duration.labels(request.language.value).observe(duration_s)
        self.executions.labels(request.language.value, result.status.value).inc()
