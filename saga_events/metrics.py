"""Prometheus text format (version 0.0.4) for a registrar and its HTTP gateway.

Written by hand: a dozen counters and gauges do not need a client library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gateway import Gateway


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    # Every digit of a counter: "{:g}" would print 1234567 as 1.23457e+06, and
    # above a million the samples lose digits and a rate() over them is wrong.
    return str(value) if isinstance(value, int) else repr(float(value))


def render_metrics(gw: Gateway) -> str:
    """Prometheus text format (version 0.0.4) of the registrar, mirror and gateway counters."""
    reg = gw.registrar.stats
    mirror = gw.mirror
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {_num(value)}")

    metric(
        "saga_events_received_total",
        "counter",
        "Events received, by source (pubsub: from agents; http: write requests).",
        [('{source="pubsub"}', reg.received), ('{source="http"}', gw.stats.received)],
    )
    metric(
        "saga_events_applied_total",
        "counter",
        "Events applied by the Lua script, by outcome.",
        [(f'{{status="{_esc(k)}"}}', v) for k, v in sorted(reg.applied.items())],
    )
    rejected = [
        (f'{{source="pubsub",reason="{_esc(k)}"}}', v) for k, v in sorted(reg.rejected.items())
    ]
    rejected += [
        (f'{{source="http",reason="{_esc(k)}"}}', v) for k, v in sorted(gw.stats.rejected.items())
    ]
    metric(
        "saga_events_rejected_total",
        "counter",
        "Events and requests rejected as invalid, by source and reason.",
        rejected,
    )
    metric(
        "saga_registry_instances",
        "gauge",
        "Live instances in the gateway's view.",
        [("", len(mirror))],
    )
    metric(
        "saga_registry_services",
        "gauge",
        "Services with at least one instance in the gateway's view.",
        [("", len({i.service_name for i in mirror.snapshot().values()}))],
    )
    metric(
        "saga_registry_reaped_total",
        "counter",
        "Instances removed by this registrar's reaper after their deadline (expiries).",
        [("", reg.reaped)],
    )
    metric(
        "saga_mirror_stale",
        "gauge",
        "1 while the gateway's view may lag Redis.",
        [("", 1 if mirror.stale else 0)],
    )
    stale_for = gw.stale_seconds()
    metric(
        "saga_mirror_stale_seconds",
        "gauge",
        "How long the gateway's view has been stale (0 when current).",
        [("", round(stale_for, 3))],
    )
    metric(
        "saga_mirror_resyncs_total",
        "counter",
        "Resyncs of the gateway's view.",
        [("", mirror.stats.resyncs)],
    )
    metric(
        "saga_redis_reconnects_total",
        "counter",
        "Reconnects after a lost Redis connection, by part.",
        [('{part="registrar"}', reg.reconnects), ('{part="mirror"}', mirror.stats.reconnects)],
    )
    metric(
        "saga_registrar_rebuilds_total",
        "counter",
        "Rebuilds of an empty or restarted Redis led by this registrar.",
        [("", reg.rebuilds)],
    )
    metric(
        "saga_registrar_flags_reapplied_total",
        "counter",
        "Times the keyspace notification flags had been reset and were re-applied.",
        [("", reg.flags_reapplied)],
    )
    metric(
        "saga_http_responses_total",
        "counter",
        "HTTP answers by method and status code.",
        [
            (f'{{method="{_esc(m)}",code="{c}"}}', v)
            for (m, c), v in sorted(gw.stats.responses.items())
        ],
    )
    metric(
        "saga_http_redis_unavailable_total",
        "counter",
        "Requests answered 503 because Redis was unreachable.",
        [("", gw.stats.unavailable)],
    )
    return "\n".join(lines) + "\n"
