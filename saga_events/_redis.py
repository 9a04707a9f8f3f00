"""Helpers shared by the parts that talk to Redis (internal).

One job: the low-level client plumbing below :mod:`saga_events.connection`.
Contract: :func:`connect` turns a URL (plain, ``redis+sentinel://``,
``redis+cluster://``) or a client into an asyncio client without redis-py's
own retries (every loop here retries with its own backoff); ``TRANSIENT`` is
the set of "Redis is unreachable" errors; :class:`Backoff` is exponential
with full jitter; :class:`RateLimitedLog` bounds repeated log lines.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

RedisLike = aioredis.Redis | str

#: Errors that mean "Redis is unreachable or the connection broke": retried, never fatal.
TRANSIENT: Final = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, TimeoutError)


def connect(redis: RedisLike, *, namespace: str | None = None, **overrides: Any) -> aioredis.Redis:
    """Return an asyncio Redis client for a URL, or the client itself.

    Clients made here fail fast instead of retrying inside redis-py: every
    part of saga-events has its own reconnect loop that knows what to redo
    after a reconnect (resubscribe, resync, re-announce). Sentinel and
    Cluster URLs (and ``read_from``) go to :func:`saga_events.topology.connect`;
    on a Cluster, ``namespace`` names the slot to follow.
    """
    if isinstance(redis, aioredis.Redis):
        return redis
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    kwargs.update(overrides)
    from . import topology  # imported here: topology imports this module

    if topology.is_topology_url(redis):
        return topology.connect(redis, namespace=namespace, **kwargs)
    return aioredis.Redis.from_url(redis, **kwargs)


def db_of(client: aioredis.Redis) -> int:
    kwargs = client.connection_pool.connection_kwargs
    return int(kwargs.get("db", 0) or 0)


class Backoff:
    """Exponential backoff with full jitter, for reconnect loops."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class RateLimitedLog:
    """Log at most ``burst`` records per ``window`` seconds; count the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 20, window: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._start = time.monotonic()
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                self.logger.warning("%d similar messages suppressed", self._suppressed)
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            self.logger.warning(msg, *args)
        else:
            self._suppressed += 1


def now_ms() -> int:
    return int(time.time() * 1000)


@asynccontextmanager
async def closing(client: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """``async with closing(client)``: the client closed at the end even when the
    caller is cancelled (redis-py closes its connections in tasks of a ``gather``,
    which a cancellation stops before they run, leaving the sockets open)."""
    import anyio

    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            await client.aclose()


async def close_quietly(pubsub: Any) -> None:
    """Close a PubSub whose connection may already be broken; never raises."""
    import anyio

    with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
        try:
            await pubsub.aclose()
        except Exception:
            pass
