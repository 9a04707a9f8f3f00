"""How the REST writer's requests become registrar events: ordering, no I/O (internal).

One job: the ordering and the shape of the events :mod:`saga_events.writer`
sends for HTTP writes, which carry no agent incarnation. Contract:

* :class:`HybridClock` gives new incarnations that never go back within one
  writer and roughly follow real time across writers.
* :func:`ordering` reads an ``incarnation:seq`` value (the registrar's order
  hash, a tombstone); None when absent or unreadable, never an error.
* :func:`announce_like` and :func:`with_status` shape a heartbeat like the
  record it keeps alive: the same body (a self-drained record stays draining),
  and a health report's status in ``metadata["health"]``, with the next
  ``seq`` only when that changes the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import msgspec

from . import model
from .health import HEALTH_KEY, safe_reason

__all__ = ["HybridClock", "announce_like", "ordering", "with_status"]


class HybridClock:
    """Microsecond-scale counter: the wall clock in ms times 1000, never going back.

    ``tick()`` returns ``max(last + 1, now_ms * 1000)``, so values grow strictly
    within one writer even when the wall clock steps back, and roughly follow
    real time across writers. It fits the events' ``incarnation`` field
    (< 2**53) until the year 2255.
    """

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self._last = 0

    def tick(self) -> int:
        self._last = max(self._last + 1, self._now_ms() * 1000)
        return self._last


def ordering(value: bytes | str | None) -> tuple[int, int] | None:
    """An ``incarnation:seq`` value (the order hash, a tombstone); None if absent or unreadable."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    inc, sep, seq = text.partition(":")
    if sep and inc.isascii() and inc.isdigit() and seq.isascii() and seq.isdigit():
        return int(inc), int(seq)
    return None


def announce_like(
    inst: model.Instance, kind: type[model.Announce], incarnation: int, seq: int
) -> model.Announce:
    """An event of ``kind`` with ``inst``'s body and the given ordering."""
    # A draining record stays draining: its body must not change on a refresh.
    # An operator's drain is not the instance's own word: the script re-adds it.
    cls = model.Drain if inst.self_draining else kind
    return cls(
        service_name=inst.service_name,
        service_id=inst.service_id,
        incarnation=incarnation,
        seq=seq,
        service_url=inst.service_url,
        capabilities=inst.capabilities,
        metadata=inst.metadata,
        ttl_ms=inst.ttl_ms,
    )


def with_status(
    event: model.Announce, status: Literal["failing", "passing"] | None, reason: str
) -> model.Announce:
    """``event`` carrying a health status; the next seq when that changes the record."""
    if status is None:
        return event
    meta = {k: v for k, v in event.metadata.items() if k != HEALTH_KEY}
    cls: type[model.Announce] = model.Heartbeat
    if status == "failing":
        meta[HEALTH_KEY] = safe_reason(f"failing: {reason}" if reason else "failing")
        cls = model.Drain
    fields = msgspec.structs.asdict(event)
    fields["metadata"] = meta
    changed = cls(**fields)
    if model.body_of(changed) != model.body_of(event):
        changed = msgspec.structs.replace(changed, seq=event.seq + 1)
    return changed
