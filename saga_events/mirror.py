"""The mirror: a local, push-updated copy of the registry.

Consistency contract (after client-go's SharedInformer):

* ``async with Mirror(...)`` (or ``await tg.start(mirror.run)``) returns once
  the first snapshot is applied: ``has_synced`` is then True for good.
* Reads (``pick``, ``instances``, ``services``) are plain dictionary lookups
  that never touch the network and never block. They can be called from any
  thread.
* The view follows Redis by keyspace notifications: subscribe first, then
  snapshot the index, then apply what was notified meanwhile, then watch. Each
  record key converges to Redis's value; changes to one key are seen in the
  order Redis made them, though intermediate versions may be skipped.
* On a disconnect, a silent subscription, a lost canary or a new epoch the
  mirror sets ``stale``, keeps serving its last view unchanged, and resyncs
  (list, then watch again), emitting only the differences as changes. While
  a registrar rebuilds a restarted Redis, the old view is served as stale
  until the rebuild is ready, so callers never see the registry vanish.
* ``changes()`` yields ``Added``/``Updated``/``Removed`` in the order they are
  applied to the view; a resync yields the differences only.
"""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import msgspec
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import _wire, model
from ._redis import TRANSIENT, Backoff, RedisLike, close_quietly, connect, db_of
from .errors import ServiceNotFound
from .keys import Keys
from .model import Instance

log = logging.getLogger("saga_events.mirror")

_REMOVE_EVENTS: Final = frozenset({b"del", b"expired", b"evicted"})
_SUBSCRIBE_REPLIES: Final = frozenset({b"subscribe", b"psubscribe"})
CHANGE_BUFFER: Final = 10_000
MAX_SHARED_CAPABILITY_SETS: Final = 4096


class Added(msgspec.Struct, frozen=True):
    """An instance appeared."""

    instance: Instance


class Updated(msgspec.Struct, frozen=True):
    """An instance's record changed (URL, capabilities, metadata, draining, restart)."""

    instance: Instance
    previous: Instance


class Removed(msgspec.Struct, frozen=True):
    """An instance left, expired or was reaped."""

    instance: Instance


Change = Added | Updated | Removed


