"""The watcher: list, then watch, the registry of one namespace into a View.

One job: keep a :class:`~saga_events.view.View` equal to Redis, after
client-go's ``Reflector``. It owns the protocol of the design's "Mirror
protocol", "Change feed" and "Revision and anti-entropy" sections:

* Subscribe first: the change feed ``saga:{ns}:feed`` (every record change,
  published with its revision by the registrar script that made it, record
  included: :mod:`saga_events.feed`), the ``expired``/``evicted`` key-event
  channels, the canary and the epoch. Then snapshot: GET rev and SMEMBERS index in one
  round trip, MGET the records in chunks (one pipelined round trip, decoded
  as one msgspec list), then read the subscription up to a PING sent after
  the MGETs (those reads: :mod:`saga_events._watch_list`): every feed
  message of a change the snapshot may have seen is then read. Those with
  a revision at or before the snapshot's rev are dropped; the rest are
  applied on top of the snapshot, in order, before the view is replaced;
  so a change made during the snapshot is neither lost nor applied twice,
  and the view never goes back to an older record.
* Watch: each feed message is applied as it comes: one decode, one dict
  update per change, no round trip. Gaps are exact: a message whose first
  revision is not the last applied + 1 resyncs at once (at most one such
  resync per second, so forged messages cannot make a mirror snapshot in a
  loop). Besides the feed, the watcher hears only what no script does:
  Redis's own ``expired``/``evicted`` removals (the backstop TTL,
  ``maxmemory``), on the database's key-event channels (one message per
  removal, any key of the database; the registry's records are picked by
  their prefix) → remove. So a change is one message, and a heartbeat's
  backstop ``PEXPIRE`` wakes no mirror. A writer that publishes no feed
  message is never applied from a notification: a registrar without the feed
  bumps rev (the rev check resyncs), an operator's hand edit shows at the next
  resync (``resync_interval``), and a Cluster slot migration's ``del`` on the
  source node removes nothing.
* Stale, never empty: on a disconnect, a silent subscription, a lost canary
  or a new epoch, ``stale`` is set and the view is left as it was until a
  resync replaces it; while the epoch says ``rebuilding`` nothing is listed.
* Anti-entropy: every ``rev_interval`` s the watcher compares rev with the
  changes applied since the snapshot (:class:`RevCheck`; two GETs and a PING
  on the subscription). It finds the one loss a gap cannot show: the last
  message, with none after it. The snapshot pins the offset, so one check
  finds it. Without a rev key (an older registrar) nothing is checked.
* Every change goes to ``on_change`` in the order applied, after the View
  has published it; ``on_state`` is called when ``stale`` flips.
* Redis refusals (NOPERM, READONLY, MOVED...) never escape: ``run`` logs,
  records ``last_error``, stays stale and retries with backoff.

Time comes from a :class:`Clock` so the timing rules can be tested without waits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from anyio.abc import TaskStatus

from . import _topology_pool, _wire, identity
from ._watch_apply import Applier, Scan
from ._watch_list import Lister, as_int, as_text
from ._watch_rules import AnyioClock, Canary, Clock, MirrorStats, RevCheck
from .connection import (
    DEFAULT_TIMING,
    SessionStats,
    Subscription,
    Timing,
    is_transient,
    run_forever,
    subscribe,
)
from .keys import Keys
from .model import Instance
from .view import Change, View

__all__ = ["AnyioClock", "Canary", "Clock", "MirrorStats", "RevCheck", "Watcher"]

log = logging.getLogger("saga_events.mirror")

#: a snapshot that meets a feed gap in its own buffer is taken again, at most this often
_SNAPSHOT_TRIES: Final = 3
#: seconds between two resyncs caused by feed gaps
GAP_RESYNC_SPACING: Final = 1.0


class _Resync(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Watcher:
    """Feeds a View from Redis; see the module docstring for the contract."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        view: View,
        *,
        on_change: Callable[[list[Change]], None],
        on_state: Callable[[], None],
        wants_changes: Callable[[], bool] = lambda: True,
        timing: Timing = DEFAULT_TIMING,
        canary_timeout: float = 3.5,
        resync_interval: float | None = None,
        rev_interval: float = 5.0,
        chunk_size: int = 1000,
        clock: Clock | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.view = view
        self.timing = timing
        self.canary_timeout = canary_timeout
        self.resync_interval = resync_interval
        self.rev_interval = rev_interval
        self.chunk_size = chunk_size
        self.clock: Clock = clock or AnyioClock()
        self.stats = MirrorStats()
        self.session_stats = SessionStats()
        self.epoch: str | None = None
        self.synced = False
        self.stale = True
        self.connected = False
        self.last_error: str | None = None
        self._was_up = False
        self.rev = RevCheck()
        self._sub: Subscription | None = None
        #: what the subscription's handler (:meth:`_fast`) left for the task
        self._deferred: Scan | None = None
        self._last_gap_resync = -math.inf
        self._on_change = on_change
        self._on_state = on_state
        self._wants_changes = wants_changes
        self._pipe = _wire.Pipe(client)
        # Both restart when a session starts (a Mirror may be built outside a loop).
        self.canary = Canary(canary_timeout, 0.0)
        self._in = Applier(keys, view, self.stats, self.canary, self.clock)
        self._list = Lister(client, keys, view, self._in, self._pipe, self.stats)
        self._epoch_channel = keys.epoch_notifications.encode()
        self._last_rev_check = 0.0
        #: inside _handle or _resync: changes may be applied but not yet reported,
        #: or the view is about to be replaced (apply_own then waits for the feed)
        self._busy = False

    async def release(self) -> None:
        await self._pipe.release()

    def set_stale(self, stale: bool) -> None:
        if stale != self.stale:
            self.stale = stale
            self._on_state()

    # -- the loop ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List, then watch, forever; reconnect and resync on any failure. Never raises
        but on cancellation; ``task_status.started()`` once the first snapshot is applied."""
        started = False

        async def session(healthy: Callable[[], None]) -> None:
            def synced() -> None:
                nonlocal started
                healthy()
                self.last_error = None
                if not started:
                    started = True
                    task_status.started()

            try:
                await self._session(synced)
            finally:
                self._was_up = self.connected or not self.stale
                self.connected = False
                self.set_stale(True)
                await self._pipe.release()

        def on_error(exc: BaseException) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if is_transient(exc):
                self.stats.reconnects += 1
                if self._was_up:
                    log.warning("mirror lost Redis (%s); serving the last view as stale", exc)
            else:
                # A refusal (NOPERM, READONLY, MOVED...): the host keeps running on
                # what the mirror has (nothing, or its last view) and learns why.
                self.stats.refusals += 1
            self._on_state()
            if not started and not is_transient(exc):
                release_start()

        def release_start() -> None:
            nonlocal started
            started = True
            task_status.started()

        await run_forever(
            session,
            name="mirror",
            timing=self.timing,
            on_error=on_error,
            stats=self.session_stats,
            sleep=self.clock.sleep,
        )

    async def _session(self, on_synced: Callable[[], None]) -> None:
        k = self.keys
        async with subscribe(
            self.client,
            patterns=(k.registrar_notifications,),
            channels=(k.feed, k.expired_events, k.evicted_events, k.epoch_notifications),
            timing=self.timing,
        ) as sub:
            self._sub = sub
            self._deferred = None
            self.connected = True
            self.canary.restart(self.clock.monotonic())
            if self.synced:
                # A resync after a gap: if Redis restarted empty, wait for the
                # registrar's rebuild instead of showing an empty registry.
                await self._wait_until_epoch_ready(sub)
            else:
                self.epoch = await self._get_epoch()
            await self._resync("connect")
            on_synced()
            last_resync = self.clock.monotonic()
            fast = self._fast
            while True:
                # Messages that arrive while this task waits are applied by _fast, in
                # the socket's callback (no task wakeup per change); it wakes the task
                # for what needs I/O or a decision (a gap, the canary back, an epoch).
                sub.set_handler(fast)
                try:
                    batch = await sub.read(self.timing.ping_interval, 1024)
                finally:
                    sub.set_handler(None)
                deferred, self._deferred = self._deferred, None
                if deferred is not None and await self._after_or_resync(deferred):
                    # The resync read past the messages in ``batch`` (older than its
                    # snapshot), as it does past the rest of a batch cut by a gap.
                    last_resync = self.clock.monotonic()
                    batch = []
                if batch and await self._handle_or_resync(batch):
                    last_resync = self.clock.monotonic()
                now = self.clock.monotonic()
                if await self._check_canary(now):
                    last_resync = now
                if now - self._last_rev_check >= self.rev_interval:
                    self._last_rev_check = now
                    if await self._check_rev(sub):
                        last_resync = self.clock.monotonic()
                if self.resync_interval is not None and now - last_resync >= self.resync_interval:
                    last_resync = now
                    await self._resync("periodic", keep_stale=self.canary.is_lost)

    async def _handle_or_resync(self, batch: list[Any]) -> bool:
        try:
            await self._handle(batch)
            return False
        except _Resync as exc:
            await self._resync_after(exc.reason)
            return True

    async def _after_or_resync(self, scan: Scan) -> bool:
        try:
            await self._after(scan)
            return False
        except _Resync as exc:
            await self._resync_after(exc.reason)
            return True

    def _fast(self, batch: list[Any]) -> bool:
        """Apply replies as they arrive (the subscription's handler while the loop
        waits); True when the task must act (see :meth:`_after`), with the scan kept
        for it."""
        changes: list[Change] = []
        scan = Scan()
        self._in.scan([r for r in batch if isinstance(r, list)], scan, None, changes)
        self._apply(changes)
        if scan.gap is not None or scan.canary_back or scan.epoch_changed:
            self._deferred = scan
            return True
        return False

    async def _resync_after(self, reason: str) -> None:
        self.set_stale(True)
        if reason.startswith("feed gap"):
            now = self.clock.monotonic()
            wait = self._last_gap_resync + GAP_RESYNC_SPACING - now
            if wait > 0:
                await self.clock.sleep(wait)
            self._last_gap_resync = self.clock.monotonic()
        assert self._sub is not None
        await self._wait_until_epoch_ready(self._sub)
        await self._resync(reason)

    async def _check_canary(self, now: float) -> bool:
        """Go stale and resync once when the canary has been silent too long."""
        if not self.canary.lost(now):
            return False
        self.set_stale(True)
        log.warning(
            "no registrar liveness for %.1f s: notifications may be off or no "
            "registrar runs; resyncing and serving as stale",
            now - self.canary.last,
        )
        await self._resync("canary lost", keep_stale=True)
        return True

    async def _check_rev(self, sub: Subscription) -> bool:
        """Compare rev with the changes applied (see :class:`RevCheck`); resync on a
        loss. True when it resynced."""
        self.stats.rev_checks += 1
        before = as_int(await self.client.get(self.keys.rev))
        after = None
        if before is not None:
            try:
                batch = await sub.barrier()
                if batch:
                    await self._handle(batch)
            except _Resync as exc:
                await self._resync_after(exc.reason)
                return True
            after = as_int(await self.client.get(self.keys.rev))
        if not self.rev.lost(before, self._in.applied, after):
            return False
        self.stats.rev_resyncs += 1
        log.warning("registry revision %s is ahead of the changes seen: resyncing", before)
        await self._resync("revision mismatch", keep_stale=self.canary.is_lost)
        return True

    async def _get_epoch(self) -> str | None:
        raw = await self.client.get(self.keys.epoch)
        return as_text(raw) if raw is not None else None

    async def _wait_until_epoch_ready(self, sub: Subscription) -> bool:
        """Return once the epoch is ready; True if it had to wait."""
        waited = False
        epoch_channel = self._epoch_channel
        while True:
            epoch = await self._get_epoch()
            if epoch is None:
                # A Cluster replica of a migrating owner answers nil for the moved epoch.
                await _topology_pool.check_slot(self.client)
            parsed = identity.parse_epoch(epoch)
            if epoch is not None and parsed is not None and not parsed.rebuilding:
                self.epoch = epoch
                return waited
            waited = True
            # Wait for the epoch key to change; record changes meanwhile are
            # re-read by the snapshot that follows.
            while not any(r[0] == b"message" and r[1] == epoch_channel for r in await sub.read()):
                pass

    # -- applying -----------------------------------------------------------------------

    async def _handle(self, batch: Iterable[Any]) -> None:
        """Apply one batch of replies to the view (watching)."""
        self._busy = True
        try:
            await self._handle_batch(batch)
        finally:
            self._busy = False

    async def _handle_batch(self, batch: Iterable[Any]) -> None:
        changes: list[Change] = []
        scan = Scan()
        self._in.scan(batch, scan, None, changes)
        self._apply(changes)
        await self._after(scan)

    async def _after(self, scan: Scan) -> None:
        """What a scan found that needs I/O: a gap or the canary back (resync), an
        epoch notification (read the epoch; resync when it changed)."""
        if scan.gap is not None:
            self.stats.feed_gaps += 1
            log.warning("%s: resyncing", scan.gap)
            raise _Resync(scan.gap)
        if scan.canary_back:
            log.info("registrar liveness is back; resyncing")
            raise _Resync("canary back")
        if scan.epoch_changed:
            epoch = await self._get_epoch()
            if epoch != self.epoch:
                raise _Resync(f"epoch {epoch}")

    def _apply(self, changes: list[Change]) -> None:
        """Publish the view, then report (``changes`` may be empty when nobody
        listens for them; waiters still wake)."""
        if self.view.publish() or changes:
            self._on_change(changes)

    def apply_own(self, key: str, inst: Instance | None, rev: int) -> bool:
        """Apply a change this process's own script call made at revision ``rev``
        (``inst`` None: removed) before its feed message arrives, when ``rev`` is the
        very next revision the view expects: no other change can then still arrive
        before it, and its feed message is a no-op. False, doing nothing, otherwise
        (stale, listing, behind, or already past ``rev``): the feed will show it."""
        if self.stale or self._busy or self._in.revs.last != rev - 1:
            return False
        if inst is not None:
            inst = self._in.checked(key, inst)
            if inst is None:
                return False
        change = self.view.remove(key) if inst is None else self.view.put(key, inst)
        self._apply([change] if change is not None else [])
        return True

    async def _resync(self, reason: str, *, keep_stale: bool = False) -> None:
        """List the registry and make the view equal to it, emitting differences."""
        self._busy = True
        try:
            await self._resync_listing(reason, keep_stale=keep_stale)
        finally:
            self._busy = False

    async def _resync_listing(self, reason: str, *, keep_stale: bool = False) -> None:
        sub = self._sub
        assert sub is not None
        self.stats.snapshots += 1
        if self.synced:
            self.stats.resyncs += 1
        tries = 0
        while True:
            tries += 1
            fresh, rev, scan = await self._list.snapshot(sub, self.chunk_size)
            if scan.epoch_changed and await self._get_epoch() != self.epoch:
                # A new epoch while listing: list again once it is ready.
                self.set_stale(True)
                await self._wait_until_epoch_ready(sub)
                continue
            if scan.gap is None:
                break
            self.stats.feed_gaps += 1
            if tries >= _SNAPSHOT_TRIES:
                log.warning("%s during %d snapshots; keeping the last", scan.gap, tries)
                break
        self.stats.snapshot_records += len(fresh)
        self.rev.forget()
        orphans = scan.orphans
        if rev is not None and scan.gap is None:
            # rev - applied, exactly: every change after rev is applied (Redis's own
            # removals, the only orphans, take no revision).
            self.rev.pin(rev)
        # Take the new offset at the next turn of the loop, not rev_interval later.
        self._last_rev_check = -math.inf
        changes = self.view.replace(fresh, changes=self._wants_changes())
        if orphans:
            await self._list.read_orphans(orphans, changes)
        self._apply(changes)
        self.synced = True
        if not keep_stale or not self.canary.is_lost:
            # Stale only while the canary is still lost: it may have come back
            # during this very snapshot (its beat read in the snapshot's buffer),
            # and no later beat would say so again.
            self.set_stale(False)
        else:
            self._on_state()
        log.debug("mirror synced (%s): %d instances", reason, len(fresh))
