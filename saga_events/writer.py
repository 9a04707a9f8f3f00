"""The write path of the REST API: a validated request becomes an applied event.

One job: turn "register / heartbeat / deregister this instance" into the
events an :class:`~saga_events.agent.Agent` would publish, checked by the
registrar's own rules (:func:`saga_events.model.decode_event`), applied by
the registrar's script (:meth:`Registrar.apply`), and answered once the
writer's view shows them. No HTTP here: the web routes and the test helpers
call it alike and translate its answers and :class:`WriteRejected` errors.

Contract:

* **Ids.** A registration without ``service_id`` gets
  :func:`saga_events.identity.stable_service_id` (the same name and URL give
  the same id, so re-registering refreshes instead of adding a twin).
* **Ordering** (HTTP writes have no agent incarnation):

  - A registration is sent without reading first, with ``after_newest`` and
    a new incarnation from a :class:`HybridClock` (``max(last + 1, now_ms *
    1000)``: never goes back). When Redis holds the instance, the script
    gives it the newest applied incarnation and the next ``seq``: an
    unchanged record is then a refresh (only the deadline moves, mirrors see
    nothing), a changed one an update. Only a tombstone newer than the clock
    makes that first attempt ``stale``; the writer then reads the record and
    tombstone and starts above the tombstone.
  - A DELETE of an instance Redis holds is applied with ``after_newest`` too.
  - A heartbeat carries exactly the newest applied ``(incarnation, seq)``
    (the registrar's order hash), so it only moves the deadline and never
    outranks the owner's own next event.
  - A write that still loses a race (``stale``) is retried from what Redis
    holds now, up to :data:`WRITE_RETRIES` attempts; within one writer,
    writes to one instance take turns. Losing every attempt is a
    ``conflict``, never a silent partial success.

* **Heartbeats never create.** A heartbeat acts only on instances in the
  view; one whose instance was reaped or removed between the view check and
  the apply is answered ``not_found`` (the seed's clients then register
  again). If the script recreated the record in that window, the writer
  removes it again at once (a tombstone), so nothing lives on from a
  heartbeat.
* **Read-your-writes** holds for reads through the *same* writer's view (the
  gateway's mirror): a register or DELETE returns only once that view shows
  it, or after ``write_timeout`` (counted in ``view_timeouts``). The script's
  reply carries the change's feed revision and the record as stored; when
  that revision is the very next one the view expects, the view shows it at
  once (:meth:`Mirror.apply_own`; its feed message is then a no-op), else
  the writer waits for the feed. Another gateway's view or a remote mirror
  catches up on its own schedule.

Redis commands it sends itself (besides the registrar's EVALSHA): ``MGET``
(record and tombstone, only after a stale attempt), ``HMGET`` (order hash),
``ZSCORE`` (deadlines), ``EXISTS`` (record, after a lost heartbeat race). One
writer lives on one event loop and is not thread-safe.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final, Literal

import anyio
import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from . import model
from ._redis import TRANSIENT
from ._write_events import HybridClock, announce_like, ordering, with_status
from .errors import InvalidEvent, SagaError
from .identity import stable_service_id
from .mirror import Mirror
from .registrar import ApplyResult, Registrar

log = logging.getLogger("saga_events.writer")

WRITE_RETRIES: Final = 8
#: Tries of a heartbeat on broken connections (the client's pool, the registrar's pipeline).
HEARTBEAT_ATTEMPTS: Final = 3

RejectKind = Literal["invalid", "oversized", "not_found", "conflict", "capped"]


class WriteRejected(SagaError):
    """A write the writer refuses: ``kind`` says which (the web maps it to a status),
    ``reason`` is the short code, ``detail`` a sentence about the caller's request."""

    def __init__(self, kind: RejectKind, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.reason = reason
        self.detail = detail


def not_found(name: str, service_id: str | None) -> WriteRejected:
    what = f"instance {service_id!r} of service {name!r}" if service_id else f"service {name!r}"
    return WriteRejected("not_found", "not_found", f"no live {what}")


@dataclass(frozen=True, slots=True)
class Registration:
    """What a register request asks for (already shaped, not yet validated)."""

    service_name: str
    service_url: str
    capabilities: tuple[str, ...] = ()
    service_id: str | None = None
    metadata: dict[str, str] | None = None
    ttl_ms: int = model.DEFAULT_TTL_MS


class Writer:
    """The one write path of the REST API for one registrar and one view.

    ``view`` must be a synced :class:`Mirror` of the same namespace on the same
    event loop (:meth:`follow_view` is no longer needed beside it).
    """

    def __init__(
        self, registrar: Registrar, view: Mirror, redis: Redis, *, write_timeout: float = 5.0
    ) -> None:
        self.registrar = registrar
        self.view = view
        self.redis = redis
        self.write_timeout = write_timeout
        self.clock = HybridClock()
        self.view_timeouts = 0
        self._locks: dict[tuple[str, str], tuple[anyio.Lock, int]] = {}

    # -- the view -------------------------------------------------------------------

    async def follow_view(self) -> None:
        """Kept for callers that run it beside the writer: the writer now waits on the
        view's own waiters (one wake-up less per write), so this only sleeps until
        cancelled."""
        await anyio.sleep_forever()

    async def _wait_view(self, done: Callable[[], bool]) -> bool:
        if done():
            return True
        try:
            await self.view.wait_until(lambda _view: done(), timeout=self.write_timeout)
            return True
        except TimeoutError:
            self.view_timeouts += 1
            return False

    def _show_own(self, name: str, service_id: str, result: ApplyResult) -> None:
        """Read-your-writes from the script's own reply: show the change in the view
        now, where the feed's order allows (see :meth:`Mirror.apply_own`); else the
        caller waits for the feed message as before."""
        if not result.rev:
            return
        inst: model.Instance | None = None
        if result.record is not None:
            try:
                inst = model.decode_instance(result.record)
            except msgspec.DecodeError:
                return
        self.view.apply_own(self.registrar.keys.inst(name, service_id), inst, result.rev)

    def viewed(self, name: str, service_id: str) -> model.Instance | None:
        for inst in self.view.instances(name):
            if inst.service_id == service_id:
                return inst
        return None

    @asynccontextmanager
    async def _serialized(self, name: str, service_id: str) -> AsyncIterator[None]:
        """One write at a time per instance: concurrent registers of one instance
        would otherwise keep losing races to each other."""
        key = (name, service_id)
        found = self._locks.get(key)
        # fast_acquire: an uncontended acquire does not yield to the loop (a turn per write)
        lock, users = found if found is not None else (anyio.Lock(fast_acquire=True), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    # -- reads ----------------------------------------------------------------------

    async def last_heartbeats(self, insts: list[model.Instance]) -> list[int | None]:
        """``deadline - ttl`` from the registrar's deadlines set; None where unknown.

        A read must not fail because Redis is slow, down or refuses (the view
        is served as it is): then the registration time stands in.
        """
        return (await self.read_heartbeats(insts))[0]

    async def read_heartbeats(self, insts: list[model.Instance]) -> tuple[list[int | None], bool]:
        """:meth:`last_heartbeats` in one ZSCORE pipeline, and whether Redis answered
        (within 0.5 s, without refusing)."""
        if not insts:
            return [], True
        keys = self.registrar.keys
        with anyio.move_on_after(0.5):
            try:
                pipe = self.redis.pipeline(transaction=False)
                for inst in insts:
                    pipe.zscore(keys.deadlines, keys.inst(inst.service_name, inst.service_id))
                scores = await pipe.execute()
                return [
                    None if s is None else int(s) - inst.ttl_ms
                    for s, inst in zip(scores, insts, strict=True)
                ], True
            except (*TRANSIENT, RedisError):  # down, or a role without ZSCORE
                pass
        return [None] * len(insts), False

    # -- writes ---------------------------------------------------------------------

    def check(self, event: model.Event) -> model.AnyEvent:
        """Run an event through the registrar's own validation (``model.decode_event``)."""
        raw = model.encode(event)
        try:
            return model.decode_event(raw, event.service_name, schemes=self.registrar.url_schemes)
        except InvalidEvent as exc:
            kind: RejectKind = "oversized" if exc.reason == "oversized" else "invalid"
            raise WriteRejected(kind, exc.reason, exc.detail) from None

    async def _stored(self, name: str, service_id: str) -> tuple[model.Instance | None, int]:
        """What Redis holds now: the record, and its tombstone's incarnation (0 if none)."""
        keys = self.registrar.keys
        rec, tomb = await self.redis.mget(keys.inst(name, service_id), keys.tomb(name, service_id))
        inst = None
        if rec is not None:
            try:
                inst = model.decode_instance(rec)
            except msgspec.DecodeError:
                inst = None  # unreadable: a fresh incarnation replaces it
        tomb_pair = ordering(tomb)
        return inst, tomb_pair[0] if tomb_pair else 0

    async def register(self, req: Registration) -> tuple[model.Instance, int]:
        """Register or refresh an instance; return it as the view shows it and Redis's time."""
        name = req.service_name
        sid = req.service_id or stable_service_id(name, req.service_url)
        # Checked before any Redis I/O: bad input is refused even while Redis is
        # down. Each attempt changes only the ordering fields.
        checked = self.check(
            model.Register(
                service_name=name,
                service_id=sid,
                incarnation=0,
                seq=0,
                service_url=req.service_url,
                capabilities=req.capabilities,
                metadata=dict(req.metadata or {}),
                ttl_ms=req.ttl_ms,
            )
        )
        assert isinstance(checked, model.Register)
        result: ApplyResult | None = None
        event: model.Announce | None = None
        async with self._serialized(name, sid):
            for attempt in range(WRITE_RETRIES + 1):
                if attempt == 0:
                    # No read first: with ``after_newest`` the script takes the stored
                    # pair when the instance is known, and a new instance starts from
                    # the clock. Only a tombstone newer than the clock (another
                    # writer's clock ahead, an agent's incarnation) makes it stale:
                    # then read what Redis holds and start above it.
                    inc, seq = self.clock.tick(), 1
                else:
                    if attempt > 1:  # lost a race: let the winner finish
                        await anyio.sleep(random.uniform(0, 0.002 * (attempt - 1)))
                    stored, tomb_inc = await self._stored(name, sid)
                    if stored is not None:
                        inc, seq = stored.incarnation, stored.seq + 1
                    else:
                        inc, seq = max(self.clock.tick(), tomb_inc + 1), 1
                event = msgspec.structs.replace(checked, incarnation=inc, seq=seq)
                result = await self.registrar.apply(event, after_newest=True)
                if result.status != "stale":
                    break
        if result is not None and result.status == "capped":  # the registrar's instance caps
            raise WriteRejected(
                "capped", "cap_refused", f"{name}: the registry's instance cap is reached"
            )
        if result is None or event is None or result.status == "stale":
            raise WriteRejected(
                "conflict",
                "conflict",
                f"instance {name}/{sid} is being changed by another writer; retry",
            )
        written = (result.incarnation, result.seq)
        refreshed = result.status == "refreshed"
        self._show_own(name, sid, result)

        def shown() -> bool:
            inst = self.viewed(name, sid)
            if inst is None:
                return False
            return refreshed or (inst.incarnation, inst.seq) >= written

        if not await self._wait_view(shown):
            log.warning("register %s/%s applied but not yet in the writer's view", name, sid)
        inst = self.viewed(name, sid)
        if inst is None:  # only after a view timeout: answer from the event itself
            inst = model.Instance(
                incarnation=event.incarnation,
                seq=event.seq,
                registered_at_ms=result.registered_at_ms,
                **msgspec.structs.asdict(model.body_of(event)),
            )
        return inst, result.now_ms

    def targets(self, name: str, service_id: str | None) -> list[model.Instance]:
        """The live instances a heartbeat or DELETE acts on; ``not_found`` when none."""
        insts = self.view.instances(name)
        if service_id is not None:
            insts = [i for i in insts if i.service_id == service_id]
        if not insts:
            raise not_found(name, service_id)
        return insts

    async def _newest_pairs(self, insts: list[model.Instance]) -> list[tuple[int, int]]:
        """The newest (incarnation, seq) applied to each instance: the order hash,
        or the record's own pair where the hash has none."""
        keys = self.registrar.keys
        raw = await self.redis.hmget(
            keys.order, [keys.inst(i.service_name, i.service_id) for i in insts]
        )
        return [
            ordering(value) or (inst.incarnation, inst.seq)
            for inst, value in zip(insts, raw, strict=True)
        ]

    async def heartbeat(
        self,
        name: str,
        service_id: str | None,
        status: Literal["failing", "passing"] | None = None,
        reason: str = "",
    ) -> tuple[list[str], int]:
        """Move the deadline of the live instances of ``name`` (or only ``service_id``).

        ``status`` (a health report from a non-Python service): ``failing``
        stores the instance draining with ``metadata["health"] = "failing:
        <reason>"``, ``passing`` serving again without it (then the heartbeat is
        an update, with the next seq). Returns the ids kept alive and Redis's
        time; ``not_found`` when none is live (also when the reaper or a DELETE
        won the race with this heartbeat).
        """
        targets = self.targets(name, service_id)
        for attempt in range(HEARTBEAT_ATTEMPTS):
            try:
                results = await self._apply_heartbeats(targets, status, reason)
                break
            except (RedisConnectionError, ConnectionError):
                # A connection dead since its last use (Redis restarted) fails even
                # seconds after Redis is back, and a seed-style client loses half its
                # ttl per lost heartbeat: close the idle ones, try again (safe: a
                # heartbeat re-reads the newest pair and only moves the deadline).
                if attempt == HEARTBEAT_ATTEMPTS - 1:
                    raise
                log.debug("heartbeat of %s: a connection broke; again", name)
                pool = getattr(self.redis, "connection_pool", None)  # a Cluster: none
                if pool is not None:
                    await pool.disconnect(inuse_connections=False)
        kept: list[str] = []
        for inst, res in zip(targets, results, strict=True):
            if res.status == "created":
                # Reaped or removed after the view check: a heartbeat must not bring
                # it back (it carries no owner's word). Remove it again at once.
                await self.registrar.apply(
                    model.Leave(
                        service_name=name,
                        service_id=inst.service_id,
                        incarnation=res.incarnation,
                        seq=res.seq + 1,
                    )
                )
            elif res.status == "stale":
                # A newer event (an agent's update) or a tombstone won: alive only
                # if the record is still there.
                keys = self.registrar.keys
                if await self.redis.exists(keys.inst(name, inst.service_id)):
                    kept.append(inst.service_id)
            else:
                kept.append(inst.service_id)
        if not kept:
            raise not_found(name, service_id)
        return kept, max(r.now_ms for r in results)

    async def _apply_heartbeats(
        self,
        targets: list[model.Instance],
        status: Literal["failing", "passing"] | None,
        reason: str,
    ) -> list[ApplyResult]:
        pairs = await self._newest_pairs(targets)
        events = [
            self.check(with_status(announce_like(i, model.Heartbeat, inc, seq), status, reason))
            for i, (inc, seq) in zip(targets, pairs, strict=True)
        ]
        return await self.registrar.apply_many(events)

    async def deregister(self, name: str, service_id: str | None) -> list[str]:
        """Remove the live instances of ``name`` (or only ``service_id``); return the ids
        removed, once the view no longer shows them."""
        targets = self.targets(name, service_id)
        removed: list[str] = []
        lost: list[str] = []
        for inst in targets:
            current: model.Instance | None = inst
            for attempt in range(WRITE_RETRIES):
                assert current is not None
                if attempt:
                    await anyio.sleep(random.uniform(0, 0.002 * attempt))
                leave = model.Leave(
                    service_name=name,
                    service_id=current.service_id,
                    incarnation=current.incarnation,
                    seq=current.seq + 1,
                )
                result = await self.registrar.apply(self.check(leave), after_newest=True)
                if result.status != "stale":
                    self._show_own(name, current.service_id, result)
                    removed.append(current.service_id)
                    break
                current, _tomb = await self._stored(name, inst.service_id)
                if current is None:
                    removed.append(inst.service_id)
                    break
            else:  # lost the race every time: say so, never a silent partial success
                lost.append(inst.service_id)
        if lost:
            done = f"; removed: {', '.join(sorted(removed))}" if removed else ""
            raise WriteRejected(
                "conflict",
                "conflict",
                f"{name}: instance {', '.join(lost)} is being changed by another writer "
                f"and was not removed{done}; retry",
            )
        gone = set(removed)

        def shown() -> bool:
            return not any(i.service_id in gone for i in self.view.instances(name))

        if not await self._wait_view(shown):
            log.warning("deregister of %s applied but still in the writer's view", name)
        return sorted(removed)
