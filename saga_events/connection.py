"""Connections: how a part gets a Redis client, and one subscription session.

One job: everything a long-running pub/sub consumer (mirror, registrar,
agent) needs from Redis below its own protocol, with one set of constants.

Contract:

* :func:`open_client` is the one "how do I get a connection" step
  (today a plain URL or client; Sentinel and Cluster topology plug in here).
* :func:`subscribe` connects a subscription, (P)SUBSCRIBEs and waits for
  every confirmation (bounded by ``timing.ping_timeout``); messages that
  arrive before the last confirmation are kept in ``Subscription.pending``,
  in order. It is an async context manager that closes the connection.
* :meth:`Subscription.read` returns batches of raw replies (redis-py's
  lists: ``[b"message", channel, data]``, ``[b"pmessage", pattern,
  channel, data]``; PONGs are dropped) and keeps the session healthy: it
  PINGs after ``ping_interval`` of quiet and raises :class:`TimeoutError`
  after ``ping_timeout`` of silence (a half-open socket, a Redis that
  restarted and forgot the subscription). On a Sentinel URL a session also
  checks that its node answers ROLE master, after subscribing and after each
  refresh of the topology (a fault seen by another connection), and fails
  (ConnectionError) when it was demoted, so the loop moves and resyncs. On a
  Cluster it raises ConnectionError once its node no longer serves the
  registry's slot (a failover or a migration: ``_topology_pool.check_node``).
* :func:`consume` is the whole loop for a plain consumer (the registrar's
  event intake, the agent's control channel): subscribe, ``on_connect(sub)``
  (resync, re-announce), then ``on_batch(batch)`` for every non-empty batch,
  reconnecting forever.
* :func:`run_forever` runs a session function again and again with
  exponential backoff and jitter. It never raises into its caller except
  on cancellation: transient errors (:data:`TRANSIENT`) and refusals
  (NOPERM, READONLY, MOVED, any ``RedisError``) are logged, counted and
  passed to ``on_error``, then retried. The session calls ``healthy()``
  once it is fully working, which resets the backoff.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import _topology_pool, _wire
from ._redis import TRANSIENT, Backoff, RedisLike, close_quietly, connect

log = logging.getLogger("saga_events.connection")

_CONFIRMATIONS: Final = frozenset({b"subscribe", b"psubscribe"})


@dataclass(frozen=True, slots=True)
class Timing:
    """The constants of every subscription session, in one place."""

    ping_interval: float = 1.0  # PING the subscription after this much quiet
    ping_timeout: float = 3.0  # silence this long is a disconnect
    backoff_base: float = 0.05
    backoff_cap: float = 2.0
    #: Backoff after Redis *refused* a command (an ACL, a replica, a cluster
    #: redirect): None backs off as after an outage; a part whose refusals come
    #: from a configuration that changes slowly (the agent) waits longer.
    refused_base: float | None = None
    refused_cap: float | None = None

    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base, self.backoff_cap)

    def refused_backoff(self) -> Backoff:
        return Backoff(
            self.backoff_base if self.refused_base is None else self.refused_base,
            self.backoff_cap if self.refused_cap is None else self.refused_cap,
        )


DEFAULT_TIMING: Final = Timing()
"""The mirror's sessions (the watcher): a lost notification matters at once."""

REGISTRAR_TIMING: Final = Timing(ping_interval=3.0, ping_timeout=10.0)
"""The registrar's event intake: a busy subscription, pinged only when quiet."""

AGENT_TIMING: Final = Timing(
    ping_interval=5.0, ping_timeout=15.0, backoff_base=0.1, refused_base=1.0, refused_cap=30.0
)
"""An agent's control channel: one per process, rarely used; heartbeats go on
without it, and a refusal comes from a configuration that changes slowly."""


def open_client(redis: RedisLike, **overrides: Any) -> aioredis.Redis:
    """The one way to get a client: a URL (or an existing client, returned as is)."""
    return connect(redis, **overrides)


def is_transient(exc: BaseException) -> bool:
    """True for "Redis is unreachable or the connection broke"."""
    return isinstance(exc, TRANSIENT)


