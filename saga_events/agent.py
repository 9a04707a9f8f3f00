"""The agent: announces one instance, heartbeats it, and says leave on exit.

Contract: an agent never blocks or raises into its host service. Whatever
Redis does (down, no registrar listening, a refusal such as NOPERM,
READONLY or MOVED), it logs (rate-limited), reports it through
``registered`` (False while no registrar confirmed the last announcement)
and ``last_error`` (the newest unresolved problem, None when all is well),
keeps what still works (heartbeats by PUBLISH when only the control channel
is refused) and retries with backoff. It re-announces at once when a
registrar asks (after finding Redis empty) and after any reconnect. Only bad
input raises: :class:`InvalidEvent`, from the constructor and ``update``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.exceptions import RedisError

from . import connection, identity, model, topology
from ._lifecycle import RunsInBackground
from ._portal import PortalOwner
from ._redis import TRANSIENT, Backoff, RedisLike, connect
from .health import HealthCheck, HealthGate
from .keys import Keys

log = logging.getLogger("saga_events.agent")

#: A problem that stays the same is logged again at most this often (seconds).
REPEAT_LOG_EVERY = 60.0

#: Backoff after Redis *refused* a command (an ACL, a replica, a cluster
#: redirect): the cause is a configuration that changes slowly.
REFUSED_BACKOFF_CAP = 30.0

default_service_id = identity.process_service_id
"""An id for this process's instance (kept for callers of the old name)."""


