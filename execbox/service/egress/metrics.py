"""The proxy's counters as Prometheus metrics, read at each scrape (no state of its own).

``registry.register(EgressMetrics(proxy))`` adds ``execbox_egress_connections_total``
(label ``outcome``: allowed, refused, failed) and ``execbox_egress_bytes_total`` (label
``direction``: up, from sandboxes; down, to them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from execbox.service.egress.proxy import EgressProxy

__all__ = ["EgressMetrics"]


class EgressMetrics(Collector):
    def __init__(self, proxy: EgressProxy) -> None:
        self._proxy = proxy

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self._proxy.stats()
        connections = CounterMetricFamily(
            "execbox_egress_connections", "connection attempts through the egress proxy", labels=["outcome"]
        )
        for outcome in ("allowed", "refused", "failed"):
            connections.add_metric([outcome], getattr(stats, outcome))
        yield connections
        carried = CounterMetricFamily("execbox_egress_bytes", "bytes carried by the egress proxy", labels=["direction"])
        carried.add_metric(["up"], stats.bytes_up)
        carried.add_metric(["down"], stats.bytes_down)
        yield carried
