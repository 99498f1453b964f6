"""Per-client rate limiting (``SANDBOX_RATE_LIMIT``, e.g. ``100/minute``): a token bucket per IP."""

from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["RateLimiter"]


class RateLimiter:
    """``allow(client)`` is False once a client spent its budget; refills continuously."""

    def __init__(self, requests: int, period_s: float, max_clients: int = 10_000) -> None:
        self.capacity = float(requests)
        self.rate_per_s = requests / period_s
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_clients = max_clients

    def allow(self, client: str) -> bool:
        return self.acquire(client) is None

    def acquire(self, client: str) -> float | None:
        """None when ``client`` may go on (a token spent), else the seconds until it may."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate_per_s
