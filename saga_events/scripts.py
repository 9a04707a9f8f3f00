"""The registrar's Lua scripts: loading, calling, and the one apply path.

Contract:

* Each script lives in ``saga_events/lua/<job>.lua`` (package data) with a
  header that states its KEYS, ARGV and reply. :class:`Script` reads it once
  and knows its SHA-1 without asking Redis.
* :class:`Scripts` calls a script by EVALSHA and, on ``NOSCRIPT`` (Redis
  restarted and lost its script cache), loads it and calls again: a NOSCRIPT
  reply means nothing ran.
* :func:`touch_call` builds the touch script's command (``lua/touch.lua``:
  the deadlines of unchanged instances, chosen by ``_touch``).
* :func:`apply_batch_call` builds the apply script's command for a batch of
  validated events (one script call applies them in order) and
  :func:`parse_batch` reads its reply; :func:`apply_many` sends any number
  of events as one hand-packed pipeline (``_wire``) of such calls, at most
  :data:`BATCH_EVENTS` events each. The registrar's
  pub/sub intake and the HTTP gateway (through ``Registrar.apply``) both go
  through :func:`apply_many`: one implementation of applying an event.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from . import _wire, model
from .keys import Keys

#: A record's backstop PX is max(10 x ttl, BACKSTOP_MIN_MS), refreshed by an
#: unchanged heartbeat when less than half is left: at most one ``expire``
#: notification per instance per hour.
BACKSTOP_MIN_MS: Final = 2 * 3_600_000
#: Least life of a tombstone; it lives max(this, 3 x ttl).
TOMB_TTL_MS: Final = 600_000
#: Life of the marker a leave for an unknown instance leaves (see apply.lua).
UNKNOWN_LEAVE_MS: Final = 30_000
#: Default caps on the registry's size, enforced by the apply script on creation.
MAX_INSTANCES_PER_SERVICE: Final = 1_000
MAX_INSTANCES: Final = 100_000


class Script:
    """One Lua script of ``saga_events/lua``: its source and SHA-1."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.source = resources.files("saga_events").joinpath("lua", f"{job}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


APPLY: Final = Script("apply")
REAP: Final = Script("reap")
RESTORE: Final = Script("restore")
FINISH_REBUILD: Final = Script("finish_rebuild")
BUMP_EPOCH: Final = Script("bump_epoch")
INIT_COUNTS: Final = Script("init_counts")
TOUCH: Final = Script("touch")
ALL: Final = (APPLY, REAP, RESTORE, FINISH_REBUILD, BUMP_EPOCH, INIT_COUNTS, TOUCH)


def counts_key(keys: Keys) -> str:
    """Hash: service name -> how many of its instances the index holds (the caps)."""
    return f"{keys.prefix}counts"


def graced_key(keys: Keys) -> str:
    """Sorted set: record key -> the deadline a stall granted it (grace once per stall)."""
    return f"{keys.prefix}graced"


def reaper_mark_key(keys: Keys) -> str:
    """String: Redis time of the last reap by any registrar."""
    return f"{keys.prefix}reaper"


class Scripts:
    """Call the scripts on one client by EVALSHA, loading them on NOSCRIPT."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def load(self, *scripts: Script) -> None:
        for script in scripts or ALL:
            await self._redis.script_load(script.source)

    async def call(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(script)
            return await self._redis.evalsha(script.sha, len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What the apply script did with one event.

    ``status`` is one of ``created``, ``updated``, ``refreshed`` (deadline
    moved, record unchanged), ``removed``, ``absent`` (leave of an instance
    that is not stored), ``stale`` (not newer than what is stored) or
    ``capped`` (a creation refused by the instance caps).
    ``incarnation`` and ``seq`` are the ordering it was applied with (see
    ``Registrar.apply``'s ``after_newest``). With ``after_newest``, a change
    (created, updated, removed) also says its feed revision ``rev`` and, but
    for a removal, the ``record`` as stored (0 and None otherwise).
    """

    status: str
    registered_at_ms: int
    now_ms: int
    incarnation: int = 0
    seq: int = 0
    rev: int = 0
    record: bytes | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """What the apply script enforces beyond ordering."""

    tomb_ttl_ms: int = TOMB_TTL_MS
    max_instances_per_service: int = MAX_INSTANCES_PER_SERVICE
    max_instances: int = MAX_INSTANCES
    unknown_leave_ms: int = UNKNOWN_LEAVE_MS


def backstop_ms(ttl_ms: int) -> int:
    return max(10 * ttl_ms, BACKSTOP_MIN_MS)


#: Events per apply EVALSHA: a batch runs as one script call (TIME read once,
#: one call's overhead); bounded so that one call blocks Redis for little.
BATCH_EVENTS: Final = 64
_SHARED_KEYS: Final = 5


def _event_args(keys: Keys, event: model.AnyEvent) -> tuple[tuple[str, str, str], tuple[Any, ...]]:
    """One event's three keys (record, tombstone, override) and its six ARGV."""
    name, sid = event.service_name, event.service_id
    if isinstance(event, model.Leave):
        kind, body, ttl = "leave", b"", 0
    else:
        kind, body, ttl = "announce", model.encode(model.body_of(event))[1:], event.ttl_ms
    return (
        (keys.inst(name, sid), keys.tomb(name, sid), keys.override(name, sid)),
        (kind, event.incarnation, event.seq, body, ttl, name),
    )


