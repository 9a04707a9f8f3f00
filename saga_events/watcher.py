"""The watcher: list, then watch, the registry of one namespace into a View.

One job: keep a :class:`~saga_events.view.View` equal to Redis, after
client-go's ``Reflector``. It owns the protocol of the design's "Mirror
protocol" and "Revision and anti-entropy" sections:

* Subscribe first (records, the canary, the epoch), then snapshot (SMEMBERS
  index, MGET in chunks), then apply what was notified meanwhile,
  then watch: ``set`` → GET the key, ``del``/``expired``/``evicted`` →
  remove; GETs go out in notification order on one connection.
* Stale, never empty: on a disconnect, a silent subscription, a lost canary
  or a new epoch, ``stale`` is set and the view is left as it was until a
  resync replaces it; while the epoch says ``rebuilding`` nothing is listed.
* Anti-entropy: the registrar increments ``saga:{ns}:rev`` on every record
  change. The watcher counts the ``set``/``del`` record notifications it
  applies and, right after each snapshot and then every ``rev_interval`` s,
  compares that count with rev (two GETs and a PING on the subscription;
  :class:`RevCheck` states the rule). A lost notification (a flags gap, an
  output-buffer disconnect, a bug) is found at the next check and repaired
  by a resync: within ``rev_interval`` plus a snapshot. Without a rev key
  (an older registrar) nothing is checked.
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
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import msgspec
import redis.asyncio as aioredis
from anyio.abc import TaskStatus

from . import _wire, identity, model
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

log = logging.getLogger("saga_events.mirror")

_REMOVE_EVENTS: Final = frozenset({b"del", b"expired", b"evicted"})


class Clock(Protocol):
    """Where the watcher's timing rules get the time."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class AnyioClock:
    """The event loop's clock."""

    def monotonic(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


@dataclass
class MirrorStats:
    """Counters of what the mirror received and sent; for metrics and tests."""

    record_notifications: int = 0
    canary_notifications: int = 0
    epoch_notifications: int = 0
    gets: int = 0
    snapshots: int = 0
    snapshot_records: int = 0
    reconnects: int = 0
    resyncs: int = 0
    rev_checks: int = 0
    rev_resyncs: int = 0
    refusals: int = 0


class RevCheck:
    """Decides whether a record notification was lost, from the registry revision.

    The registrar increments ``rev`` in the same script as each record change
    it makes, and each such change notifies exactly one ``set`` (create,
    update, restore) or ``del`` (leave, reap). ``applied`` counts those two
    kinds only: Redis's own ``expired``/``evicted`` removals change no rev.
    So, with nothing lost, ``rev - applied`` is a constant: the offset.

    Each check reads rev (``before``), then reads the subscription past a
    PING sent after that read (every notification of a change up to
    ``before`` has then been counted, and perhaps some of later changes), then
    reads rev again (``after``). With nothing lost the offset therefore lies
    in ``[before - applied, after - applied]``; the check keeps the
    intersection of these intervals since the last snapshot. A loss shifts
    every later interval up by the number lost: when one no longer meets the
    intersection, a notification was lost. A quiet check (``before ==
    after``) pins the offset exactly, so one lost notification is found at
    the next check; under constant churn the intersection narrows as checks
    add up. Fewer notifications than possible is the only conclusion drawn:
    more (records deleted behind the registrar's back) starts over.
    """

    def __init__(self) -> None:
        self.bounds: tuple[int, int] | None = None

    def forget(self) -> None:
        """After a snapshot: the old bounds say nothing about the new count."""
        self.bounds = None

    def lost(self, before: int | None, applied: int, after: int | None) -> bool:
        """One check: True when a notification has been lost."""
        if before is None or after is None:
            self.bounds = None  # no rev (an older registrar, or none yet): nothing to check
            return False
        low, high = before - applied, after - applied
        if self.bounds is None or high < self.bounds[0]:
            self.bounds = (low, high)
            return False
        if low > self.bounds[1]:
            return True
        self.bounds = (max(low, self.bounds[0]), min(high, self.bounds[1]))
        return False


class Canary:
    """The registrars' liveness as seen on the subscription.

    ``beat`` on each liveness notification; ``lost`` is True once, when no
    beat came for ``timeout`` s, and ``beat`` returns True once, when one
    comes back after a loss.
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.last = now
        self.is_lost = False

    def restart(self, now: float) -> None:
        self.last = now
        self.is_lost = False

    def beat(self, now: float) -> bool:
        self.last = now
        back, self.is_lost = self.is_lost, False
        return back

    def lost(self, now: float) -> bool:
        if self.is_lost or now - self.last <= self.timeout:
            return False
        self.is_lost = True
        return True


class _Resync(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


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
        self._applied = 0
        self._on_change = on_change
        self._on_state = on_state
        self._wants_changes = wants_changes
        self._pipe = _wire.Pipe(client)
        # Both restart when a session starts (a Mirror may be built outside a loop).
        self.canary = Canary(canary_timeout, 0.0)
        self._last_rev_check = 0.0

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
            patterns=(k.inst_notifications, k.registrar_notifications),
            channels=(k.epoch_notifications,),
            timing=self.timing,
        ) as sub:
            self.connected = True
            self.canary.restart(self.clock.monotonic())
            pending, sub.pending = sub.pending, []
            if self.synced:
                # A resync after a gap: if Redis restarted empty, wait for the
                # registrar's rebuild instead of showing an empty registry.
                if await self._wait_until_epoch_ready(sub):
                    pending = []  # re-read by the snapshot
            else:
                self.epoch = await self._get_epoch()
            await self._resync("connect")
            if pending:
                await self._handle_or_resync(sub, pending)
            on_synced()
            last_resync = self.clock.monotonic()
            while True:
                batch = await sub.read(self.timing.ping_interval, 1024)
                if batch and await self._handle_or_resync(sub, batch):
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

    async def _handle_or_resync(self, sub: Subscription, batch: list[Any]) -> bool:
        try:
            await self._handle(batch)
            return False
        except _Resync as exc:
            await self._resync_after(sub, exc.reason)
            return True

    async def _resync_after(self, sub: Subscription, reason: str) -> None:
        self.set_stale(True)
        await self._wait_until_epoch_ready(sub)
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
        """Compare rev with the notifications applied (see :class:`RevCheck`); resync
        on a loss. True when it resynced."""
        self.stats.rev_checks += 1
        before = _int(await self.client.get(self.keys.rev))
        after = None
        if before is not None:
            try:
                await self._read_past_barrier(sub)
            except _Resync as exc:
                await self._resync_after(sub, exc.reason)
                return True
            after = _int(await self.client.get(self.keys.rev))
        if not self.rev.lost(before, self._applied, after):
            return False
        self.stats.rev_resyncs += 1
        log.warning("registry revision %s is ahead of the notifications seen: resyncing", before)
        await self._resync("revision mismatch", keep_stale=self.canary.is_lost)
        return True

    async def _read_past_barrier(self, sub: Subscription) -> None:
        """Apply everything Redis queued on the subscription before a PING sent now."""
        batch = await sub.barrier()
        if batch:
            await self._handle(batch)

    async def _get_epoch(self) -> str | None:
        raw = await self.client.get(self.keys.epoch)
        return _text(raw) if raw is not None else None

    async def _wait_until_epoch_ready(self, sub: Subscription) -> bool:
        """Return once the epoch is ready; True if it had to wait."""
        waited = False
        while True:
            epoch = await self._get_epoch()
            parsed = identity.parse_epoch(epoch)
            if epoch is not None and parsed is not None and not parsed.rebuilding:
                self.epoch = epoch
                return waited
            waited = True
            # Wait for the epoch key to change; record notifications meanwhile
            # are re-read by the snapshot that follows.
            while not any(r[0] == b"message" for r in await sub.read()):
                pass

    # -- applying -----------------------------------------------------------------------

    async def _handle(self, batch: Iterable[Any]) -> None:
        k = self.keys
        prefix = k.keyspace_prefix.encode()
        inst_prefix = prefix + k.inst_prefix.encode()
        to_get: dict[str, None] = {}
        to_remove: dict[str, None] = {}
        epoch_changed = False
        for reply in batch:
            kind = reply[0]
            if kind == b"pmessage":
                channel, data = reply[2], reply[3]
                if channel.startswith(inst_prefix):
                    self.stats.record_notifications += 1
                    key = channel[len(prefix) :].decode("utf-8", "replace")
                    if k.parse_inst(key) is None:
                        continue
                    if data == b"set":
                        self._applied += 1
                        to_remove.pop(key, None)
                        to_get[key] = None
                    elif data in _REMOVE_EVENTS:
                        if data == b"del":  # expired/evicted are Redis's own: no rev
                            self._applied += 1
                        to_get.pop(key, None)
                        to_remove[key] = None
                    # 'expire' on a record is a backstop refresh: nothing to do.
                else:
                    self.stats.canary_notifications += 1
                    if self.canary.beat(self.clock.monotonic()):
                        log.info("registrar liveness is back; resyncing")
                        await self._resync("canary back")
            elif kind == b"message":
                self.stats.epoch_notifications += 1
                epoch_changed = True
        changes: list[Change] = []
        if to_get:
            keys = list(to_get)
            self.stats.gets += len(keys)
            pack = _wire.pack_command
            values = await self._pipe.execute(b"".join([pack(("GET", k)) for k in keys]), len(keys))
            for value in values:
                if isinstance(value, Exception):
                    raise value
            for key, raw in zip(keys, values, strict=True):
                inst = self._decode(key, raw)
                change = self.view.remove(key) if inst is None else self.view.put(key, inst)
                if change is not None:
                    changes.append(change)
        for key in to_remove:
            change = self.view.remove(key)
            if change is not None:
                changes.append(change)
        self._apply(changes)
        if epoch_changed:
            epoch = await self._get_epoch()
            if epoch != self.epoch:
                raise _Resync(f"epoch {epoch}")

    def _apply(self, changes: list[Change]) -> None:
        """Publish the view, then report (``changes`` may be empty when nobody
        listens for them; waiters still wake)."""
        if self.view.publish() or changes:
            self._on_change(changes)

    async def _resync(self, reason: str, *, keep_stale: bool = False) -> None:
        """List the registry and make the view equal to it, emitting differences."""
        self.stats.snapshots += 1
        if self.synced:
            self.stats.resyncs += 1
        raw_members = await self.client.smembers(self.keys.index)
        members = sorted(_text(m) for m in raw_members)
        fresh: dict[str, Instance] = {}
        chunks = [members[i : i + self.chunk_size] for i in range(0, len(members), self.chunk_size)]
        if chunks:
            pipe = self.client.pipeline(transaction=False)
            for chunk in chunks:
                pipe.mget(chunk)
            for chunk, values in zip(chunks, await pipe.execute(), strict=True):
                for key, raw in zip(chunk, values, strict=True):
                    inst = self._decode(key, raw)
                    if inst is not None:
                        fresh[key] = inst
        self.stats.snapshot_records += len(fresh)
        self.rev.forget()
        # Take the new offset at the next turn of the loop, not rev_interval later.
        self._last_rev_check = -math.inf
        self._apply(self.view.replace(fresh, changes=self._wants_changes()))
        self.synced = True
        if not keep_stale:
            self.set_stale(False)
        else:
            self._on_state()
        log.debug("mirror synced (%s): %d instances", reason, len(fresh))

    def _decode(self, key: str, raw: bytes | None) -> Instance | None:
        if raw is None:
            return None
        try:
            inst = model.decode_instance(raw)
        except msgspec.DecodeError as exc:
            log.warning("ignoring unreadable record %s: %s", key, exc)
            return None
        if self.keys.parse_inst(key) != (inst.service_name, inst.service_id):
            log.warning("ignoring record %s that names another instance", key)
            return None
        return self.view.share(inst)