def describe(exc: BaseException) -> str:
    """An exception as one line, with its type (some have an empty message)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Problems:
    """The unresolved problems of one agent, by part (``publish``, ``control``).

    A new or changed problem is logged at once; the same problem again at most
    every :data:`REPEAT_LOG_EVERY` seconds; a resolved one once at info level.
    """

    def __init__(self, who: str) -> None:
        self._who = who
        self._current: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}

    @property
    def last(self) -> str | None:
        """The newest unresolved problem, as ``"<part>: <message>"``; None if none."""
        if not self._current:
            return None
        part, message = next(reversed(self._current.items()))
        return f"{part}: {message}"

    def get(self, part: str) -> str | None:
        return self._current.get(part)

    def report(self, part: str, message: str, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        previous = self._current.pop(part, None)
        self._current[part] = message  # re-inserted: the newest is last
        if previous != message or now - self._logged_at.get(part, 0.0) >= REPEAT_LOG_EVERY:
            self._logged_at[part] = now
            log.log(level, "%s: %s: %s; will keep retrying", self._who, part, message)

    def clear(self, part: str) -> None:
        if self._current.pop(part, None) is not None:
            self._logged_at.pop(part, None)
            log.info("%s: %s works again", self._who, part)


class Agent(RunsInBackground):
    """Announce one service instance for as long as the ``async with`` block runs.

    ``ttl`` is in seconds (default 60, as in the seed); heartbeats go every
    ttl/3 with ±10 % jitter. Leaving the block sends ``leave``. The default
    ``service_id`` names this process (:func:`identity.process_service_id`):
    two workers of one app are two instances.
    """

    def __init__(
        self,
        redis: RedisLike,
        service_name: str,
        service_url: str,
        *,
        capabilities: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        ttl: float = 60.0,
        service_id: str | None = None,
        namespace: str = "default",
        url_schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES,
        first_announce_timeout: float = 5.0,
        health_check: HealthCheck | None = None,
        health_timeout: float = 2.0,
        health_executor: concurrent.futures.Executor | None = None,
    ) -> None:
        # Run before each heartbeat; failing announces draining (see saga_events.health).
        self.health = (
            None
            if health_check is None
            else HealthGate(health_check, health_timeout, health_executor)
        )
        self.service_id = service_id or identity.process_service_id()
        self.service_name = service_name
        self.url_schemes = url_schemes
        self.ttl_ms = round(ttl * 1000)
        # Bad input fails here, in the caller, by the registrar's own rules.
        self._check(service_url, tuple(capabilities), dict(metadata or {}))
        self.keys = Keys(namespace)
        self._redis = connect(redis, namespace=namespace)  # a Cluster: the {ns} slot's owner
        self._owns_client = isinstance(redis, str)
        self.service_url = service_url
        self.capabilities = tuple(capabilities)
        self.metadata = dict(metadata or {})
        self.first_announce_timeout = first_announce_timeout
        self.incarnation = model.new_incarnation()
        self.seq = 0
        # The seq of the last change of the announced content and that content:
        # every announce says ``since`` (model.Announce), so a registrar can apply
        # an unchanged heartbeat as a deadline touch.
        self._since = 0
        self._content: tuple[Any, ...] | None = None
        self.draining = False
        self.registered = False
        self.left = False
        self.announcements = 0
        self._refused = False  # the last PUBLISH was refused (not an outage)
        self._problems = Problems(f"{service_name}/{self.service_id}")
        self._wake = anyio.Event()
        self._channel = self.keys.events(service_name)

    def _check(self, url: str, capabilities: tuple[str, ...], metadata: dict[str, str]) -> None:
        """Raise :class:`InvalidEvent` unless the registrar would accept this record."""
        identity.check_announce(
            self.service_name,
            self.service_id,
            url,
            capabilities,
            metadata,
            self.ttl_ms,
            schemes=self.url_schemes,
        )

    @property
    def interval(self) -> float:
        """Seconds between heartbeats (ttl/3)."""
        return self.ttl_ms / 3000

    @property
    def last_error(self) -> str | None:
        """The newest unresolved problem (``"publish: ..."``, ``"control: ..."``); None if none.

        ``publish`` problems keep the instance unregistered (Redis down, the
        PUBLISH refused, no registrar listening); a ``control`` problem (the
        control channel refused) leaves heartbeats working but the agent does
        not hear a registrar's request to re-announce after an empty restart
        (its next heartbeat, at most ttl/3 later, restores the record).
        """
        return self._problems.last

    # -- events ------------------------------------------------------------------

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        return self.incarnation, self.seq

    def _announce_event(self, kind: str) -> model.Announce:
        inc, seq = self._next()
        cls: type[model.Announce]
        health = self.health
        if self.draining or (health is not None and health.failure is not None):
            cls = model.Drain
        elif kind == "register":
            cls = model.Register
        else:
            cls = model.Heartbeat
        metadata = self.metadata if health is None else health.metadata(self.metadata)
        content = (cls is model.Drain, self.service_url, self.capabilities, metadata, self.ttl_ms)
        if content != self._content:
            # A change (or the first announce): since is this seq. A re-register of
            # the same content is no change.
            self._content = (content[0], content[1], content[2], dict(metadata), content[4])
            self._since = seq
        return cls(
            service_name=self.service_name,
            service_id=self.service_id,
            incarnation=inc,
            seq=seq,
            service_url=self.service_url,
            capabilities=self.capabilities,
            metadata=metadata,
            ttl_ms=self.ttl_ms,
            since=self._since,
        )

    async def _publish(self, event: model.Event) -> bool:
        """PUBLISH one event; True if a registrar received it. Never raises for Redis."""
        try:
            # Routed (topology.publish): a count of 0 re-resolves the registry's node.
            receivers = await topology.publish(self._redis, self._channel, model.encode(event))
        except TRANSIENT as exc:
            self._refused = False
            self._problems.report("publish", f"cannot reach Redis ({describe(exc)})")
            self.registered = False
            return False
        except RedisError as exc:  # NOPERM, READONLY, MOVED, any other refusal
            self._refused = True
            self._problems.report(
                "publish", f"Redis refused PUBLISH ({describe(exc)})", logging.ERROR
            )
            self.registered = False
            return False
        self._refused = False
        if receivers == 0:
            self._problems.report("publish", "no registrar is listening")
            self.registered = False
            return False
        if not self.registered:
            log.info("%s/%s announced", self.service_name, self.service_id)
        self._problems.clear("publish")
        self.registered = True
        self.announcements += 1
        return True

    async def announce(self, kind: str = "heartbeat") -> bool:
        """Publish the current record now; True if a registrar received it.

        After :meth:`leave` this registers the instance again (heartbeats resume).
        """
        self.left = False
        return await self._publish(self._announce_event(kind))

    async def update(
        self,
        *,
        service_url: str | None = None,
        capabilities: Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Change the record and announce the change at once.

        Raises :class:`InvalidEvent`, changing nothing, for what ``__init__`` refuses.
        """
        url = self.service_url if service_url is None else service_url
        caps = self.capabilities if capabilities is None else tuple(capabilities)
        meta = self.metadata if metadata is None else dict(metadata)
        self._check(url, caps, meta)
        self.service_url, self.capabilities, self.metadata = url, caps, meta
        return await self.announce()

    async def drain(self) -> bool:
        """Stay registered but take no new traffic: ``pick`` skips this instance."""
        self.draining = True
        return await self.announce()

    async def leave(self) -> bool:
        """Tell the registrar this instance is gone; True if a registrar received it.

        Heartbeats stop until :meth:`announce` or :meth:`update` registers again.
        """
        self.left = True
        inc, seq = self._next()
        event = model.Leave(
            service_name=self.service_name, service_id=self.service_id, incarnation=inc, seq=seq
        )
        ok = await self._publish(event)
        self.registered = False
        return ok

    # -- lifecycle -------------------------------------------------------------------

    async def _after_run(self) -> None:
        if not self.left:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                try:
                    await self.leave()
                except Exception:  # a bug must not raise out of the host's `async with`
                    log.exception("%s/%s: leave failed", self.service_name, self.service_id)

    async def aclose(self) -> None:
        if self.health is not None:
            self.health.close()
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        """Announce and heartbeat until cancelled (does not send ``leave``). Never raises.

        Signals started after the first announcement attempt, whether it
        reached a registrar or not (bounded by ``first_announce_timeout``).
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._control_loop)
            ok = False  # stays False if the first attempt times out
            with anyio.move_on_after(self.first_announce_timeout):
                await self._incarnation_from_redis_clock()
                ok = await self._announce_safely("register")
            task_status.started()
            await self._heartbeat_loop(ok)

    async def _incarnation_from_redis_clock(self) -> None:
        # The incarnation orders this run after every earlier run of the same
        # service_id, tombstones included. Taken from the host clock, a clock
        # that stepped back (NTP) would make a restarted instance look older
        # than its own tombstone and hide it until the tombstone expires; so
        # use Redis's clock, shared by every run. The host clock stays the
        # fallback when TIME is refused (an ACL without +time) or Redis is down.
        if self.seq:
            return  # already announced: the incarnation must not change mid-run
        try:
            sec, usec = await self._redis.time()
        except (*TRANSIENT, RedisError) as exc:
            log.debug("cannot read Redis TIME (%s); incarnation from the host clock", exc)
            return
        self.incarnation = model.new_incarnation(sec * 1000 + usec // 1000)

    async def _announce_safely(self, kind: str) -> bool:
        """:meth:`announce` for the background loop: a bug is logged and retried, not raised."""
        try:
            return await self.announce(kind)
        except Exception as exc:  # a bug must not end the host's task group either
            log.exception("%s/%s: announcement failed", self.service_name, self.service_id)
            self._problems.report("publish", f"unexpected error ({describe(exc)})")
            self.registered = self._refused = False
            return False

    def request_announce(self) -> None:
        """Ask the heartbeat loop to send a full ``register`` now."""
        self._wake.set()

    async def _heartbeat_loop(self, ok: bool) -> None:
        outage = Backoff(base=0.2, cap=min(self.interval, 5.0))
        refused = Backoff(base=1.0, cap=REFUSED_BACKOFF_CAP)
        kind = "heartbeat" if ok else "register"
        while True:
            if ok:
                outage.reset()
                refused.reset()
                delay = self.interval * random.uniform(0.9, 1.1)
            else:
                delay = refused.next() if self._refused else outage.next()
            with anyio.move_on_after(delay):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
                kind = "register"
            if self.left:
                ok = True  # left on purpose: stay quiet until announced again
                continue
            if self.health is not None:
                await self.health.run()  # never raises: a failure drains the announce
            ok = await self._announce_safely(kind)
            kind = "heartbeat" if ok else "register"

    async def _control_loop(self) -> None:
        lost = False

        async def on_connect(sub: connection.Subscription) -> None:
            nonlocal lost
            self._problems.clear("control")
            if lost:
                self.request_announce()  # re-announce at once after a reconnect
            lost = False

        async def on_batch(batch: list[Any]) -> None:
            for reply in batch:
                if reply[0] == b"message" and reply[2] == b"reannounce":
                    # Spread the burst of re-announcements over a short window.
                    await anyio.sleep(random.uniform(0, min(self.interval, 2.0)))
                    self.request_announce()

        def on_error(exc: BaseException) -> None:
            nonlocal lost
            lost = True
            if connection.is_transient(exc):
                return  # an outage: the publish side reports it
            if isinstance(exc, RedisError):  # NOPERM on the channel, READONLY, MOVED, ...
                self._problems.report(
                    "control",
                    f"Redis refused the control channel ({describe(exc)}); heartbeats go on",
                    logging.ERROR,
                )
            else:  # a bug (logged by run_forever) must not end the host's task group either
                self._problems.report("control", f"unexpected error ({describe(exc)})")

        await connection.consume(
            self._redis,
            name=f"agent {self.service_name}/{self.service_id} control channel",
            channels=(self.keys.control,),
            on_connect=on_connect,
            on_batch=on_batch,
            timing=connection.AGENT_TIMING,
            on_error=on_error,
            crash_only=True,
        )


class SyncAgent:
    """The blocking twin of :class:`Agent` for Flask, Django and scripts.

    It runs the same async code in a background thread (one implementation:
    every method forwards to the :class:`Agent` there). ``with SyncAgent(...)``
    or ``start()``/``close()``. It can be shared between threads.
    """

    def __init__(self, redis: str, service_name: str, service_url: str, **kwargs: Any) -> None:
        self._args = (redis, service_name, service_url)
        self._kwargs = kwargs
        self._owner = PortalOwner()
        self._agent: Agent | None = None

    @property
    def agent(self) -> Agent:
        if self._agent is None:
            raise RuntimeError("SyncAgent is not started")
        return self._agent

    @property
    def registered(self) -> bool:
        return self._agent is not None and self._agent.registered

    @property
    def last_error(self) -> str | None:
        """See :attr:`Agent.last_error`; None before ``start()``."""
        return None if self._agent is None else self._agent.last_error

    @property
    def service_id(self) -> str:
        return self.agent.service_id

    def start(self) -> SyncAgent:
        if self._agent is None:
            agent = self._owner.build(lambda: Agent(*self._args, **self._kwargs))
            try:
                self._agent = self._owner.enter(agent)
            except BaseException:
                self._owner.stop()
                raise
        return self

    def close(self) -> None:
        """Leave (unless :meth:`leave` was called) and stop the background thread."""
        if self._agent is not None:
            self._agent = None
            self._owner.stop()

    def announce(self, kind: str = "heartbeat") -> bool:
        """See :meth:`Agent.announce`."""
        return self._owner.call(self.agent.announce, kind)

    def update(
        self,
        *,
        service_url: str | None = None,
        capabilities: Iterable[str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """See :meth:`Agent.update` (raises :class:`InvalidEvent` for bad input)."""
        caps = None if capabilities is None else tuple(capabilities)  # read in this thread
        agent = self.agent
        return self._owner.call(
            lambda: agent.update(service_url=service_url, capabilities=caps, metadata=metadata)
        )

    def drain(self) -> bool:
        """See :meth:`Agent.drain`."""
        return self._owner.call(self.agent.drain)

    def leave(self) -> bool:
        """See :meth:`Agent.leave`; ``close()`` still stops the thread."""
        return self._owner.call(self.agent.leave)

    def __enter__(self) -> SyncAgent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
