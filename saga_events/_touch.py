"""The registrar's touch path: an unchanged heartbeat moves only its deadline (internal).

One job: for a batch of the intake's validated events, decide per event
whether it is a *touch* (``lua/touch.lua``: one ZADD of the deadline, a
PTTL on every 4th seq) or a full apply (``lua/apply.lua``), and send both
kinds, in the batch's order, as one pipeline (one round trip).

An announce is a touch when it carries ``since`` (the seq of its agent's
last content change) and the registrar's own view holds the instance's
record with the event's incarnation, ``record.seq >= since``, no operator
override, and the event's content (url, capabilities, metadata, ttl_ms,
draining). Everything else is applied in full, as before ``since`` existed.

Why a touch may skip reading the record (and the tombstone and override):

* The view's record was written by an event of this incarnation at seq
  ``r >= since``; the agent did not change its content between ``since`` and
  the event's seq, so that record holds the event's content, and so does any
  record of this incarnation Redis holds now that is at least as new. A full
  apply would find the body unchanged: move the deadline and the order entry.
  ``lua/touch.lua`` does just that, the order entry deciding as in apply.lua
  (older: stale; the tombstone is older than the entry of a record that
  exists). The entry is kept exact: the reaper's tombstone is taken from it,
  and a touch that left it behind would let a heartbeat delayed past a reap
  (a paused registrar's backlog) bring a crashed instance back.
* A view that lags Redis: the deadline ZADD is ``XX`` and a missing order
  entry is ``absent``, so a record that a leave or the reaper removed is not
  brought back; that event goes through apply.lua in the same cycle (stale
  after a leave, re-created after a reap). A record of a newer incarnation
  has a newer entry: the touch is stale.
* A late event E' of the same incarnation with ``seq' >= since`` carries the
  same content (the agent's contract); one with ``seq' < since`` is older than
  the record and the entry. Both are ordered by the entry as before.
* The agent's contract (``Agent``): ``since`` is the seq of the run's first
  announce and moves to the event's seq whenever the content changes.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from . import _wire, model, scripts
from .keys import Keys

#: The registrar's view, by record key (``View.get``).
Lookup = Callable[[str], model.Instance | None]

#: Events per touch EVALSHA: a few µs each in Redis, so a call blocks it for little.
TOUCH_EVENTS: Final = 128

_DRAIN: Final = model.Drain


def touchable(event: model.AnyEvent, inst: model.Instance | None) -> bool:
    """Whether ``event`` may be applied as a touch against the view's ``inst``."""
    if inst is None or isinstance(event, model.Leave):
        return False
    since = event.since
    return (
        since is not None
        and since <= inst.seq
        and since <= event.seq
        and inst.incarnation == event.incarnation
        and inst.override is None
        and inst.service_url == event.service_url
        and inst.ttl_ms == event.ttl_ms
        and inst.draining == (type(event) is _DRAIN)
        and inst.capabilities == event.capabilities
        and inst.metadata == event.metadata
    )


@dataclass
class Outcome:
    """What :func:`apply` did with one batch."""

    full: list[model.AnyEvent] = field(default_factory=list)
    replies: list[list[Any]] = field(default_factory=list)
    touched: int = 0
    stale: int = 0
    absent: list[model.AnyEvent] = field(default_factory=list)


def _plan(
    keys: Keys, events: list[model.AnyEvent], lookup: Lookup
) -> list[tuple[bool, list[Any], list[str]]]:
    """Consecutive runs of (touch?, events, record keys), in the batch's order."""
    runs: list[tuple[bool, list[Any], list[str]]] = []
    prefix = keys.inst_prefix
    for event in events:
        rkey = f"{prefix}{event.service_name}:{event.service_id}"
        touch = touchable(event, lookup(rkey))
        if runs and runs[-1][0] == touch:
            runs[-1][1].append(event)
            runs[-1][2].append(rkey)
        else:
            runs.append((touch, [event], [rkey]))
    return runs


async def apply(
    redis: aioredis.Redis,
    pipe: _wire.Pipe,
    keys: Keys,
    events: list[model.AnyEvent],
    limits: scripts.Limits,
    lookup: Lookup,
) -> Outcome:
    """Touch what may be touched, apply the rest in full, in one round trip."""
    out = Outcome()
    if not events:
        return out
    runs = _plan(keys, events, lookup)
    if len(runs) == 1 and not runs[0][0]:
        out.full = events
        out.replies = await scripts.apply_raw(redis, pipe, keys, events, limits)
        return out
    pack = _wire.pack_command
    calls: list[tuple[bool, list[Any]]] = []
    parts: list[bytes] = []
    for touch, run, rkeys in runs:
        step = TOUCH_EVENTS if touch else scripts.BATCH_EVENTS
        for i in range(0, len(run), step):
            chunk = run[i : i + step]
            calls.append((touch, chunk))
            if touch:
                parts.append(pack(scripts.touch_call(keys, rkeys[i : i + step], chunk)))
            else:
                parts.append(pack(scripts.apply_batch_call(keys, chunk, limits)))
    packed = b"".join(parts)
    for _attempt in range(2):
        replies = await pipe.execute(packed, len(calls))
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis restarted and lost its script cache. Both scripts are loaded
            # and the whole batch is sent again: a call that did run is
            # idempotent (a touch, or an apply now stale or refreshed).
            await scripts.Scripts(redis).load(scripts.TOUCH, scripts.APPLY)
            continue
        for r in replies:
            if isinstance(r, Exception):
                raise r
        for (touch, chunk), reply in zip(calls, replies, strict=True):
            if touch:
                for event, ok in zip(chunk, reply, strict=True):
                    if ok == 1:
                        out.touched += 1
                    elif ok == 2:
                        out.stale += 1
                    else:
                        out.absent.append(event)
            else:
                out.full.extend(chunk)
                out.replies.extend(reply)
        return out
    raise NoScriptError("touch and apply scripts could not be loaded")
