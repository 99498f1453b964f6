"""Prometheus metrics of the execution service, in one registry per Executor.

Named as Prometheus asks (base units, ``_total`` for counters, ``_seconds`` for times).
Events are counted where they happen (:meth:`ServiceMetrics.observe_execution`,
:meth:`ServiceMetrics.observe_pool_wait`); the state of the pools and sessions is read at
scrape time by a collector, so a gauge is never stale. The HTTP layer adds its series to
the same registry (``execbox.api.metrics``). docs/operations.md lists every series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from execbox.pool import PoolStats

__all__ = ["DURATION_BUCKETS_S", "ServiceMetrics"]

#: histogram buckets of execution and wait times, in seconds
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """The execution series, and the collector of the pools', the sessions' and the build's state."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.executions = Counter(
            "execbox_executions_total", "Executions by language, backend and verdict (status)",
            ["language", "backend", "status"], registry=self.registry,
        )
        self.duration = Histogram(
            "execbox_execution_seconds", "Time from request to verdict, by language and backend",
            ["language", "backend"], registry=self.registry, buckets=DURATION_BUCKETS_S,
        )
        self.pool_wait = Histogram(
            "execbox_pool_wait_seconds", "Time an execution waited for a ready sandbox", ["pool"],
            registry=self.registry, buckets=DURATION_BUCKETS_S,
        )
        self.code_check_blocked = Counter(
            "execbox_code_check_blocked_total", "Requests refused by the static code check, by language and rule",
            ["language", "rule"], registry=self.registry,
        )
        self._state = _StateCollector()
        self.registry.register(self._state)

    def observe_execution(self, language: str, backend: str | None, status: str, duration_s: float) -> None:
        self.executions.labels(language, backend or "none", status).inc()
        self.duration.labels(language, backend or "none").observe(duration_s)

    def observe_pool_wait(self, pool: str, wait_s: float) -> None:
        self.pool_wait.labels(pool).observe(wait_s)

    def observe_blocked(self, language: str, rules: set[str]) -> None:
        for rule in sorted(rules):
            self.code_check_blocked.labels(language, rule).inc()

    def read_pools(self, pool_stats: Callable[[], list[PoolStats]]) -> None:
        """Read the pools' state from ``pool_stats`` at every scrape."""
        self._state.pool_stats = pool_stats

    def read_sessions(self, count: Callable[[], int] | None) -> None:
        """Read the number of live sessions from ``count`` at every scrape (None: no such series)."""
        self._state.sessions = count

    def read_packages(self, stats: Callable[[], dict[str, int]]) -> None:
        """The package cache's counters and size (see service/packages.py), read at every scrape."""
        self._state.packages = stats

    def read_build(self, info: Callable[[], dict[str, str]]) -> None:
        """The labels of ``execbox_build_info`` (version, runsc_version), read at every scrape."""
        self._state.build = info


class _StateCollector(Collector):
    """Gauges and counters read from their owners at scrape time."""

    def __init__(self) -> None:
        self.pool_stats: Callable[[], list[PoolStats]] = list
        self.sessions: Callable[[], int] | None = None
        self.build: Callable[[], dict[str, str]] = dict
        self.packages: Callable[[], dict[str, int]] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.pool_stats()
        gauges = {
            "ready": ("execbox_pool_ready", "Sandboxes built and waiting for an execution"),
            "leased": ("execbox_pool_leased", "Sandboxes running an execution"),
            "creating": ("execbox_pool_creating", "Sandboxes being built"),
            "waiting": ("execbox_pool_waiting", "Executions waiting for a sandbox (the queue depth)"),
            "size": ("execbox_pool_size", "Sandboxes the pool keeps ready (SANDBOX_EXECUTOR_MANAGER_POOL_SIZE)"),
        }
        for field, (name, documentation) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["pool"])
            for stat in stats:
                gauge.add_metric([stat.name], getattr(stat, field))
            yield gauge
        counters = {
            "created_total": ("execbox_sandboxes_created", "Sandboxes built"),
            "failed_total": ("execbox_sandboxes_failed", "Sandbox builds that failed, and ready sandboxes found dead"),
            "recycled_total": ("execbox_sandboxes_recycled", "Sandboxes destroyed after their execution"),
        }
        for field, (name, documentation) in counters.items():
            counter = CounterMetricFamily(name, documentation, labels=["pool"])
            for stat in stats:
                counter.add_metric([stat.name], getattr(stat, field, 0))
            yield counter
        if self.sessions is not None:
            yield GaugeMetricFamily("execbox_sessions_live", "Sessions alive now", value=self.sessions())
        if self.packages is not None:
            yield from _package_metrics(self.packages())
        info: dict[str, Any] = self.build()
        yield InfoMetricFamily("execbox_build", "The version of execbox and of runsc (gVisor)", value=info)


def _package_metrics(stats: dict[str, int]) -> Iterator[Metric]:
    """Packages per request: how requests for package sets were served, and the cache's size."""
    served = CounterMetricFamily(
        "execbox_package_sets", "Requests for a package set, by outcome (hit: cached; install: built now; "
        "refused: not allowed or not installable; failure: the installer failed)", labels=["outcome"],
    )
    for outcome, field in (("hit", "hits"), ("install", "installs"), ("refused", "refused"), ("failure", "failures")):
        served.add_metric([outcome], stats.get(field, 0))
    yield served
    yield CounterMetricFamily("execbox_package_layers_evicted", "Cached package layers removed by the LRU",
                              value=stats.get("evictions", 0))
    yield GaugeMetricFamily("execbox_package_layers", "Cached package layers", value=stats.get("layers", 0))
    yield GaugeMetricFamily("execbox_package_cache_bytes", "Bytes of the cached package layers",
                            value=stats.get("size_bytes", 0))
