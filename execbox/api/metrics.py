"""The API's Prometheus series: HTTP requests, quota refusals, refused keys.

They live in the executor's registry, beside the execution, pool and session series of
``execbox.service.metrics``, so ``/metrics`` serves one registry (docs/operations.md lists
every series). :class:`HTTPMetrics` is ASGI middleware that counts every request by
method, route template and status. The route label is the template the request matched
(``/v1/sessions/{session_id}``), never the raw path, so its values stay few; ``unmatched``
for a request answered before routing (an unknown path, a missing API key).
"""

from __future__ import annotations

import time
import weakref

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from execbox.errors import UnavailableError

__all__ = ["HTTPMetrics", "Metrics", "route_template"]

_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The API's series in one registry; :meth:`of` makes them once per registry (several
    apps may serve one executor)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "execbox_http_requests_total", "HTTP requests by method, route template and status code",
            ["method", "route", "status"], registry=registry,
        )
        self.duration = Histogram(
            "execbox_http_request_duration_seconds", "Time from a request's arrival to the end of its answer",
            ["method", "route"], registry=registry, buckets=_BUCKETS_S,
        )
        self.quota_refusals = Counter(
            "execbox_quota_refusals_total",
            "Requests refused by a quota, by API key name (empty: no key) and quota "
            "(rate, concurrency, address_rate, store_unavailable)",
            ["key", "quota"], registry=registry,
        )
        self.unauthenticated = Counter(
            "execbox_unauthenticated_requests_total", "Requests refused for a missing or wrong API key",
            registry=registry,
        )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> Metrics:
        if registry not in _MADE:
            _MADE[registry] = cls(registry)
        return _MADE[registry]

    def refused(self, key: str | None, exc: Exception) -> None:
        """A request a quota refused (``key`` is the key's name, never the key)."""
        quota = "store_unavailable" if isinstance(exc, UnavailableError) else getattr(exc, "quota", "") or "other"
        self.quota_refusals.labels(key or "", quota).inc()


_MADE: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


def route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope``, or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    return str(scope.get("root_path", "")) + str(path) if path else "unmatched"


class HTTPMetrics:
    """ASGI middleware: counts every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before answering

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            method, route = scope["method"], route_template(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.duration.labels(method, route).observe(time.perf_counter() - started)