class ChangesOverflow(Exception):
    """Raised in a ``changes()`` consumer that fell more than the buffer behind."""


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


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class ChangeStream:
    """The async iterator returned by :meth:`Mirror.changes`; close it with ``aclose()``
    or use it as an async context manager."""

    def __init__(
        self,
        mirror: Mirror,
        send: MemoryObjectSendStream[Change],
        receive: MemoryObjectReceiveStream[Change],
    ) -> None:
        self._mirror = mirror
        self._send = send
        self._receive = receive

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            if self._send in self._mirror._overflowed:
                raise ChangesOverflow(f"consumer fell {CHANGE_BUFFER} changes behind") from None
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._mirror._forget(self._send)
        self._receive.close()

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Resync(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class Mirror:
    """Local view of the registry of one namespace, kept current by Redis.

    ``fallbacks`` maps service names to static URLs that ``pick`` returns when
    no live instance is known (the seed's fallback pattern).
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
        chunk_size: int = 1000,
        sync_timeout: float = 30.0,
    ) -> None:
        self._redis = connect(redis)
        self._owns_client = isinstance(redis, str)
        self.keys = Keys(namespace, db_of(self._redis))
        self.fallbacks: dict[str, str] = dict(fallbacks or {})
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.canary_timeout = canary_timeout
        self.resync_interval = resync_interval
        self.chunk_size = chunk_size
        self.sync_timeout = sync_timeout
        self.stats = MirrorStats()
        self.epoch: str | None = None
        self._records: dict[str, Instance] = {}
        self._by_service: dict[str, dict[str, Instance]] = {}
        self._live: dict[str, tuple[Instance, ...]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._shared_caps: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._synced = False
        self._stale = True
        self._connected = False
        self._subscribers: list[MemoryObjectSendStream[Change]] = []
        self._overflowed: set[MemoryObjectSendStream[Change]] = set()
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        # The connection the watch's GETs go out on (hand-packed, see _wire).
        self._pipe = _wire.Pipe(self._redis)

    # -- reading -------------------------------------------------------------

    @property
    def has_synced(self) -> bool:
        """True once the first snapshot has been applied."""
        return self._synced

    synced = has_synced

    @property
    def stale(self) -> bool:
        """True while the view may lag Redis (disconnected, rebuilding, canary lost)."""
        return self._stale

    def pick(self, name: str, capability: str | None = None) -> Instance:
        """Return a live, non-draining instance of ``name``, round-robin.

        Falls back to ``fallbacks[name]``; raises :class:`ServiceNotFound`.
        """
        live = self._live.get(name)
        if live and capability is not None:
            live = tuple(i for i in live if capability in i.capabilities)
        if live:
            return live[next(self._rr[name]) % len(live)]
        url = self.fallbacks.get(name)
        if url is not None:
            return _fallback_instance(name, url)
        raise ServiceNotFound(name, capability)

    def instances(self, name: str) -> list[Instance]:
        """All known instances of ``name``, draining ones included, sorted by id."""
        return sorted(self._by_service.get(name, {}).values(), key=lambda i: i.service_id)

    def services(self) -> dict[str, list[Instance]]:
        """Every service with at least one instance, and its instances."""
        return {name: self.instances(name) for name in sorted(self._by_service)}

    def snapshot(self) -> dict[str, Instance]:
        """A copy of the whole view, keyed by Redis key."""
        return dict(self._records)

    def __len__(self) -> int:
        return len(self._records)

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
                live = self._live.get(name, ())
                if any(i.has_capability(capability) for i in live):
                    return self.pick(name, capability)
                await self._changed.wait()
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
                await self._changed.wait()

    def changes(self) -> ChangeStream:
        """Every change applied to the view from this call on, as an async iterator.

        A consumer that falls :data:`CHANGE_BUFFER` changes behind gets
        :class:`ChangesOverflow`; the stream ends when the mirror closes.
        """
        send, receive = anyio.create_memory_object_stream[Change](CHANGE_BUFFER)
        self._subscribers.append(send)
        return ChangeStream(self, send, receive)

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Mirror:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            with anyio.fail_after(self.sync_timeout):
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
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        await self._pipe.release()
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List, then watch, forever; reconnect and resync on any failure."""
        backoff = Backoff(cap=2.0)
        started = False

        def synced() -> None:
            nonlocal started
            backoff.reset()
            if not started:
                started = True
                task_status.started()

        while True:
            pubsub = self._redis.pubsub()
            try:
                await self._session(pubsub, synced)
            except TRANSIENT as exc:
                self.stats.reconnects += 1
                if self._connected or not self._stale:
                    log.warning("mirror lost Redis (%s); serving the last view as stale", exc)
            finally:
                self._connected = False
                self._set_stale(True)
                await close_quietly(pubsub)
                await self._pipe.release()
            await anyio.sleep(backoff.next())

    # -- the watch -------------------------------------------------------------

    async def _session(self, pubsub: aioredis.client.PubSub, on_synced: Callable[[], None]) -> None:
        k = self.keys
        await pubsub.psubscribe(k.inst_notifications, k.registrar_notifications)
        await pubsub.subscribe(k.epoch_notifications)
        pending: list[Any] = []
        confirmed = 0
        with anyio.fail_after(self.health_timeout + 2):
            while confirmed < 3:
                reply = await pubsub.parse_response(block=False, timeout=self.health_timeout)
                if reply is None:
                    raise TimeoutError("no subscription confirmation")
                if isinstance(reply, list) and reply[0] in _SUBSCRIBE_REPLIES:
                    confirmed += 1
                else:
                    pending.append(reply)
        self._connected = True
        self._last_rx = anyio.current_time()
        self._last_ping = self._last_rx
        self._last_canary = self._last_rx
        self._canary_lost = False

        if self._synced:
            # A resync after a gap: if Redis restarted empty, wait for the
            # registrar's rebuild instead of showing an empty registry.
            await self._wait_until_epoch_ready(pubsub, pending)
        else:
            self.epoch = await self._get_epoch()
        await self._resync("connect")
        if pending:
            try:
                await self._handle(pending)
            except _Resync as exc:
                await self._after_epoch_change(pubsub, exc.reason)
        on_synced()
        last_resync = anyio.current_time()
        subscription = _wire.Subscription(pubsub)
        while True:
            batch = await subscription.read(self.health_interval, 1024)
            now = anyio.current_time()
            if batch:
                self._last_rx = now
                try:
                    await self._handle(batch)
                except _Resync as exc:
                    await self._after_epoch_change(pubsub, exc.reason)
                    last_resync = anyio.current_time()
            await self._check_health(pubsub, now)
            if now - self._last_canary > self.canary_timeout:
                if not self._canary_lost:
                    self._canary_lost = True
                    self._set_stale(True)
                    log.warning(
                        "no registrar liveness for %.1f s: notifications may be off or no "
                        "registrar runs; resyncing and serving as stale",
                        now - self._last_canary,
                    )
                    await self._resync("canary lost", keep_stale=True)
            if self.resync_interval is not None and now - last_resync >= self.resync_interval:
                last_resync = now
                await self._resync("periodic", keep_stale=self._canary_lost)

    async def _check_health(self, pubsub: aioredis.client.PubSub, now: float) -> None:
        if now - self._last_rx > self.health_timeout:
            raise TimeoutError(f"subscription silent for {now - self._last_rx:.1f} s")
        if now - self._last_ping >= self.health_interval and now - self._last_rx >= (
            self.health_interval
        ):
            self._last_ping = now
            await pubsub.ping()

    async def _get_epoch(self) -> str | None:
        raw = await self._redis.get(self.keys.epoch)
        return _text(raw) if raw is not None else None

    async def _wait_until_epoch_ready(
        self, pubsub: aioredis.client.PubSub, pending: list[Any]
    ) -> None:
        while True:
            epoch = await self._get_epoch()
            if epoch is not None and not epoch.endswith(":rebuilding"):
                self.epoch = epoch
                return
            # Wait for the epoch key to change; everything else can wait for the
            # snapshot that follows (pending record notifications are re-read).
            pending.clear()
            while True:
                reply = await pubsub.parse_response(block=False, timeout=self.health_interval)
                now = anyio.current_time()
                if reply is not None:
                    self._last_rx = now
                    if isinstance(reply, list) and reply[0] == b"message":
                        break
                await self._check_health(pubsub, now)

    async def _after_epoch_change(self, pubsub: aioredis.client.PubSub, reason: str) -> None:
        self._set_stale(True)
        pending: list[Any] = []
        await self._wait_until_epoch_ready(pubsub, pending)
        await self._resync(reason)

    async def _handle(self, batch: Iterable[Any]) -> None:
        prefix = self.keys.keyspace_prefix.encode()
        inst_prefix = prefix + self.keys.inst_prefix.encode()
        to_get: dict[str, None] = {}
        to_remove: dict[str, None] = {}
        epoch_changed = False
        for reply in batch:
            if not isinstance(reply, list):
                continue  # PONG
            kind = reply[0]
            if kind == b"pmessage":
                channel, data = reply[2], reply[3]
                if channel.startswith(inst_prefix):
                    self.stats.record_notifications += 1
                    key = channel[len(prefix) :].decode("utf-8", "replace")
                    if self.keys.parse_inst(key) is None:
                        continue
                    if data == b"set":
                        to_remove.pop(key, None)
                        to_get[key] = None
                    elif data in _REMOVE_EVENTS:
                        to_get.pop(key, None)
                        to_remove[key] = None
                    # 'expire' on a record is a backstop refresh: nothing to do.
                else:
                    self.stats.canary_notifications += 1
                    self._last_canary = anyio.current_time()
                    if self._canary_lost:
                        self._canary_lost = False
                        log.info("registrar liveness is back; resyncing")
                        await self._resync("canary back")
            elif kind == b"message":
                self.stats.epoch_notifications += 1
                epoch_changed = True
            # pong and (p)subscribe confirmations need nothing.
        if to_get:
            keys = list(to_get)
            self.stats.gets += len(keys)
            pack = _wire.pack_command
            values = await self._pipe.execute(b"".join([pack(("GET", k)) for k in keys]), len(keys))
            for value in values:
                if isinstance(value, Exception):
                    raise value
            for key, raw in zip(keys, values, strict=True):
                self._put(key, raw)
        for key in to_remove:
            self._remove(key)
        if epoch_changed:
            epoch = await self._get_epoch()
            if epoch != self.epoch:
                raise _Resync(f"epoch {epoch}")

    async def _resync(self, reason: str, *, keep_stale: bool = False) -> None:
        """List the registry and make the view equal to it, emitting differences."""
        self.stats.snapshots += 1
        if self._synced:
            self.stats.resyncs += 1
        members = sorted(_text(m) for m in await self._redis.smembers(self.keys.index))
        fresh: dict[str, Instance] = {}
        pipe = self._redis.pipeline(transaction=False)
        chunks = [members[i : i + self.chunk_size] for i in range(0, len(members), self.chunk_size)]
        for chunk in chunks:
            pipe.mget(chunk)
        for chunk, values in zip(chunks, await pipe.execute() if chunks else [], strict=True):
            for key, raw in zip(chunk, values, strict=True):
                inst = self._decode(key, raw)
                if inst is not None:
                    fresh[key] = inst
        self.stats.snapshot_records += len(fresh)
        for key in list(self._records):
            if key not in fresh:
                self._remove(key)
        # Reindex each service once, not once per instance: a snapshot of N
        # instances would otherwise sort every service's group N times.
        touched: set[str] = set()
        for key, inst in fresh.items():
            self._store(key, inst, touched)
        for name in touched:
            self._reindex(name)
        if touched:
            self._wake_waiters()
        self._synced = True
        if not keep_stale:
            self._set_stale(False)
        log.debug("mirror synced (%s): %d instances", reason, len(fresh))

    # -- applying to the view ----------------------------------------------------

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
        return self._share(inst)

    def _share(self, inst: Instance) -> Instance:
        """Let instances share one copy of their (immutable) service name and
        capability tuple: ~200 bytes less per instance in a large view."""
        name = sys.intern(inst.service_name)
        caps = self._shared_caps.get(inst.capabilities)
        if caps is None:
            caps = tuple(sys.intern(c) for c in inst.capabilities)
            if len(self._shared_caps) < MAX_SHARED_CAPABILITY_SETS:
                self._shared_caps[caps] = caps
        if name is inst.service_name and caps is inst.capabilities:
            return inst
        return msgspec.structs.replace(inst, service_name=name, capabilities=caps)

    def _put(self, key: str, raw: bytes | None) -> None:
        inst = self._decode(key, raw)
        if inst is None:
            self._remove(key)
        else:
            self._store(key, inst)

    def _store(self, key: str, inst: Instance, touched: set[str] | None = None) -> None:
        """Put ``inst`` in the view; with ``touched``, leave reindexing and waking
        waiters to the caller and add the service name to ``touched``."""
        old = self._records.get(key)
        if old == inst:
            return
        self._records[key] = inst
        self._by_service.setdefault(inst.service_name, {})[inst.service_id] = inst
        if touched is None:
            self._reindex(inst.service_name)
        else:
            touched.add(inst.service_name)
        self._emit(Added(inst) if old is None else Updated(inst, old), wake=touched is None)

    def _remove(self, key: str) -> None:
        old = self._records.pop(key, None)
        if old is None:
            return
        group = self._by_service.get(old.service_name, {})
        group.pop(old.service_id, None)
        if not group:
            self._by_service.pop(old.service_name, None)
        self._reindex(old.service_name)
        self._emit(Removed(old))

    def _reindex(self, name: str) -> None:
        group = self._by_service.get(name)
        live = tuple(
            sorted(
                (i for i in (group or {}).values() if not i.draining), key=lambda i: i.service_id
            )
        )
        if live:
            self._live[name] = live
            self._rr.setdefault(name, itertools.count())
        else:
            self._live.pop(name, None)

    def _set_stale(self, stale: bool) -> None:
        if stale != self._stale:
            self._stale = stale
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    def _forget(self, send: MemoryObjectSendStream[Change]) -> None:
        if send in self._subscribers:
            self._subscribers.remove(send)
        self._overflowed.discard(send)
        send.close()

    def _emit(self, change: Change, *, wake: bool = True) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(change)
            except anyio.WouldBlock:
                # The consumer is too slow: end its stream; it sees ChangesOverflow.
                send.close()
                self._subscribers.remove(send)
                self._overflowed.add(send)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(send)
        if wake:
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

    def pick(self, name: str, capability: str | None = None) -> Instance:
        return self.mirror.pick(name, capability)

    def instances(self, name: str) -> list[Instance]:
        return self.mirror.instances(name)

    def services(self) -> dict[str, list[Instance]]:
        return self.mirror.services()

    def wait_for(self, name: str, timeout: float = 10.0, capability: str | None = None) -> Instance:
        return self._owner.call(self.mirror.wait_for, name, timeout, capability)