class Subscription:
    """One subscribed connection. Use it from one task only."""

    def __init__(self, pubsub: aioredis.client.PubSub, timing: Timing) -> None:
        self.pubsub = pubsub
        self.timing = timing
        self.pending: list[Any] = []
        self._reader = _wire.Subscription(pubsub)
        now = anyio.current_time()
        self.last_rx = now
        self._last_ping = now

    async def read(self, wait: float | None = None, limit: int = 1024) -> list[Any]:
        """Wait up to ``wait`` s (default ``ping_interval``) for messages; return a batch
        (possibly empty) of at most ``limit``, PINGing when due.

        Raises TimeoutError when the subscription has been silent for
        ``ping_timeout`` s, and redis-py's ConnectionError when it closed.
        """
        if self.pending:
            batch, self.pending = self.pending[:limit], self.pending[limit:]
            return batch
        reader = self._reader
        batch = await reader.read(self.timing.ping_interval if wait is None else wait, limit)
        now = anyio.current_time()
        if reader.last_rx > self.last_rx:
            self.last_rx = reader.last_rx
        if batch:
            batch = [r for r in batch if isinstance(r, list)]  # drop PONGs
        await self.check_health(now)
        return batch

    def set_handler(self, handler: Callable[[list[Any]], bool] | None) -> None:
        """While the owning task waits in :meth:`read`, hand replies that arrive to
        ``handler`` synchronously (see :class:`saga_events._wire.Subscription`);
        None unsets it. A handler returning True wakes the task (``read`` returns)."""
        self._reader.set_handler(handler)

    async def barrier(self, limit: int = 100_000) -> list[Any]:
        """PING with a token and return every message Redis sent before its PONG.

        Redis answers commands in order, so once the PONG is read, every
        notification it queued for this connection before the PING is in the
        returned list. Raises TimeoutError after ``ping_timeout`` s.
        """
        token = secrets.token_hex(8).encode()
        await self.pubsub.ping(message=token)
        out, self.pending = self.pending, []
        with anyio.fail_after(self.timing.ping_timeout):
            while True:
                batch = await self._reader.read(self.timing.ping_interval, 1024)
                if self._reader.last_rx > self.last_rx:
                    self.last_rx = self._reader.last_rx
                for i, reply in enumerate(batch):
                    # RESP2 answers ["pong", token] on a subscribed connection; RESP3 the token.
                    if reply == token or (isinstance(reply, list) and reply[-1:] == [token]):
                        self.pending = [r for r in batch[i + 1 :] if isinstance(r, list)]
                        return out
                    if isinstance(reply, list):
                        out.append(reply)
                if len(out) > limit:
                    raise TimeoutError(f"barrier: over {limit} messages before the PONG")

    async def confirm_node(self) -> None:
        """Topology URLs (Sentinel): raise ConnectionError when the node this session
        is subscribed on is no longer the master (see ``_topology_pool``); no-op else."""
        conn = self.pubsub.connection
        confirm = getattr(conn, "confirm_role", None)
        if confirm is not None:
            await confirm()

    async def check_health(self, now: float | None = None) -> None:
        """Raise TimeoutError on a silent subscription; PING it when quiet; after a
        refresh of its topology (an error elsewhere), check that its node is still the
        master (Sentinel). On a Cluster, raise ConnectionError once its node no longer
        serves the registry's slot."""
        await _topology_pool.check_node(self.pubsub.connection)
        now = anyio.current_time() if now is None else now
        stale = getattr(self.pubsub.connection, "needs_confirmation", None)
        if stale is not None and stale():
            await self.confirm_node()
        t = self.timing
        if now - self.last_rx > t.ping_timeout:
            raise TimeoutError(f"subscription silent for {now - self.last_rx:.1f} s")
        if now - self._last_ping >= t.ping_interval and now - self.last_rx >= t.ping_interval:
            self._last_ping = now
            await self.pubsub.ping()


