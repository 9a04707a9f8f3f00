"""The registrar: the only writer of registry keys.

It PSUBSCRIBEs to every service's events channel, validates each event,
applies it through one Lua script that orders events by ``(incarnation,
seq)``, reaps instances whose deadline passed, keeps the keyspace
notification flags set, and announces its own liveness once a second (the
mirrors' canary). Several registrars may run at once: the script makes
applying an event idempotent and order-independent.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.exceptions import NoScriptError, RedisError, ResponseError

from . import _wire, model
from ._ratelimit import TokenBuckets
from ._redis import TRANSIENT, Backoff, RateLimitedLog, RedisLike, close_quietly, connect, now_ms
from .errors import InvalidEvent
from .keys import Keys
from .notify import NotificationCheck, ensure_flags

log = logging.getLogger("saga_events.registrar")

APPLY_LUA: Final = r"""
-- KEYS: record, tombstone, index, deadlines, order
-- ARGV: kind ('announce'|'leave'), incarnation, seq, body (record JSON without
--       its leading '{'), ttl_ms, backstop_ms, tomb_ttl_ms, next ('1': ignore the
--       given incarnation and seq when something is stored and use the stored
--       incarnation with the next seq: for writers without their own sequence)
-- Replies {status, registered_at_ms, now_ms, incarnation, seq}.
-- The newest (incarnation, seq) applied to an instance lives in the order hash
-- (or, after a leave, in the tombstone): an event not newer than it changes
-- nothing. The record keeps the (incarnation, seq) of its last change.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nows = string.format('%.0f', now)
local inc = tonumber(ARGV[2])
local seq = tonumber(ARGV[3])
local incs, seqs = ARGV[2], ARGV[3]
local function pair(s)
  if not s then return nil, nil end
  local i, q = string.match(s, '^(%d+):(%d+)$')
  if not i then return nil, nil end
  return tonumber(i), tonumber(q)
end
-- -1: older than (i, q); 0: the same; 1: newer
local function cmp(i, q)
  if inc ~= i then return inc < i and -1 or 1 end
  if seq ~= q then return seq < q and -1 or 1 end
  return 0
end
local ti, ts = pair(redis.call('GET', KEYS[2]))
if ti and cmp(ti, ts) <= 0 then
  return {'stale', '0', nows, incs, seqs}
end
local cur = redis.call('GET', KEYS[1])
local ci, cs, creg, crest
if cur then
  ci, cs, creg, crest = string.match(cur,
    '^{"incarnation":(%d+),"seq":(%d+),"registered_at_ms":(%d+),(.*)$')
end
if ci then
  ci = tonumber(ci)
  cs = tonumber(cs)
end
local oi, oq = pair(redis.call('HGET', KEYS[5], KEYS[1]))
if not oi and ci then
  oi, oq = ci, cs
end
if ARGV[8] == '1' and oi then
  inc, seq = oi, oq + 1
  incs, seqs = string.format('%.0f', inc), string.format('%.0f', seq)
end
local order = oi and cmp(oi, oq) or 1
if ARGV[1] == 'leave' then
  if order <= 0 then
    return {'stale', creg or '0', nows, incs, seqs}
  end
  redis.call('SET', KEYS[2], incs .. ':' .. seqs, 'PX', ARGV[7])
  redis.call('HDEL', KEYS[5], KEYS[1])
  if cur then
    redis.call('DEL', KEYS[1])
    redis.call('SREM', KEYS[3], KEYS[1])
    redis.call('ZREM', KEYS[4], KEYS[1])
    return {'removed', creg or '0', nows, incs, seqs}
  end
  return {'absent', '0', nows, incs, seqs}
end
if order < 0 then
  return {'stale', creg or '0', nows, incs, seqs}
end
local ttl = tonumber(ARGV[5])
if ci and inc == ci and crest == ARGV[4] then
  -- Unchanged record (a heartbeat, or a duplicate): move the deadline only;
  -- mirrors see nothing.
  redis.call('ZADD', KEYS[4], now + ttl, KEYS[1])
  if order > 0 then
    redis.call('HSET', KEYS[5], KEYS[1], incs .. ':' .. seqs)
  end
  local backstop = tonumber(ARGV[6])
  if redis.call('PTTL', KEYS[1]) < backstop / 2 then
    redis.call('PEXPIRE', KEYS[1], backstop)
  end
  return {'refreshed', creg, nows, incs, seqs}
