"""The end of an operator's drain with a duration: shown at once, not at the next heartbeat.

One job: keep the schedule of timed drains (a sorted set
``saga:{ns}:override_ends``, member ``[service, id]`` as JSON, score the end
in Redis's clock, ms) and, for each drain whose end has passed, re-apply the
instance's record so that it no longer carries the override. It also holds
:func:`reapply`, the one way to re-announce a stored record (used by
:mod:`saga_events.drain` too).

Contract:

* :func:`schedule` is called by :func:`saga_events.drain.drain` with the end
  (or None: a drain without duration takes the instance off the schedule);
  :func:`unschedule` by ``undrain``.
* :func:`end_expired` runs in each registrar's housekeeping loop (every
  ``liveness_interval``, 1 s by default): for each due entry whose override
  key is gone (Redis expired it: ``PX`` of the duration), the record is
  re-applied with the next seq (rev incremented, mirrors see the change), so
  ``ls``, the REST API and ``pick()`` show the end within about one
  ``liveness_interval`` plus propagation, without any heartbeat. An entry
  whose key still stands with a TTL waits for the next round; one whose key
  has no TTL (drained again without a duration) or whose record is gone
  (left, reaped) is dropped. Each round handles at most ``limit`` entries.
  Two registrars may end the same drain: the second re-apply is an unchanged
  record (a refresh, no record change).
* :func:`restore_overrides` (a rebuild after an empty restart, next to the
  records' restore) writes back the override keys of the registrar's last
  view (``NX``; the time left of a duration; an ended one is skipped) and
  re-applies those records, so that an operator's drain survives the loss
  of Redis's data as the records do.
* No writes happen when nothing is due: one ``TIME`` and one
  ``ZRANGEBYSCORE`` per round.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import anyio
import msgspec
from redis.exceptions import RedisError

from . import model
from ._redis import TRANSIENT
from .keys import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .registrar import Registrar

log = logging.getLogger("saga_events.registrar")

REAPPLY_RETRIES: Final = 8
_member_decoder: Final = msgspec.json.Decoder(tuple[str, str])


class OverrideKey(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON of an override key (the record's :class:`model.DrainOverride` without
    ``self_draining``, which the apply script adds)."""

    by: str
    reason: str = ""
    at_ms: int = 0
    until_ms: int | None = None


def ends_key(keys: Keys) -> str:
    """The sorted set of timed drains: member ``[service, id]``, score the end (ms)."""
    return f"{keys.prefix}override_ends"


def _member(name: str, sid: str) -> bytes:
    return model.encode([name, sid])


async def redis_ms(redis: Redis) -> int:
    """Redis's clock, in ms (the clock of the override key's ``PX``)."""
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


async def schedule(redis: Redis, keys: Keys, name: str, sid: str, end_ms: int | None) -> None:
    """Note the end of a drain (None: the drain has none)."""
    if end_ms is None:
        await redis.zrem(ends_key(keys), _member(name, sid))
    else:
        await redis.zadd(ends_key(keys), {_member(name, sid): end_ms})


async def unschedule(redis: Redis, keys: Keys, name: str, sid: str) -> None:
    await redis.zrem(ends_key(keys), _member(name, sid))


async def reapply(registrar: Registrar, redis: Redis, name: str, sid: str) -> bool:
    """Announce the stored record of ``name/sid`` again (its own body, next seq): the
    apply script adds or drops the override as its key says. False when another
    writer kept winning the race (a stale result each time); True otherwise,
    including when there is no record (left or reaped: nothing to do)."""
    key = registrar.keys.inst(name, sid)
    for attempt in range(REAPPLY_RETRIES):
        if attempt:
            await anyio.sleep(random.uniform(0, 0.002 * attempt))
        raw = await redis.get(key)
        if raw is None:
            return True
        try:
            stored = model.decode_instance(raw)
        except msgspec.DecodeError:
            return True  # unreadable: the instance's own next announce replaces it
        # A record that drained itself stays draining: its own word, not the override's.
        cls = model.Drain if stored.self_draining else model.Heartbeat
        event: model.Drain | model.Heartbeat = cls(
            service_name=name,
            service_id=sid,
            incarnation=stored.incarnation,
            seq=stored.seq + 1,
            service_url=stored.service_url,
            capabilities=stored.capabilities,
            metadata=stored.metadata,
            ttl_ms=stored.ttl_ms,
        )
        result = await registrar.apply(event, after_newest=True)
        if result.status == "created":  # removed between the read and the apply
            await registrar.apply(
                model.Leave(
                    service_name=name,
                    service_id=sid,
                    incarnation=result.incarnation,
                    seq=result.seq + 1,
                )
            )
            return True
        if result.status != "stale":
            return True
    return False


async def end_expired(registrar: Registrar, redis: Redis, limit: int = 100) -> int:
    """End the timed drains whose end has passed; return how many records were re-applied."""
    keys = registrar.keys
    zkey = ends_key(keys)
    now = await redis_ms(redis)
    due: list[Any] = await redis.zrangebyscore(zkey, "-inf", now, start=0, num=limit)
    ended = 0
    for member in due:
        try:
            name, sid = _member_decoder.decode(member)
        except msgspec.MsgspecError:
            await redis.zrem(zkey, member)  # not ours: drop it
            continue
        pttl = await redis.pttl(keys.override(name, sid))
        if pttl > 0:
            continue  # not expired yet (ms rounding): the next round
        if pttl == -2 and not await _reapply_logged(registrar, redis, name, sid):
            continue  # kept losing the race: the next round
        if pttl == -2:
            ended += 1
        # Taken off unless a new drain rescheduled it meanwhile.
        score = await redis.zscore(zkey, member)
        if score is not None and score <= now:
            await redis.zrem(zkey, member)
    return ended


async def restore_overrides(
    registrar: Registrar, redis: Redis, instances: Iterable[model.Instance]
) -> int:
    """Write back the overrides of ``instances`` (a registrar's last view) where Redis
    has none, and re-apply their records; return how many were written."""
    keys = registrar.keys
    now = await redis_ms(redis)
    restored = 0
    for inst in instances:
        ov = inst.override
        if ov is None or (ov.until_ms is not None and ov.until_ms <= now):
            continue
        name, sid = inst.service_name, inst.service_id
        raw = model.encode(
            OverrideKey(by=ov.by, reason=ov.reason, at_ms=ov.at_ms, until_ms=ov.until_ms)
        )
        px = ov.until_ms - now if ov.until_ms is not None else None
        if await redis.set(keys.override(name, sid), raw, px=px, nx=True):
            restored += 1
            await schedule(redis, keys, name, sid, ov.until_ms)
        await _reapply_logged(registrar, redis, name, sid)
    return restored


async def _reapply_logged(registrar: Registrar, redis: Redis, name: str, sid: str) -> bool:
    """:func:`reapply` for the registrar's background work: Redis trouble propagates (its
    loops retry), anything else (a bug) is logged and the entry given up, never raised
    into the registrar's task group."""
    try:
        return await reapply(registrar, redis, name, sid)
    except (*TRANSIENT, RedisError):
        raise
    except Exception:
        log.exception("re-applying %s/%s for an operator's drain failed", name, sid)
        return True