def apply_batch_call(
    keys: Keys, events: list[model.AnyEvent], limits: Limits, *, after_newest: bool = False
) -> tuple[Any, ...]:
    """The one EVALSHA that applies validated ``events`` in order (see lua/apply.lua)."""
    event_keys: list[str] = []
    event_args: list[Any] = []
    for event in events:
        k, a = _event_args(keys, event)
        event_keys.extend(k)
        event_args.extend(a)
    return (
        "EVALSHA",
        APPLY.sha,
        _SHARED_KEYS + len(event_keys),
        keys.index,
        keys.deadlines,
        keys.order,
        keys.rev,
        counts_key(keys),
        *event_keys,
        limits.tomb_ttl_ms,
        "1" if after_newest else "0",
        limits.max_instances_per_service,
        limits.max_instances,
        limits.unknown_leave_ms,
        BACKSTOP_MIN_MS,
        *event_args,
    )


def touch_call(keys: Keys, rkeys: list[str], events: list[model.Announce]) -> tuple[Any, ...]:
    """The one EVALSHA that applies ``events`` (record keys ``rkeys``) as unchanged
    heartbeats (see lua/touch.lua): per event only its key, ttl, incarnation and seq,
    no body."""
    args: list[Any] = []
    for event in events:
        args += (event.ttl_ms, event.incarnation, event.seq)
    return (
        "EVALSHA",
        TOUCH.sha,
        2 + len(rkeys),
        keys.deadlines,
        keys.order,
        *rkeys,
        BACKSTOP_MIN_MS,
        *args,
    )


def apply_call(
    keys: Keys, event: model.AnyEvent, limits: Limits, *, after_newest: bool = False
) -> tuple[Any, ...]:
    """The EVALSHA that applies one validated event (a batch of one; its reply
    is read by :func:`parse_batch`)."""
    return apply_batch_call(keys, [event], limits, after_newest=after_newest)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_apply(reply: Any) -> ApplyResult:
    """One event's reply ``{status, registered_at_ms, now_ms, incarnation, seq[, rev[,
    record]]}`` (the last two only with ``after_newest``)."""
    status, reg, now, inc, seq = reply[:5]
    rev = int(reply[5]) if len(reply) > 5 else 0
    record = reply[6] if len(reply) > 6 else None
    return ApplyResult(_text(status), int(reg), int(now), int(inc), int(seq), rev, record)


def parse_batch(reply: Any) -> list[ApplyResult]:
    """A batch call's reply: one :class:`ApplyResult` per event, in order."""
    return [parse_apply(r) for r in reply]


async def apply_raw(
    redis: aioredis.Redis,
    pipe: _wire.Pipe,
    keys: Keys,
    events: list[model.AnyEvent],
    limits: Limits,
    *,
    after_newest: bool = False,
) -> list[list[Any]]:
    """Apply events in order in one pipeline (one round trip); return each event's
    raw reply (``[status, registered_at_ms, now_ms, incarnation, seq]`` as bytes
    and ints). Raise the first error reply (a refused write: OOM, READONLY)."""
    if not events:
        return []
    pack = _wire.pack_command
    chunks = [events[i : i + BATCH_EVENTS] for i in range(0, len(events), BATCH_EVENTS)]
    packed = b"".join(
        [pack(apply_batch_call(keys, c, limits, after_newest=after_newest)) for c in chunks]
    )
    for _attempt in range(2):
        replies = await pipe.execute(packed, len(chunks))
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted and lost its script cache: nothing was applied.
            await Scripts(redis).load(APPLY)
            continue
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies[0] if len(replies) == 1 else [res for r in replies for res in r]
    raise NoScriptError("apply script could not be loaded")


async def apply_many(
    redis: aioredis.Redis,
    pipe: _wire.Pipe,
    keys: Keys,
    events: list[model.AnyEvent],
    limits: Limits,
    *,
    after_newest: bool = False,
) -> list[ApplyResult]:
    """:func:`apply_raw`, each reply read into an :class:`ApplyResult`."""
    replies = await apply_raw(redis, pipe, keys, events, limits, after_newest=after_newest)
    return [parse_apply(r) for r in replies]


def restore_call(keys: Keys, inst: model.Instance) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the restore script for one instance of a last view."""
    name, sid = inst.service_name, inst.service_id
    return (
        [
            keys.inst(name, sid),
            keys.tomb(name, sid),
            keys.index,
            keys.deadlines,
            keys.order,
            keys.rev,
            counts_key(keys),
        ],
        [
            model.encode_record(inst),
            f"{inst.incarnation}:{inst.seq}",
            inst.ttl_ms,
            backstop_ms(inst.ttl_ms),
            name,
        ],
    )


def reap_call(
    keys: Keys, limit: int, stall_ms: int, grace_ms: int, tomb_ttl_ms: int
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of the reap script (see ``lua/reap.lua``)."""
    return (
        [
            keys.deadlines,
            keys.index,
            keys.order,
            reaper_mark_key(keys),
            keys.rev,
            counts_key(keys),
            graced_key(keys),
        ],
        [
            limit,
            stall_ms,
            grace_ms,
            tomb_ttl_ms,
            keys.inst_prefix,
            f"{keys.prefix}tomb:",
            f"{keys.prefix}override:",
        ],
    )
