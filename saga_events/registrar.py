"""The registrar: the only writer of registry keys.

It PSUBSCRIBEs to every service's events channel (``_intake``), validates
each event (``_admit``), applies it through the apply script
(``lua/apply.lua``, called through :mod:`saga_events.scripts`) that orders
events by ``(incarnation, seq)``, or, for an unchanged heartbeat, through the
touch script (``_touch``), reaps instances whose deadline passed, keeps the
keyspace notification flags set, and announces its own liveness once a
second (the mirrors' canary). Several registrars may run at once: the scripts
make applying an event idempotent and order-independent.

Contract: nothing a message contains ends the consume loop (a decode failure
is a counted rejection, and a crash-only safety net restarts the loop if a
bug escapes the per-message handling, counted in ``stats.loop_restarts``);
Redis outages, also at start, are retried forever. When it finds Redis empty
with no epoch, it restores its last view (``view``) before it declares the
rebuild ready, so mirrors never see a live instance vanish.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from anyio.abc import TaskStatus
from redis.exceptions import RedisError, ResponseError

from . import _intake, _touch, _wire, connection, identity, model, override_ends, scripts
from ._admit import Admission
from ._lifecycle import RunsInBackground
from ._redis import TRANSIENT, Backoff, RateLimitedLog, RedisLike, connect, now_ms
from .keys import Keys
from .notify import NotificationCheck, ensure_flags
from .rebuild import Rebuilds
from .scripts import ApplyResult

__all__ = ["ApplyResult", "Registrar", "RegistrarStats"]

log = logging.getLogger("saga_events.registrar")

#: A gap since the last reap by any registrar longer than
#: max(REAP_STALL_MS, 3 x reap_interval) is a stall (Redis paused, no registrar
#: running): overdue instances get REAP_GRACE_MS to heartbeat, once per stall.
REAP_STALL_MS: Final = 1000
REAP_GRACE_MS: Final = 10_000

View = Callable[[], Iterable[model.Instance]]


@dataclass
class RegistrarStats:
    """Counters of one registrar; read them for metrics."""

    received: int = 0
    applied: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    reaped: int = 0
    touched: int = 0  # heartbeats applied as a deadline touch (also counted refreshed)
    rebuilds: int = 0
    restored: int = 0
    flags_reapplied: int = 0
    reconnects: int = 0
    loop_restarts: int = 0


class Registrar(RunsInBackground):
    """Consume events, apply them to the registry, reap the dead.

    ``await tg.start(registrar.run)`` returns once the registrar is subscribed
    to the events channels; ``async with Registrar(...)`` does the same.
    Redis outages are survived, at start too: every loop reconnects with
    backoff. A user without ``CONFIG`` checks the notification flags instead
    of setting them (:mod:`saga_events.notify`): ``notifications_ok`` and
    ``notifications_reason``.

    ``view`` returns the instances the registry last held (a gateway's
    mirror); when not given the registrar runs a :class:`Mirror` of its own
    for it (``own_view=False``: no view, an empty restart restores nothing).
    ``lookup`` finds a record of that view by key (``View.get``); with it
    (and with the own view) unchanged heartbeats that carry ``since`` are
    applied as deadline touches (``_touch.py``).
    ``heartbeat_hold``: intake heartbeats that change nothing wait up to this
    many seconds to be applied with the next events (``_intake.py``; 0: never);
    a register, drain, leave or a heartbeat whose ``since`` is its seq (a
    change) is applied at once, after them. 30 ms: the deadline of a heartbeat
    sent every ttl/3 (ttl >= 1 s) moves that much later, and 100k heartbeating
    instances cost ~0.85x the registrar CPU of a 10 ms hold (BENCHMARKS.md).
    """

    def __init__(
        self,
        redis: RedisLike,
        *,
        namespace: str = "default",
        reap_interval: float = 0.1,
        liveness_interval: float = 1.0,
        config_check_interval: float = 5.0,
        manage_config: bool = True,
        url_schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES,
        batch_size: int = 512,
        rebuild_wait: float = 2.5,
        tomb_ttl_ms: int = scripts.TOMB_TTL_MS,
        rate_limit: float | None = 20.0,
        rate_burst: int = 60,
        service_rate_limit: float | None = 2_000.0,
        service_rate_burst: int = 4_000,
        max_instances_per_service: int = scripts.MAX_INSTANCES_PER_SERVICE,
        max_instances: int = scripts.MAX_INSTANCES,
        view: View | None = None,
        own_view: bool = True,
        heartbeat_hold: float = 0.03,
        lookup: _touch.Lookup | None = None,
    ) -> None:
        self._redis = connect(redis, namespace=namespace)  # a Cluster: the {ns} slot's owner
        self._owns_client = isinstance(redis, str)
        self.keys = Keys(namespace)
        self.rid = identity.process_service_id()  # <host>-<pid>-<hex>, as an agent's default id
        self.reap_interval = reap_interval
        self.liveness_interval = liveness_interval
        self.config_check_interval = config_check_interval
        self.manage_config = manage_config
        self.url_schemes = url_schemes
        self.batch_size = batch_size
        self.rebuild_wait = rebuild_wait
        self.tomb_ttl_ms = tomb_ttl_ms
        self.limits = scripts.Limits(tomb_ttl_ms, max_instances_per_service, max_instances)
        self.view = view
        self._own_view = own_view and view is None
        self._lookup = lookup if view is not None else None
        self.stats = RegistrarStats()
        self.started_ms = now_ms()
        self.subscribed = False
        self._intake_was_up = False
        self._rejections = RateLimitedLog(log)
        self._redis_refusals = RateLimitedLog(log, burst=5)
        self._scripts = scripts.Scripts(self._redis)
        self._admission = Admission(
            events_prefix=self.keys.events_prefix,
            url_schemes=url_schemes,
            stats=self.stats,
            rejections=self._rejections,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            service_rate_limit=service_rate_limit,
            service_rate_burst=service_rate_burst,
        )
        self._rebuilds = Rebuilds(self)
        self.heartbeat_hold = heartbeat_hold
        self._tg_for_rebuild: anyio.abc.TaskGroup | None = None
        # The connection the apply pipelines go out on (hand-packed, see _wire).
        self._pipe = _wire.Pipe(self._redis)
        self.notifications = NotificationCheck(self.keys, self.rid, manage=manage_config)

    @property
    def notifications_ok(self) -> bool | None:
        """Whether keyspace notifications flow (None until the first check)."""
        return self.notifications.ok

    @property
    def notifications_reason(self) -> str:
        """What is wrong with the notification flags ('' when nothing is)."""
        return self.notifications.reason

    # -- lifecycle ---------------------------------------------------------

    async def aclose(self) -> None:
        await self._pipe.release()
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled.

        ``task_status.started()`` once subscribed, however long Redis takes.
        """
        await self._prepare()
        try:
            async with anyio.create_task_group() as tg:
                self._tg_for_rebuild = tg
                ready = anyio.Event()
                if self._own_view:
                    tg.start_soon(self._run_own_view)
                tg.start_soon(self._consume_loop, ready)
                tg.start_soon(self._reap_loop)
                tg.start_soon(self._housekeeping_loop)
                await ready.wait()
                task_status.started()
        finally:
            await self._pipe.release()

    async def _run_own_view(self) -> None:
        from .mirror import Mirror  # here: the mirror is only this registrar's memory

        mirror = Mirror(self._redis, namespace=self.keys.ns)
        self.view = lambda: mirror.snapshot().values()
        self._lookup = mirror.view.get
        backoff = Backoff(cap=5.0)
        while True:
            try:
                await mirror.run()
            except Exception as exc:
                log.warning("registrar's own view stopped (%s); restarting it", exc)
            await anyio.sleep(backoff.next())

    async def _prepare(self) -> None:
        backoff = Backoff(cap=2.0)
        while True:
            try:
                await self.notifications.check(self._redis)
                await self._scripts.load()
                k = self.keys
                await self._scripts.call(
                    scripts.INIT_COUNTS, [k.index, scripts.counts_key(k)], [k.inst_prefix]
                )
                if self.notifications.ok:
                    await self._write_liveness()
                return
            except TRANSIENT as exc:
                log.warning("registrar cannot reach Redis (%s); retrying", exc)
                await anyio.sleep(backoff.next())
            except RedisError as exc:  # OOM, READONLY, LOADING, NOPERM…: say so, retry
                log.error("Redis refused the registrar's start-up (%s); retrying", exc)
                await anyio.sleep(backoff.next())

    # -- notification flags ------------------------------------------------

    async def ensure_notifications(self) -> bool:
        """Merge the required flags into ``notify-keyspace-events``; True if changed.

        Raises NotificationConfigError when this user may not CONFIG.
        """
        return await ensure_flags(self._redis)

    # -- applying events ---------------------------------------------------

    async def apply(self, event: model.AnyEvent, *, after_newest: bool = False) -> ApplyResult:
        """Apply one validated event now and return what the script did.

        ``after_newest=True`` is for writers without a sequence of their own
        (the HTTP gateway): when the instance is known, the event takes its
        stored incarnation and the next seq, so it is always the newest.
        """
        results = await self.apply_many([event], after_newest=after_newest)
        return results[0]

    async def apply_many(
        self, events: list[model.AnyEvent], *, after_newest: bool = False
    ) -> list[ApplyResult]:
        """Apply events in order in one pipeline (one round trip)."""
        replies = await self._apply_raw(events, after_newest)
        return [scripts.parse_apply(r) for r in replies]

    async def _apply_raw(
        self, events: list[model.AnyEvent], after_newest: bool = False
    ) -> list[list[Any]]:
        """Apply and count; the raw replies (the intake needs only their statuses)."""
        replies = await scripts.apply_raw(
            self._redis, self._pipe, self.keys, events, self.limits, after_newest=after_newest
        )
        self._count(events, replies)
        return replies

    def _count(self, events: list[model.AnyEvent], replies: list[list[Any]]) -> None:
        statuses = Counter(r[0] for r in replies)
        applied = self.stats.applied
        for status, count in statuses.items():
            applied[status.decode()] += count
        if b"capped" in statuses:
            for event, reply in zip(events, replies, strict=True):
                if reply[0] == b"capped":
                    self.stats.rejected["cap_refused"] += 1
                    self._rejections.warning(
                        "refused to create %s/%s (cap_refused): more than %d instances of the "
                        "service or %d in all",
                        event.service_name,
                        event.service_id,
                        self.limits.max_instances_per_service,
                        self.limits.max_instances,
                    )

    def validate(self, channel: bytes, data: bytes) -> model.AnyEvent | None:
        """Decode one message; count and log a rejection and return None if invalid.

        Never raises: whatever the message holds, the worst is a rejection.
        """
        return self._admission.validate(channel, data)

    # -- loops ---------------------------------------------------------------

    async def _consume_loop(self, ready: anyio.Event) -> None:
        reconnected = False

        async def on_connect(sub: connection.Subscription) -> None:
            nonlocal reconnected
            if reconnected:
                # Redis may have restarted: its flags and script cache are
                # gone, and it may be empty. Flags first, so that mirrors
                # are notified of the epoch the rebuild sets.
                await self._recheck_config()
                await self._scripts.load()
            self.subscribed = True
            self._intake_was_up = True
            ready.set()
            await self.check_epoch()
            reconnected = True

        def on_error(exc: BaseException) -> None:
            self.subscribed = False
            if isinstance(exc, (*TRANSIENT, RedisError)):
                # RedisError: a refused command (READONLY after a failover, OOM,
                # LOADING) must not take the registrar down: start over.
                self.stats.reconnects += 1
                log.warning("registrar lost its subscription (%s); reconnecting", exc)
            else:
                # The crash-only safety net: a bug that escaped the per-message
                # handling restarts the loop (connection.run_forever logs it);
                # it never ends the registrar.
                self.stats.loop_restarts += 1

        try:
            await _intake.consume(
                self._redis,
                patterns=(self.keys.events_pattern,),
                decode=self._admission.decode_batch,
                apply=self._apply_intake,
                hold=self.heartbeat_hold,
                batch=self.batch_size,
                on_connect=on_connect,
                on_error=on_error,
                timing=connection.REGISTRAR_TIMING,
            )
        finally:
            self.subscribed = False

    async def _apply_intake(self, events: list[Any]) -> None:
        todo = events
        try:
            if self._lookup is not None:  # unchanged heartbeats touch (_touch.py)
                done = await _touch.apply(
                    self._redis, self._pipe, self.keys, events, self.limits, self._lookup
                )
                self._count(done.full, done.replies)
                self.stats.touched += done.touched
                for status, n in (("refreshed", done.touched), ("stale", done.stale)):
                    if n:  # no zero entries: callers compare applied with a dict
                        self.stats.applied[status] += n
                todo = done.absent  # removed (leave, reaper) or lost: apply in full
            if todo:
                await self._apply_raw(todo)
        except ResponseError as exc:
            # Redis refused the writes (OOM, READONLY): these events are lost,
            # the agents' next heartbeats carry the same records again.
            self.stats.rejected["redis_refused"] += len(todo)
            self._redis_refusals.warning(
                "Redis refused %d events (%s); the next heartbeats retry them",
                len(todo),
                exc,
            )

    async def _reap_loop(self) -> None:
        backoff = Backoff()
        paused = False
        while True:
            if not self.subscribed and self._intake_was_up:
                # No intake, no heartbeats (a failover): reaping now would remove
                # live instances. The mark ages meanwhile: the first reap after the
                # resubscription is a stall, which grants grace (lua/reap.lua).
                # Before the first subscription the reaper runs: a start is not a
                # pause, and the mark must exist before any pause.
                paused = True
                await anyio.sleep(self.reap_interval)
                continue
            try:
                if paused:
                    # The first reap after the intake was down is a stall however
                    # short the pause (heartbeats were not applied meanwhile), and
                    # an instance graced just before it could not heartbeat during
                    # it either, so this stall may grace it again.
                    await self._redis.delete(scripts.graced_key(self.keys))
                    await self.reap(stall_ms=0)
                    paused = False
                else:
                    await self.reap()
                backoff.reset()
                await anyio.sleep(self.reap_interval)
            except TRANSIENT as exc:
                log.debug("reaper: %s", exc)
                await anyio.sleep(backoff.next())
            except RedisError as exc:
                self._redis_refusals.warning("reaper: Redis refused (%s)", exc)
                await anyio.sleep(backoff.next())

    async def reap(self, limit: int = 1000, *, stall_ms: int | None = None) -> int:
        """Remove the instances whose deadline has passed (Redis clock); return how many.

        ``stall_ms``: a gap since the last reap longer than this is a stall (default
        max(REAP_STALL_MS, 3 x reap_interval)); 0 makes this reap a stall."""
        k = self.keys
        if stall_ms is None:
            stall_ms = max(REAP_STALL_MS, round(3000 * self.reap_interval))
        total = 0
        while True:
            keys, args = scripts.reap_call(k, limit, stall_ms, REAP_GRACE_MS, self.tomb_ttl_ms)
            due: list[bytes] = await self._scripts.call(scripts.REAP, keys, args)
            total += len(due)
            self.stats.reaped += len(due)
            if len(due) < limit:
                return total

    async def _housekeeping_loop(self) -> None:
        last_config_check = anyio.current_time()
        while True:
            await anyio.sleep(self.liveness_interval)
            try:
                # No canary while notifications are off: mirrors go stale.
                if self.notifications.ok:
                    await self._write_liveness()
                await self.check_epoch()
                await self._end_expired_drains()
                now = anyio.current_time()
                if now - last_config_check >= self.config_check_interval:
                    last_config_check = now
                    await self._recheck_config()
            except TRANSIENT as exc:
                log.debug("housekeeping: %s", exc)
            except RedisError as exc:
                self._redis_refusals.warning("housekeeping: Redis refused (%s)", exc)

    async def _end_expired_drains(self) -> None:
        # Timed operator drains end on time, not at the next heartbeat (override_ends.py).
        await override_ends.end_expired(self, self._redis)

    async def _recheck_config(self) -> None:
        if await self.notifications.check(self._redis):
            # Notifications were off for a while: mirrors must resync over the gap.
            self.stats.flags_reapplied += 1
            await self.bump_epoch()

    async def _write_liveness(self) -> None:
        info = {
            "rid": self.rid,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_ms": self.started_ms,
        }
        ttl = int(self.liveness_interval * 3000)
        await self._redis.set(self.keys.registrar(self.rid), model.encode(info), px=ttl)

    # -- epochs and rebuilds (rebuild.py) ------------------------------------

    async def bump_epoch(self) -> str | None:
        """Tell mirrors to resync (see :meth:`Rebuilds.bump_epoch`)."""
        return await self._rebuilds.bump_epoch()

    async def check_epoch(self) -> None:
        """Start a rebuild if Redis has no epoch (first start, or restarted empty)."""
        if self._tg_for_rebuild is not None:
            await self._rebuilds.check(self._tg_for_rebuild)

    async def _finish_abandoned_rebuild(self, current: bytes | str) -> None:
        await self._rebuilds.finish_abandoned(current)

    async def restore(self, instances: Iterable[model.Instance]) -> int:
        """Write back each instance that Redis does not hold; return how many."""
        return await self._rebuilds.restore(instances)