@asynccontextmanager
async def subscribe(
    client: aioredis.Redis,
    *,
    channels: Sequence[str] = (),
    patterns: Sequence[str] = (),
    timing: Timing = DEFAULT_TIMING,
) -> AsyncIterator[Subscription]:
    """Subscribe to ``channels`` and ``patterns`` and wait for every confirmation."""
    pubsub = client.pubsub()
    try:
        if patterns:
            await pubsub.psubscribe(*patterns)
        if channels:
            await pubsub.subscribe(*channels)
        sub = Subscription(pubsub, timing)
        wanted = len(set(patterns)) + len(set(channels))
        confirmed = 0
        with anyio.fail_after(timing.ping_timeout + 2):
            while confirmed < wanted:
                reply = await pubsub.parse_response(block=False, timeout=timing.ping_timeout)
                if reply is None:
                    raise TimeoutError("no subscription confirmation")
                if isinstance(reply, list) and reply[0] in _CONFIRMATIONS:
                    confirmed += 1
                elif isinstance(reply, list):
                    sub.pending.append(reply)
        sub.last_rx = anyio.current_time()
        await sub.confirm_node()
        yield sub
    finally:
        await close_quietly(pubsub)


@dataclass
class SessionStats:
    """What :func:`run_forever` saw."""

    sessions: int = 0
    transient_errors: int = 0
    refusals: int = 0
    crashes: int = 0  # a bug escaped the session (only with ``crash_only=True``)
    last_error: str | None = None


Session = Callable[[Callable[[], None]], Awaitable[None]]


async def run_forever(
    session: Session,
    *,
    name: str,
    timing: Timing = DEFAULT_TIMING,
    on_error: Callable[[BaseException], None] | None = None,
    stats: SessionStats | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    crash_only: bool = False,
) -> None:
    """Run ``session(healthy)`` forever; back off and retry whenever it ends or fails.

    Never returns; only cancellation leaves it. ``on_error`` is called with
    each failure (transient or a refusal) before the backoff sleep. With
    ``crash_only=True`` any other exception (a bug that escaped the session)
    is logged with its traceback, counted in ``stats.crashes``, passed to
    ``on_error`` and retried after the refusal backoff; without it, it raises.
    """
    stats = stats if stats is not None else SessionStats()
    outage = timing.backoff()
    refused = timing.refused_backoff()

    def healthy() -> None:
        outage.reset()
        refused.reset()

    while True:
        stats.sessions += 1
        backoff = outage
        try:
            await session(healthy)
        except TRANSIENT as exc:
            stats.transient_errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            if on_error is not None:
                on_error(exc)
        except RedisError as exc:  # NOPERM, READONLY, MOVED, ...: not ours to fix
            backoff = refused
            stats.refusals += 1
            error = f"{type(exc).__name__}: {exc}"
            if error != stats.last_error:  # once per distinct refusal, not every retry
                log.error("%s: Redis refused (%s); retrying with backoff", name, error)
            stats.last_error = error
            if on_error is not None:
                on_error(exc)
        except Exception as exc:
            if not crash_only:
                raise
            backoff = refused
            stats.crashes += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: the session failed (a bug); restarting it", name)
            if on_error is not None:
                on_error(exc)
        await sleep(backoff.next())


async def consume(
    client: aioredis.Redis,
    *,
    name: str,
    on_batch: Callable[[list[Any]], Awaitable[None]],
    channels: Sequence[str] = (),
    patterns: Sequence[str] = (),
    on_connect: Callable[[Subscription], Awaitable[None]] | None = None,
    timing: Timing = DEFAULT_TIMING,
    on_error: Callable[[BaseException], None] | None = None,
    stats: SessionStats | None = None,
    limit: int = 1024,
    crash_only: bool = False,
) -> None:
    """Follow ``channels``/``patterns`` forever, reconnecting with backoff.

    After each (re)subscription, ``on_connect(sub)`` runs first (messages that
    came meanwhile wait in ``sub.pending``, delivered next); the backoff resets
    once it returns. Each non-empty batch of raw replies goes to ``on_batch``,
    in order. Redis errors from the callbacks count as session failures:
    logged, passed to ``on_error``, retried after the backoff; other exceptions
    too with ``crash_only=True`` (see :func:`run_forever`). Only cancellation
    ends it.
    """

    async def session(healthy: Callable[[], None]) -> None:
        async with subscribe(client, channels=channels, patterns=patterns, timing=timing) as sub:
            if on_connect is not None:
                await on_connect(sub)
            healthy()
            while True:
                batch = await sub.read(limit=limit)
                if batch:
                    await on_batch(batch)

    await run_forever(
        session, name=name, timing=timing, on_error=on_error, stats=stats, crash_only=crash_only
    )
