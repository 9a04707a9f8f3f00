"""Epochs and rebuilds: how a registrar tells mirrors to resync, and refills an
empty Redis (internal; :class:`~saga_events.registrar.Registrar` delegates here).

Contract (DESIGN.md "Rebuild after an empty restart"):

* Epochs are made by :func:`identity.new_epoch` from Redis's ``TIME`` and
  parsed only by :func:`identity.parse_epoch`; no local clock is trusted.
* A registrar that finds no epoch takes the rebuild with ``SET NX`` of a
  ``rebuilding`` epoch, restores its last view (``restore.lua``: only where
  nothing is stored, fresh deadline, rev incremented), asks agents to
  re-announce, waits ``rebuild_wait`` and ends it by compare-and-set
  (``finish_rebuild.lua``); a superseded rebuild gives up.
* A rebuild abandoned by its registrar is finished by whoever sees it
  ``4 x rebuild_wait`` after its start by Redis's clock, compare-and-set on
  the value read: a newer ``rebuilding`` epoch is never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup
from redis.exceptions import RedisError

from . import identity, model, override_ends, scripts
from ._redis import TRANSIENT, Backoff

if TYPE_CHECKING:
    from .registrar import Registrar

log = logging.getLogger("saga_events.registrar")


class Rebuilds:
    """The epoch and rebuild work of one registrar."""

    def __init__(self, registrar: Registrar) -> None:
        self._reg = registrar
        self.rebuilding = False

    async def _redis_ms(self) -> int:
        seconds, micros = await self._reg._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def bump_epoch(self) -> str | None:
        """Tell mirrors to resync: replace the epoch by a new one in state ``ready``.

        Does nothing (returns None) when there is no epoch: that calls for a
        rebuild (:meth:`check`), not a resync; nor during a rebuild, which
        ends with a new epoch of its own.
        """
        value = str(identity.new_epoch(await self._redis_ms(), identity.READY))
        if await self._reg._scripts.call(scripts.BUMP_EPOCH, [self._reg.keys.epoch], [value]):
            return value
        return None

    async def check(self, tg: TaskGroup) -> None:
        """Start a rebuild in ``tg`` if Redis has no epoch (first start, or restarted empty)."""
        if self.rebuilding:
            return
        reg = self._reg
        current = await reg._redis.get(reg.keys.epoch)
        if current is not None:
            await self.finish_abandoned(current)
            return
        epoch = identity.new_epoch(await self._redis_ms(), identity.REBUILDING)
        if not await reg._redis.set(reg.keys.epoch, str(epoch), nx=True):
            return  # another registrar leads this rebuild
        self.rebuilding = True
        reg.stats.rebuilds += 1
        log.info(
            "registry has no epoch (a new or restarted Redis): rebuild %s restores the last "
            "view and asks agents to re-announce",
            epoch.id,
        )
        tg.start_soon(self._finish, epoch.id)

    async def finish_abandoned(self, current: bytes | str) -> None:
        # A registrar that died mid-rebuild leaves the epoch in 'rebuilding' and
        # mirrors waiting: whoever sees it long after its start (by Redis's
        # clock, in the script) finishes it, compare-and-set on the value read.
        epoch = identity.parse_epoch(current)
        if epoch is None or not epoch.rebuilding:
            return
        ready = identity.Epoch(epoch.id, epoch.started_ms, identity.READY)
        if await self._reg._scripts.call(
            scripts.FINISH_REBUILD,
            [self._reg.keys.epoch],
            [str(epoch), str(ready), round(4000 * self._reg.rebuild_wait)],
        ):
            log.warning("finished rebuild %s that its registrar abandoned", epoch.id)

    async def restore(self, instances: Iterable[model.Instance]) -> int:
        """Write back each instance that Redis does not hold (restore script); return
        how many were restored."""
        restored = 0
        insts = list(instances)
        for inst in insts:
            keys, args = scripts.restore_call(self._reg.keys, inst)
            restored += int(await self._reg._scripts.call(scripts.RESTORE, keys, args))
        self._reg.stats.restored += restored
        # Operators' drains too: their keys were lost with the records (override_ends.py).
        await override_ends.restore_overrides(self._reg, self._reg._redis, insts)
        return restored

    async def _finish(self, epoch_id: str) -> None:
        # Retried until done or superseded: given up, the re-announce request
        # would be lost and mirrors would wait stale for the abandoned-rebuild
        # timeout (4 x rebuild_wait).
        reg = self._reg
        rebuilding = f"{epoch_id}:{identity.REBUILDING}"
        backoff = Backoff(cap=1.0)
        restored = False
        try:
            while True:
                try:
                    if await reg._redis.get(reg.keys.epoch) != rebuilding.encode():
                        log.warning("rebuild %s superseded (Redis changed under it)", epoch_id)
                        return
                    if not restored and reg.view is not None:
                        n = await self.restore(reg.view())
                        log.info("rebuild %s restored %d instances from the last view", epoch_id, n)
                    restored = True
                    receivers = await reg._redis.publish(reg.keys.control, b"reannounce")
                    log.info("asked %d agents to re-announce", receivers)
                    await anyio.sleep(reg.rebuild_wait)
                    # Only if the epoch is still ours: Redis may have restarted meanwhile.
                    done = await reg._scripts.call(
                        scripts.FINISH_REBUILD,
                        [reg.keys.epoch],
                        [rebuilding, f"{epoch_id}:{identity.READY}", 0],
                    )
                    if done:
                        log.info("rebuild %s done", epoch_id)
                    else:
                        log.warning("rebuild %s superseded (Redis changed under it)", epoch_id)
                    return
                except (*TRANSIENT, RedisError) as exc:
                    log.warning("rebuild %s interrupted (%s); retrying", epoch_id, exc)
                    await anyio.sleep(backoff.next())
        finally:
            self.rebuilding = False
