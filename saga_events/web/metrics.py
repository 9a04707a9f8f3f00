"""Prometheus metrics of one gateway and its registrar, on a private registry.

One job: expose the registrar's, the view's and the gateway's counters in the
Prometheus text format through ``prometheus-client``. Each gateway owns a
:class:`GatewayMetrics` with its own ``CollectorRegistry`` (two gateways in
one process never share or clash); the registrar's and the view's counters
are read at scrape time by a collector, the request latency histogram is
observed by the gateway's ASGI front. Metric names are stable (dashboards
and tests read them).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..mirror import Mirror
from ..registrar import Registrar

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

_ROUTES: Final = (
    ("/api/v1/services/register", "/api/v1/services/register"),
    ("/health", "/health"),
    ("/metrics", "/metrics"),
    ("/api/v1/services", "/api/v1/services"),
    ("/api/v1/watch", "/api/v1/watch"),  # observed when the stream ends: its life
    ("/api/v1/sd/prometheus", "/api/v1/sd/prometheus"),
    ("/ui", "/ui"),
    ("/ui/", "/ui"),
    ("/ui/app.js", "/ui"),
    ("/ui/app.css", "/ui"),
    ("/", "/"),
)


def route_of(method: str, path: str) -> str:
    """The route template of a request path (a bounded label set, never the raw path)."""
    for exact, route in _ROUTES:
        if path == exact:
            return route
    if path.startswith("/api/v1/services/"):
        rest = path[len("/api/v1/services/") :]
        if rest.endswith("/heartbeat") and rest.count("/") == 1:
            return "/api/v1/services/{name}/heartbeat"
        if "/" not in rest:
            return "/api/v1/services/{name}"
    if path.startswith("/schema"):
        return "/schema"
    return "other"


@dataclass
class GatewayStats:
    """Counters of one gateway (the HTTP side)."""

    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)
    unavailable: int = 0
    view_timeouts: int = 0


class _Snapshot(Collector):
    """Reads the counters of the registrar, the view and the gateway at scrape time."""

    def __init__(self, owner: GatewayMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        o = self.owner
        reg, gw, mirror = o.registrar.stats, o.stats, o.mirror

        received = CounterMetricFamily(
            "saga_events_received_total",
            "Events received, by source (pubsub: from agents; http: write requests).",
            labels=["source"],
        )
        received.add_metric(["pubsub"], reg.received)
        received.add_metric(["http"], gw.received)
        yield received

        applied = CounterMetricFamily(
            "saga_events_applied_total",
            "Events applied by the Lua script, by outcome.",
            labels=["status"],
        )
        for status, n in sorted(reg.applied.items()):
            applied.add_metric([status], n)
        yield applied

        rejected = CounterMetricFamily(
            "saga_events_rejected_total",
            "Events and requests rejected as invalid, by source and reason.",
            labels=["source", "reason"],
        )
        for reason, n in sorted(reg.rejected.items()):
            rejected.add_metric(["pubsub", reason], n)
        for reason, n in sorted(gw.rejected.items()):
            rejected.add_metric(["http", reason], n)
        yield rejected

        yield GaugeMetricFamily(
            "saga_registry_instances", "Live instances in the gateway's view.", value=len(mirror)
        )
        services = len({i.service_name for i in mirror.snapshot().values()})
        yield GaugeMetricFamily(
            "saga_registry_services",
            "Services with at least one instance in the gateway's view.",
            value=services,
        )
        yield GaugeMetricFamily(
            "saga_watch_streams",
            "Open GET /api/v1/watch streams (Server-Sent Events) on this gateway.",
            value=o.watchers(),
        )
        yield CounterMetricFamily(
            "saga_registrar_loop_restarts_total",
            "Times the registrar's consume loop was restarted after an unexpected error.",
            value=reg.loop_restarts,
        )
        yield CounterMetricFamily(
            "saga_registry_restored_total",
            "Instances written back from the registrar's last view after an empty restart.",
            value=reg.restored,
        )
        ok = o.registrar.notifications_ok
        yield GaugeMetricFamily(
            "saga_registrar_notifications_ok",
            "1 when the keyspace notification flags the mirrors need are set, else 0.",
            value=1 if ok else 0,
        )
        yield CounterMetricFamily(
            "saga_registry_reaped_total",
            "Instances removed by this registrar's reaper after their deadline (expiries).",
            value=reg.reaped,
        )
        if o.revision is not None:
            yield GaugeMetricFamily(
                "saga_registry_revision",
                "The registry revision (saga:{ns}:rev) at the last scrape.",
                value=o.revision,
            )
        yield GaugeMetricFamily(
            "saga_mirror_stale",
            "1 while the gateway's view may lag Redis.",
            value=int(mirror.stale),
        )
        yield GaugeMetricFamily(
            "saga_mirror_stale_seconds",
            "How long the gateway's view has been stale (0 when current).",
            value=round(o.stale_seconds(), 3),
        )
        yield CounterMetricFamily(
            "saga_mirror_resyncs_total",
            "Resyncs of the gateway's view.",
            value=mirror.stats.resyncs,
        )
        reconnects = CounterMetricFamily(
            "saga_redis_reconnects_total",
            "Reconnects after a lost Redis connection, by part.",
            labels=["part"],
        )
        reconnects.add_metric(["registrar"], reg.reconnects)
        reconnects.add_metric(["mirror"], mirror.stats.reconnects)
        yield reconnects
        yield CounterMetricFamily(
            "saga_registrar_rebuilds_total",
            "Rebuilds of an empty or restarted Redis led by this registrar.",
            value=reg.rebuilds,
        )
        yield CounterMetricFamily(
            "saga_registrar_flags_reapplied_total",
            "Times the keyspace notification flags had been reset and were re-applied.",
            value=reg.flags_reapplied,
        )
        responses = CounterMetricFamily(
            "saga_http_responses_total",
            "HTTP answers by method and status code.",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(gw.responses.items()):
            responses.add_metric([method, str(code)], n)
        yield responses
        yield CounterMetricFamily(
            "saga_http_redis_unavailable_total",
            "Requests answered 503 because Redis was unreachable or refused.",
            value=gw.unavailable,
        )
        yield CounterMetricFamily(
            "saga_http_view_timeouts_total",
            "Writes applied but not shown by the gateway's view within the write timeout.",
            value=o.view_timeouts(),
        )


class GatewayMetrics:
    """The metrics of one gateway: its counters, a latency histogram, a private registry."""

    def __init__(
        self,
        registrar: Registrar,
        mirror: Mirror,
        *,
        view_timeouts: Callable[[], int] = lambda: 0,
        watchers: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registrar = registrar
        self.mirror = mirror
        self.stats = GatewayStats()
        self.revision: int | None = None
        self.view_timeouts = view_timeouts
        self.watchers = watchers
        self._stale_since: float | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "saga_http_request_duration_seconds",
            "Time from request to the end of the answer, by route and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.registry.register(_Snapshot(self))

    def note_staleness(self) -> None:
        """Called periodically: remembers since when the view has been stale."""
        if self.mirror.stale:
            if self._stale_since is None:
                self._stale_since = time.monotonic()
        else:
            self._stale_since = None

    def stale_seconds(self) -> float:
        """How long the view has been stale; 0.0 while it is current."""
        if self._stale_since is None or not self.mirror.stale:
            return 0.0
        return time.monotonic() - self._stale_since

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4) of every metric."""
        return generate_latest(self.registry).decode()
