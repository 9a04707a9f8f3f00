"""The mirror: a local, push-updated copy of the registry.

Consistency contract (after client-go's SharedInformer):

* ``async with Mirror(...)`` (or ``await tg.start(mirror.run)``) returns once
  the first snapshot is applied: ``has_synced`` is then True for good.
* Reads (``pick``, ``instances``, ``services``) are lookups in immutable
  per-service snapshots (:mod:`saga_events.view`) that never touch the
  network and never block. They can be called from any thread: a read sees
  one consistent version of a service, never a half-applied change.
* The view follows Redis by the change feed (each record change published, with
  its revision and the record, by the registrar script that made it):
  subscribe first, then snapshot the index and rev, then apply what the feed
  carried since that rev, then watch. Each record key converges to Redis's
  value; changes to one key are seen in the order Redis made them, though
  intermediate versions may be skipped (never an older one after a newer).
* On a disconnect, a silent subscription, a lost canary or a new epoch the
  mirror sets ``stale``, keeps serving its last view unchanged, and resyncs
  (list, then watch again), emitting only the differences as changes. While
  a registrar rebuilds a restarted Redis, the old view is served as stale
  until the rebuild is ready, so callers never see the registry vanish.
* ``changes()`` yields ``Added``/``Updated``/``Removed`` in the order they are
  applied to the view; a resync yields the differences only.
* A lost feed message is found at the next one (its revision skips) and
  repaired by a resync at once; a lost last message, or a change by a
  registrar without the feed (it bumps the revision), by the registry
  revision check within about ``rev_interval`` s. A record written by hand
  (no feed message, no revision) shows at the next resync
  (``resync_interval``); Redis's own removals (expiry, eviction) are heard
  on the key-event channels.
* Redis refusals (NOPERM, READONLY, MOVED, ...) never raise into the host:
  the mirror logs them, stays ``stale`` with the reason in ``last_error``,
  keeps serving what it has and retries with backoff. ``async with`` then
  returns without a first snapshot (``has_synced`` is False).

This module is the facade: the store is :mod:`saga_events.view`, the
list-then-watch loop :mod:`saga_events.watcher`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus

from ._changes import CHANGE_BUFFER, ChangesOverflow, ChangeStream
from ._lifecycle import RunsInBackground
from ._redis import RedisLike, connect, db_of
from ._topology_url import ReadFrom, with_read_from
from .connection import Timing
from .errors import ServiceNotFound
from .keys import Keys
from .model import Instance
from .selection import Strategy
from .view import Added, Change, Picker, Removed, Updated, View
from .watcher import Clock, MirrorStats, Watcher

__all__ = [
    "CHANGE_BUFFER",
    "Added",
    "Change",
    "ChangeStream",
    "ChangesOverflow",
    "Mirror",
    "MirrorStats",
    "Removed",
    "SyncMirror",
    "Updated",
]

log = logging.getLogger("saga_events.mirror")


def _fallback_instance(name: str, url: str) -> Instance:
    return Instance(
        incarnation=0,
        seq=0,
        registered_at_ms=0,
        service_name=name,
        service_id="fallback",
        service_url=url,
        metadata={"source": "fallback"},
    )


class Mirror(RunsInBackground):
    """Local view of the registry of one namespace, kept current by Redis.

    ``fallbacks`` maps service names to static URLs that ``pick`` returns when
    no live instance is known (the seed's fallback pattern). ``picker``
    chooses among the live candidates (round-robin by default).
    ``read_from`` (``"master"`` or ``"replica"``) sets the URL's ``read_from``
    option (docs/DEPLOYMENT.md); it needs a Sentinel or Cluster URL.
    """

    def __init__(
        self,
        redis: RedisLike,
        *,
        namespace: str = "default",
        fallbacks: Mapping[str, str] | None = None,
        health_interval: float = 1.0,
        health_timeout: float = 3.0,
        canary_timeout: float = 3.5,
        resync_interval: float | None = None,
        rev_interval: float = 5.0,
        chunk_size: int = 1000,
        sync_timeout: float = 30.0,
        picker: Picker | None = None,
        strategy: Strategy = "round_robin",
        clock: Clock | None = None,
        read_from: ReadFrom | None = None,
    ) -> None:
        if read_from is not None:
            if not isinstance(redis, str):
                raise TypeError("read_from= needs a URL, not a client")
            redis = with_read_from(redis, read_from)
        self._redis = connect(redis, namespace=namespace)  # a Cluster: the {ns} slot's owner
        self._owns_client = isinstance(redis, str)
        self.keys = Keys(namespace, db_of(self._redis))
        self.fallbacks: dict[str, str] = dict(fallbacks or {})
        self.sync_timeout = sync_timeout
        self.view = View(picker, strategy)
        self._by_service = self.view.by_service
        self._round_robin = self.view.strategy == "round_robin"
        self._subscribers: list[ChangeStream] = []
        self._closed = False  # after aclose, a new changes() stream starts ended
        self._changed = anyio.Event()
        self._waiting = 0  # tasks in wait_for / wait_until
        self._watcher = Watcher(
            self._redis,
            self.keys,
            self.view,
            on_change=self._emit_all,
            on_state=self._wake_waiters,
            wants_changes=lambda: bool(self._subscribers),
            timing=Timing(ping_interval=health_interval, ping_timeout=health_timeout),
            canary_timeout=canary_timeout,
            resync_interval=resync_interval,
            rev_interval=rev_interval,
            chunk_size=chunk_size,
            clock=clock,
        )

    # -- settings and health (the watcher's) -------------------------------------------

    @property
    def stats(self) -> MirrorStats:
        return self._watcher.stats

    @property
    def health_interval(self) -> float:
        return self._watcher.timing.ping_interval

    @property
    def health_timeout(self) -> float:
        return self._watcher.timing.ping_timeout

    @property
    def canary_timeout(self) -> float:
        return self._watcher.canary_timeout

    @property
    def resync_interval(self) -> float | None:
        return self._watcher.resync_interval

    @property
    def rev_interval(self) -> float:
        return self._watcher.rev_interval

    @property
    def chunk_size(self) -> int:
        return self._watcher.chunk_size

    @property
    def epoch(self) -> str | None:
        return self._watcher.epoch

    @property
    def last_error(self) -> str | None:
        """Why the mirror last failed to follow Redis (None once it is back in sync)."""
        return self._watcher.last_error

    # -- reading -------------------------------------------------------------

    @property
    def has_synced(self) -> bool:
        """True once the first snapshot has been applied."""
        return self._watcher.synced

    synced = has_synced

    @property
    def stale(self) -> bool:
        """True while the view may lag Redis (disconnected, rebuilding, canary lost, refused)."""
        return self._watcher.stale

    def pick(
        self,
        name: str,
        capability: str | None = None,
        *,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> Instance:
        """Return a live, non-draining instance of ``name`` chosen by the strategy
        (smooth weighted round-robin by default, weights from metadata ``weight``).

        ``where`` keeps the instances whose metadata has all its pairs;
        ``prefer`` picks among those that also have its pairs, and among the
        rest when none does. Falls back to ``fallbacks[name]``; raises
        :class:`ServiceNotFound`.
        """
        snap = self._by_service.get(name)
        if snap is not None:
            if self._round_robin and where is None and prefer is None:
                sel = snap.select(capability, None)  # the hot path: a cached lookup
                if sel.candidates:
                    return sel.round_robin()
            else:
                found = self.view.pick_in(snap, capability, where, prefer)
                if found is not None:
                    return found
        url = self.fallbacks.get(name)
        if url is not None:
            return _fallback_instance(name, url)
        raise ServiceNotFound(name, capability)

    def instances(self, name: str, *, where: Mapping[str, str] | None = None) -> list[Instance]:
        """All known instances of ``name`` (matching ``where``), draining ones
        included, sorted by id."""
        return self.view.instances(name, where=where)

    def services(self) -> dict[str, list[Instance]]:
        """Every service with at least one instance, and its instances."""
        return self.view.services()

    def snapshot(self) -> dict[str, Instance]:
        """A copy of the whole view, keyed by Redis key."""
        return self.view.snapshot()

    def __len__(self) -> int:
        return len(self.view)

    async def wait_for(
        self,
        name: str,
        timeout: float = 10.0,  # noqa: ASYNC109 - the design's public signature
        capability: str | None = None,
    ) -> Instance:
        """Wait until a live instance of ``name`` is known and return it.

        Raises :class:`ServiceNotFound` after ``timeout`` seconds.
        """
        with anyio.move_on_after(timeout):
            while True:
                inst = self.view.pick(name, capability)
                if inst is not None:
                    return inst
                await self._wait_change()
        raise ServiceNotFound(name, capability)

    async def wait_until(
        self,
        predicate: Callable[[Mirror], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - mirrors wait_for
    ) -> None:
        """Wait until ``predicate(mirror)`` holds, re-checking after every change of the
        view and of ``stale``.

        Raises TimeoutError after ``timeout`` seconds.
        """
        with anyio.fail_after(timeout):
            while not predicate(self):
                await self._wait_change()

    def apply_own(self, key: str, inst: Instance | None, rev: int) -> bool:
        """Show a change this process's own registrar script just made at revision
        ``rev`` without waiting for its feed message, where the feed's order allows
        (see :meth:`Watcher.apply_own`); True when the view now shows it."""
        return self._watcher.apply_own(key, inst, rev)

    def changes(self) -> ChangeStream:
        """Every change applied to the view from this call on, as an async iterator.

        A consumer that falls :data:`CHANGE_BUFFER` changes behind gets
        :class:`ChangesOverflow`; the stream ends when the mirror closes.
        """
        stream = ChangeStream(self._forget)
        if self._closed:
            stream.end()  # no change will come: the stream ends instead of waiting forever
        else:
            self._subscribers.append(stream)
        return stream

    # -- lifecycle -------------------------------------------------------------

    def _start_timeout(self) -> float | None:
        return self.sync_timeout  # ``async with`` waits this long for the first snapshot

    async def aclose(self) -> None:
        self._closed = True
        for stream in self._subscribers:
            stream.end()
        self._subscribers.clear()
        await self._watcher.release()
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List, then watch, forever; reconnect and resync on any failure.

        ``task_status.started()`` once the first snapshot is applied, or once
        Redis refused the mirror (see ``last_error``). Never raises but on
        cancellation.
        """
        await self._watcher.run(task_status=task_status)

    # -- fan-out -------------------------------------------------------------------

    async def _wait_change(self) -> None:
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    def _wake_waiters(self) -> None:
        if not self._waiting:
            return  # nobody waits: no new Event per change (the hot path)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _forget(self, stream: ChangeStream) -> None:
        if stream in self._subscribers:
            self._subscribers.remove(stream)

    def _emit_all(self, changes: list[Change]) -> None:
        if changes:
            ended = [s for s in self._subscribers if not s.push(changes)]
            for stream in ended:
                # The consumer is too slow: its stream ended; it sees ChangesOverflow.
                self._subscribers.remove(stream)
        self._wake_waiters()


class SyncMirror:
    """The blocking twin of :class:`Mirror` for Flask, Django and scripts.

    The watch runs in a background thread; reads are the same dictionary
    lookups as the async mirror's and can be called from any thread.
    """

    def __init__(self, redis: str, **kwargs: Any) -> None:
        from ._portal import PortalOwner

        self._args = redis
        self._kwargs = kwargs
        self._owner = PortalOwner()
        self._mirror: Mirror | None = None

    @property
    def mirror(self) -> Mirror:
        if self._mirror is None:
            raise RuntimeError("SyncMirror is not started")
        return self._mirror

    def start(self) -> SyncMirror:
        if self._mirror is None:
            mirror = self._owner.build(lambda: Mirror(self._args, **self._kwargs))
            try:
                self._mirror = self._owner.enter(mirror)
            except BaseException:
                self._owner.stop()
                raise
        return self

    def close(self) -> None:
        if self._mirror is not None:
            self._mirror = None
            self._owner.stop()

    def __enter__(self) -> SyncMirror:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stale(self) -> bool:
        return self.mirror.stale

    @property
    def has_synced(self) -> bool:
        return self.mirror.has_synced

    def pick(
        self,
        name: str,
        capability: str | None = None,
        *,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> Instance:
        return self.mirror.pick(name, capability, where=where, prefer=prefer)

    def instances(self, name: str, *, where: Mapping[str, str] | None = None) -> list[Instance]:
        return self.mirror.instances(name, where=where)

    def services(self) -> dict[str, list[Instance]]:
        return self.mirror.services()

    def wait_for(self, name: str, timeout: float = 10.0, capability: str | None = None) -> Instance:
        return self._owner.call(self.mirror.wait_for, name, timeout, capability)

    @property
    def last_error(self) -> str | None:
        return self.mirror.last_error

    def snapshot(self) -> dict[str, Instance]:
        return self.mirror.snapshot()

    def __len__(self) -> int:
        return len(self.mirror)

    def changes(self) -> Iterator[Change]:
        """Every change applied to the view from this call on, as a blocking iterator.

        Each ``next()`` waits in the mirror's loop; ``close()`` the iterator to
        stop following. Ends when the mirror closes; raises
        :class:`ChangesOverflow` like the async stream.
        """
        # Subscribe now, not at the first next(): changes made in between are kept.
        stream = self._owner.build(self.mirror.changes)
        return self._follow(stream)

    def _follow(self, stream: ChangeStream) -> Iterator[Change]:
        async def next_change() -> Change | None:
            try:
                return await stream.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (change := self._owner.call(next_change)) is not None:
                yield change
        finally:
            if self._mirror is not None:
                self._owner.call(stream.aclose)