end
if order == 0 then
  return {'stale', creg or '0', nows, incs, seqs}  -- same (incarnation, seq), other record
end
local reg = nows
if ci and inc == ci then
  reg = creg
end
redis.call('SET', KEYS[1],
  '{"incarnation":' .. incs .. ',"seq":' .. seqs .. ',"registered_at_ms":' .. reg
  .. ',' .. ARGV[4], 'PX', ARGV[6])
redis.call('HSET', KEYS[5], KEYS[1], incs .. ':' .. seqs)
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('ZADD', KEYS[4], now + ttl, KEYS[1])
if cur then
  return {'updated', reg, nows, incs, seqs}
end
return {'created', reg, nows, incs, seqs}
"""

#: A reaper that finds no reap by any registrar for this long (a paused Redis,
#: no registrar running) gives overdue instances REAP_GRACE_MS to heartbeat.
REAP_STALL_MS: Final = 1000
REAP_GRACE_MS: Final = 10_000

REAP_LUA: Final = r"""
-- KEYS: deadlines, index, order, reaper mark; ARGV: limit, stall_ms, grace_ms
-- Touches the record keys named by the deadlines set: sound in Redis Cluster
-- only because every registry key shares the {ns} hash tag.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- A gap since the last reap by any registrar (Redis was paused, or no
-- registrar ran) means heartbeats sent meanwhile have not landed yet: give
-- every overdue instance a grace period instead of reaping the live with the
-- dead. Found by the chaos suite (a 5 s SIGSTOP of Redis reaped them all).
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
redis.call('SET', KEYS[4], string.format('%.0f', now), 'PX', 86400000)
if last > 0 and now - last > tonumber(ARGV[2]) then
  local overdue = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  local grace = now + tonumber(ARGV[3])
  for i = 1, #overdue, 500 do
    local args = {}
    for j = i, math.min(i + 499, #overdue) do
      args[#args + 1] = grace
      args[#args + 1] = overdue[j]
    end
    redis.call('ZADD', KEYS[1], 'XX', unpack(args))
  end
  return {}
end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, k in ipairs(due) do
  redis.call('DEL', k)
  redis.call('SREM', KEYS[2], k)
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
  redis.call('HDEL', KEYS[3], unpack(due))
end
return due
"""

FINISH_REBUILD_LUA: Final = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Replace a 'ready' epoch; leave a missing one (that calls for a rebuild) and a
# 'rebuilding' one (its rebuild ends with a new epoch anyway) alone: a mirror that
# saw 'ready' in the middle of a rebuild would resync to a registry not yet rebuilt.
BUMP_EPOCH_LUA: Final = r"""
local current = redis.call('GET', KEYS[1])
if not current or string.sub(current, -11) == ':rebuilding' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What the apply script did with one event.

    ``status`` is one of ``created``, ``updated``, ``refreshed`` (deadline
    moved, record unchanged), ``removed``, ``absent`` (leave of an unknown
    instance, tombstone written) or ``stale`` (not newer than what is stored).
    ``incarnation`` and ``seq`` are the ordering it was applied with (see
    ``Registrar.apply``'s ``after_newest``).
    """

    status: str
    registered_at_ms: int
    now_ms: int
    incarnation: int = 0
    seq: int = 0


@dataclass
class RegistrarStats:
    """Counters of one registrar; read them for metrics."""

    received: int = 0
    applied: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    reaped: int = 0
    rebuilds: int = 0
    flags_reapplied: int = 0
    reconnects: int = 0


def _announce_args(event: model.Announce) -> bytes:
    return model.encode(model.body_of(event))[1:]


class Registrar:
    """Consume events, apply them to the registry, reap the dead.

    ``await tg.start(registrar.run)`` returns once the registrar is subscribed
    to the events channels; ``async with Registrar(...)`` does the same.
    Redis outages are survived: every loop reconnects with backoff. A user
    without ``CONFIG`` checks the notification flags instead of setting them
    (:mod:`saga_events.notify`): ``notifications_ok`` and ``notifications_reason``.
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
        tomb_ttl_ms: int = 600_000,
        rate_limit: float | None = 20.0,
        rate_burst: int = 60,
    ) -> None:
        self._redis = connect(redis)
        self._owns_client = isinstance(redis, str)
        self.keys = Keys(namespace)
        self.rid = f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"
        self.reap_interval = reap_interval
        self.liveness_interval = liveness_interval
        self.config_check_interval = config_check_interval
        self.manage_config = manage_config
        self.url_schemes = url_schemes
        self.batch_size = batch_size
        self.rebuild_wait = rebuild_wait
        self.tomb_ttl_ms = tomb_ttl_ms
        self.stats = RegistrarStats()
        self.started_ms = now_ms()
        self.subscribed = False
        self._rejections = RateLimitedLog(log)
        self._redis_refusals = RateLimitedLog(log, burst=5)
        # Per-instance flood guard (events/s and burst); None turns it off.
        self._buckets = TokenBuckets(rate_limit, rate_burst) if rate_limit else None
        self._apply_sha: str | None = None
        self._reap_sha: str | None = None
        self._rebuilding = False
        self._tg: anyio.abc.TaskGroup | None = None
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

    async def __aenter__(self) -> Registrar:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._tg.start(self.run)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self._pipe.release()
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        await self._prepare()
        try:
            async with anyio.create_task_group() as tg:
                self._tg_for_rebuild = tg
                ready = anyio.Event()
                tg.start_soon(self._consume_loop, ready)
                tg.start_soon(self._reap_loop)
                tg.start_soon(self._housekeeping_loop)
                with anyio.fail_after(30):
                    await ready.wait()
                task_status.started()
        finally:
            await self._pipe.release()

    async def _prepare(self) -> None:
        backoff = Backoff(cap=2.0)
        while True:
            try:
                await self.notifications.check(self._redis)
                await self._load_scripts()
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

    async def _load_scripts(self) -> None:
        self._apply_sha = await self._redis.script_load(APPLY_LUA)
        self._reap_sha = await self._redis.script_load(REAP_LUA)

    def _apply_call(self, event: model.AnyEvent, after_newest: bool = False) -> tuple[Any, ...]:
        k = self.keys
        name, sid = event.service_name, event.service_id
        if isinstance(event, model.Leave):
            kind, body, ttl = "leave", b"", 0
        else:
            kind, body, ttl = "announce", _announce_args(event), event.ttl_ms
        backstop = max(10 * ttl, 600_000)
        tomb_ttl = max(self.tomb_ttl_ms, 3 * ttl)
        return (
            "EVALSHA",
            self._apply_sha,
            5,
            k.inst(name, sid),
            k.tomb(name, sid),
            k.index,
            k.deadlines,
            k.order,
            kind,
            event.incarnation,
            event.seq,
            body,
            ttl,
            backstop,
            tomb_ttl,
            "1" if after_newest else "0",
        )

    @staticmethod
    def _result(reply: Any) -> ApplyResult:
        status, reg, now, inc, seq = reply
        return ApplyResult(
            status.decode() if isinstance(status, bytes) else str(status),
            int(reg),
            int(now),
            int(inc),
            int(seq),
        )

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
        if not events:
            return []
        if self._apply_sha is None:
            await self._load_scripts()
        pack = _wire.pack_command
        for _attempt in range(2):
            packed = b"".join([pack(self._apply_call(event, after_newest)) for event in events])
            replies = await self._pipe.execute(packed, len(events))
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted and lost its script cache: nothing was applied.
                await self._load_scripts()
                continue
            for r in replies:
                if isinstance(r, Exception):
                    raise r
            results = [self._result(r) for r in replies]
            for res in results:
                self.stats.applied[res.status] += 1
            return results
        raise NoScriptError("apply script could not be loaded")

    def validate(self, channel: bytes, data: bytes) -> model.AnyEvent | None:
        """Decode one message; count and log a rejection and return None if invalid."""
        prefix = self.keys.events_prefix.encode()
        service = channel[len(prefix) :].decode("utf-8", "replace")
        try:
            return model.decode_event(data, service, schemes=self.url_schemes)
        except InvalidEvent as exc:
            self.stats.rejected[exc.reason] += 1
            self._rejections.warning(
                "rejected event on %s (%s): %s",
                channel.decode("utf-8", "replace")[:200],
                exc.reason,
                exc.detail[:300],
            )
            return None

    def _within_rate(self, event: model.AnyEvent) -> bool:
        if self._buckets is None or self._buckets.allow((event.service_name, event.service_id)):
            return True
        self.stats.rejected["rate_limited"] += 1
        self._rejections.warning(
            "rejected event of %s/%s (rate_limited): more than %s events/s (burst %s)",
            event.service_name,
            event.service_id,
            self._buckets.rate,
            self._buckets.burst,
        )
        return False

    # -- loops ---------------------------------------------------------------

    async def _consume_loop(self, ready: anyio.Event) -> None:
        backoff = Backoff()
        reconnected = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(self.keys.events_pattern)
                while True:  # the psubscribe confirmation
                    reply = await pubsub.parse_response(block=False, timeout=5.0)
                    if reply is None:
                        raise TimeoutError("no PSUBSCRIBE confirmation")
                    if reply[0] == b"psubscribe":
                        break
                if reconnected:
                    # Redis may have restarted: its flags and script cache are
                    # gone, and it may be empty. Flags first, so that mirrors
                    # are notified of the epoch the rebuild sets.
                    await self._recheck_config()
                    await self._load_scripts()
                self.subscribed = True
                ready.set()
                backoff.reset()
                await self.check_epoch()
                reconnected = True
                await self._consume(pubsub)
            except (*TRANSIENT, RedisError) as exc:
                # RedisError: a refused command (READONLY after a failover, OOM,
                # LOADING) must not take the registrar down: start over.
                self.subscribed = False
                self.stats.reconnects += 1
                log.warning("registrar lost its subscription (%s); reconnecting", exc)
            finally:
                self.subscribed = False
                await close_quietly(pubsub)
            await anyio.sleep(backoff.next())

    async def _consume(self, pubsub: aioredis.client.PubSub) -> None:
        subscription = _wire.Subscription(pubsub)
        last_rx = anyio.current_time()
        last_ping = last_rx
        while True:
            batch = await subscription.read(1.0, self.batch_size)
            now = anyio.current_time()
            if not batch:
                if now - last_rx > 10.0:
                    raise TimeoutError("events subscription silent for 10 s")
                if now - last_ping > 3.0:
                    await pubsub.ping()
                    last_ping = now
                continue
            last_rx = now
            await self._process(batch)

    async def _process(self, batch: list[Any]) -> None:
        events: list[model.AnyEvent] = []
        for reply in batch:
            if not isinstance(reply, list) or len(reply) != 4 or reply[0] != b"pmessage":
                continue  # pong and subscription replies
            self.stats.received += 1
            event = self.validate(reply[2], reply[3])
            if event is not None and self._within_rate(event):
                events.append(event)
        if events:
            try:
                await self.apply_many(events)
            except ResponseError as exc:
                # Redis refused the writes (OOM, READONLY): these events are lost,
                # the agents' next heartbeats carry the same records again.
                self.stats.rejected["redis_refused"] += len(events)
                self._redis_refusals.warning(
                    "Redis refused %d events (%s); the next heartbeats retry them",
                    len(events),
                    exc,
                )

    async def _reap_loop(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.reap()
                backoff.reset()
                await anyio.sleep(self.reap_interval)
            except TRANSIENT as exc:
                log.debug("reaper: %s", exc)
                await anyio.sleep(backoff.next())
            except NoScriptError:
                await self._safe_reload()
            except RedisError as exc:
                self._redis_refusals.warning("reaper: Redis refused (%s)", exc)
                await anyio.sleep(backoff.next())

    async def reap(self, limit: int = 1000) -> int:
        """Remove the instances whose deadline has passed (Redis clock); return how many."""
        if self._reap_sha is None:
            await self._load_scripts()
        total = 0
        while True:
            assert self._reap_sha is not None
            due: list[bytes] = await self._redis.evalsha(
                self._reap_sha, 4, self.keys.deadlines, self.keys.index, self.keys.order,
                self.keys.prefix + "reaper", str(limit), REAP_STALL_MS, REAP_GRACE_MS,
            )  # fmt: skip
            total += len(due)
            self.stats.reaped += len(due)
            if len(due) < limit:
                return total

    async def _safe_reload(self) -> None:
        try:
            await self._load_scripts()
        except (*TRANSIENT, RedisError):
            pass

    async def _housekeeping_loop(self) -> None:
        last_config_check = anyio.current_time()
        while True:
            await anyio.sleep(self.liveness_interval)
            try:
                # No canary while notifications are off: mirrors go stale.
                if self.notifications.ok:
                    await self._write_liveness()
                await self.check_epoch()
                now = anyio.current_time()
                if now - last_config_check >= self.config_check_interval:
                    last_config_check = now
                    await self._recheck_config()
            except TRANSIENT as exc:
                log.debug("housekeeping: %s", exc)
            except RedisError as exc:
                self._redis_refusals.warning("housekeeping: Redis refused (%s)", exc)

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

    # -- epochs and rebuilds -------------------------------------------------

    async def bump_epoch(self) -> str | None:
        """Tell mirrors to resync: replace the epoch by a new one in state ``ready``.

        Does nothing (returns None) when there is no epoch: that calls for a
        rebuild (:meth:`check_epoch`), not a resync; nor during a rebuild, which
        ends with a new epoch of its own.
        """
        value = f"{now_ms()}-{secrets.token_hex(4)}:ready"
        if await self._redis.eval(BUMP_EPOCH_LUA, 1, self.keys.epoch, value):
            return value
        return None

    async def check_epoch(self) -> None:
        """Start a rebuild if Redis has no epoch (first start, or restarted empty)."""
        if self._rebuilding or self._tg_for_rebuild is None:
            return
        current = await self._redis.get(self.keys.epoch)
        if current is not None:
            await self._finish_abandoned_rebuild(current)
            return
        epoch = f"{now_ms()}-{secrets.token_hex(4)}"
        if not await self._redis.set(self.keys.epoch, f"{epoch}:rebuilding", nx=True):
            return  # another registrar leads this rebuild
        self._rebuilding = True
        self.stats.rebuilds += 1
        log.info(
            "registry has no epoch (a new or restarted Redis): rebuild %s asks agents to "
            "re-announce",
            epoch,
        )
        self._tg_for_rebuild.start_soon(self._finish_rebuild, epoch)

    _tg_for_rebuild: anyio.abc.TaskGroup | None = None

    async def _finish_abandoned_rebuild(self, current: bytes | str) -> None:
        # A registrar that died mid-rebuild leaves the epoch in 'rebuilding' and
        # mirrors waiting: whoever sees it long after its start finishes it.
        text = current.decode("ascii", "replace") if isinstance(current, bytes) else current
        epoch, _, state = text.partition(":")
        if state != "rebuilding":
            return
        started = epoch.partition("-")[0]
        if started.isdigit() and now_ms() - int(started) > 4000 * self.rebuild_wait:
            await self._redis.set(self.keys.epoch, f"{epoch}:ready")
            log.warning("finished rebuild %s that its registrar abandoned", epoch)

    async def _finish_rebuild(self, epoch: str) -> None:
        # Retried until done or superseded: given up, the re-announce request
        # would be lost and mirrors would wait stale for the abandoned-rebuild
        # timeout (4 x rebuild_wait).
        backoff = Backoff(cap=1.0)
        try:
            while True:
                try:
                    current = await self._redis.get(self.keys.epoch)
                    if isinstance(current, bytes):
                        current = current.decode("ascii", "replace")
                    if current != f"{epoch}:rebuilding":
                        log.warning("rebuild %s superseded (Redis changed under it)", epoch)
                        return
                    receivers = await self._redis.publish(self.keys.control, b"reannounce")
                    log.info("asked %d agents to re-announce", receivers)
                    await anyio.sleep(self.rebuild_wait)
                    # Only if the epoch is still ours: Redis may have restarted meanwhile.
                    done = await self._redis.eval(
                        FINISH_REBUILD_LUA, 1, self.keys.epoch, f"{epoch}:rebuilding",
                        f"{epoch}:ready",
                    )  # fmt: skip
                    if done:
                        log.info("rebuild %s done", epoch)
                    else:
                        log.warning("rebuild %s superseded (Redis changed under it)", epoch)
                    return
                except (*TRANSIENT, RedisError) as exc:
                    log.warning("rebuild %s interrupted (%s); retrying", epoch, exc)
                    await anyio.sleep(backoff.next())
        finally:
            self._rebuilding = False
