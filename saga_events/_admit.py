"""The registrar's admission of what its intake receives (internal).

One job: turn a batch of the intake's raw pub/sub replies into the valid
events that are within the flood guards, in order. Every message is counted
(``stats.received``) and every refusal with its reason (``stats.rejected``:
the model's reasons, ``bad_json``, ``rate_limited``), each logged, rate-limited.

Contract: nothing a message holds makes it raise; a refused message changes
nothing but the counters. The common case, a well-formed event, goes through
:class:`~saga_events._fastdecode.FastDecoder`; anything else, and every
rejection, through :func:`saga_events.model.decode_event`, which names the reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from . import model
from ._fastdecode import FastDecoder
from ._ratelimit import TokenBuckets
from ._redis import RateLimitedLog
from .errors import InvalidEvent


class Counts(Protocol):
    """The counters admission updates (the registrar's stats)."""

    received: int
    rejected: Counter[str]


class Admission:
    """Decode, validate and rate-limit one registrar's events; see the module doc."""

    def __init__(
        self,
        *,
        events_prefix: str,
        url_schemes: frozenset[str],
        stats: Counts,
        rejections: RateLimitedLog,
        rate_limit: float | None,
        rate_burst: int,
        service_rate_limit: float | None,
        service_rate_burst: int,
    ) -> None:
        self.url_schemes = url_schemes
        self.stats = stats
        self._rejections = rejections
        # Flood guards (events/s and burst), per instance and per service; None
        # turns one off (rate_limit=None: both). Both tables are bounded (least
        # recently used goes).
        self._buckets = TokenBuckets(rate_limit, rate_burst) if rate_limit else None
        self._service_buckets = (
            TokenBuckets(service_rate_limit, service_rate_burst)
            if rate_limit and service_rate_limit
            else None
        )
        self._fast = FastDecoder(url_schemes)
        self._events_prefix = len(events_prefix.encode())

    def validate(self, channel: bytes, data: bytes) -> model.AnyEvent | None:
        """Decode one message; count and log a rejection and return None if invalid."""
        service = self._fast.service_of(channel, self._events_prefix)
        event = self._fast.decode(data, service)  # the common case, checked strings cached
        if event is not None:
            return event
        try:
            return model.decode_event(data, service, schemes=self.url_schemes)
        except InvalidEvent as exc:
            reason, detail = exc.reason, exc.detail
        except Exception as exc:
            reason, detail = "bad_json", f"{type(exc).__name__}: {exc}"
        self.stats.rejected[reason] += 1
        self._rejections.warning(
            "rejected event on %s (%s): %s",
            channel.decode("utf-8", "replace")[:200],
            reason,
            detail[:300],
        )
        return None

    def within_rate(self, event: model.AnyEvent, now: float | None = None) -> bool:
        """Whether ``event`` passes both flood guards; a refusal is counted and logged."""
        name, sid = event.service_name, event.service_id
        services, instances = self._service_buckets, self._buckets
        if instances is None:
            return True
        now = instances.clock() if now is None else now  # decode_batch's: once a batch
        if services is not None and not services.take(name, now):
            limited, buckets = f"{name}", services
        elif not instances.take((name, sid), now):
            limited, buckets = f"{name}/{sid}", instances
        else:
            return True
        self.stats.rejected["rate_limited"] += 1
        self._rejections.warning(
            "rejected event of %s/%s (rate_limited): more than %s events/s (burst %s) for %s",
            name,
            sid,
            buckets.rate,
            buckets.burst,
            limited,
        )
        return False

    def decode_batch(self, batch: list[Any]) -> list[model.AnyEvent]:
        """The valid events of a batch of intake replies, within the rate limits."""
        events: list[model.AnyEvent] = []
        now = self._buckets.clock() if self._buckets is not None else 0.0
        stats = self.stats
        for reply in batch:
            if not isinstance(reply, list) or len(reply) != 4 or reply[0] != b"pmessage":
                continue  # pong and subscription replies
            stats.received += 1
            channel, data = reply[2], reply[3]
            if not isinstance(channel, bytes) or not isinstance(data, bytes):
                stats.rejected["bad_json"] += 1
                continue
            event = self.validate(channel, data)
            if event is not None and self.within_rate(event, now):
                events.append(event)
        return events
