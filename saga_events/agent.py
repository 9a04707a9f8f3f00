"""The agent: announces one instance, heartbeats it, and says leave on exit.

An agent never blocks or crashes its host service: when Redis is down or no
registrar listens (PUBLISH reaches nobody), it logs, sets ``registered`` to
False and keeps retrying with backoff. It re-announces at once when a
registrar asks (after finding Redis empty) and after any reconnect.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus
from redis.exceptions import ResponseError

from . import model
from ._portal import PortalOwner
from ._redis import TRANSIENT, Backoff, RedisLike, close_quietly, connect
from .keys import Keys

log = logging.getLogger("saga_events.agent")


def default_service_id() -> str:
    """``<host>-<pid>-<random>``, made to fit the name rules."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:60] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Agent:
    """Announce one service instance for as long as the ``async with`` block runs.

    ``ttl`` is in seconds (default 60, as in the seed); heartbeats go every
    ttl/3 with ±10 % jitter. Leaving the block sends ``leave``.
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
    ) -> None:
        self.service_id = service_id or default_service_id()
        self.service_name = service_name
        self.url_schemes = url_schemes
        self.ttl_ms = round(ttl * 1000)
        # Bad input fails here, in the caller, by the registrar's own rules.
        self._check(service_url, tuple(capabilities), dict(metadata or {}))
        self.keys = Keys(namespace)
        self._redis = connect(redis)
        self._owns_client = isinstance(redis, str)
        self.service_url = service_url
        self.capabilities = tuple(capabilities)
        self.metadata = dict(metadata or {})
        self.first_announce_timeout = first_announce_timeout
        self.incarnation = model.new_incarnation()
        self.seq = 0
        self.draining = False
        self.registered = False
        self.announcements = 0
        self._wake = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._channel = self.keys.events(service_name)

    def _check(self, url: str, capabilities: tuple[str, ...], metadata: dict[str, str]) -> None:
        """Raise :class:`InvalidEvent` unless the registrar would accept this record."""
        event = model.Register(
            service_name=self.service_name,
            service_id=self.service_id,
            incarnation=0,
            seq=0,
            service_url=url,
            capabilities=capabilities,
            metadata=metadata,
            ttl_ms=self.ttl_ms,
        )
        model.decode_event(model.encode(event), self.service_name, schemes=self.url_schemes)

    @property
    def interval(self) -> float:
        """Seconds between heartbeats (ttl/3)."""
        return self.ttl_ms / 3000

    # -- events ------------------------------------------------------------------

    def _next(self) -> tuple[int, int]:
        self.seq += 1
        return self.incarnation, self.seq

    def _announce_event(self, kind: str) -> model.Announce:
        inc, seq = self._next()
        cls: type[model.Announce]
        if self.draining:
            cls = model.Drain
        elif kind == "register":
            cls = model.Register
        else:
            cls = model.Heartbeat
        return cls(
            service_name=self.service_name,
            service_id=self.service_id,
            incarnation=inc,
            seq=seq,
            service_url=self.service_url,
            capabilities=self.capabilities,
            metadata=self.metadata,
            ttl_ms=self.ttl_ms,
        )

    async def _publish(self, event: model.Event) -> bool:
        try:
            receivers = await self._redis.publish(self._channel, model.encode(event))
        except TRANSIENT as exc:
            if self.registered:
                log.warning(
                    "%s/%s: cannot reach Redis (%s)", self.service_name, self.service_id, exc
                )
            self.registered = False
            return False
        if receivers == 0:
            if self.registered or self.announcements == 0:
                log.warning(
                    "%s/%s: no registrar is listening; will keep retrying",
                    self.service_name,
                    self.service_id,
                )
            self.registered = False
            return False
        if not self.registered:
            log.info("%s/%s announced", self.service_name, self.service_id)
        self.registered = True
        self.announcements += 1
        return True

    async def announce(self, kind: str = "heartbeat") -> bool:
        """Publish the current record now; True if a registrar received it."""
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
        """Tell the registrar this instance is gone; True if a registrar received it."""
        inc, seq = self._next()
        event = model.Leave(
            service_name=self.service_name, service_id=self.service_id, incarnation=inc, seq=seq
        )
        ok = await self._publish(event)
        self.registered = False
        return ok

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._tg.start(self.run)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self.leave()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._redis.aclose()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Announce and heartbeat until cancelled (does not send ``leave``).

        Signals started after the first announcement attempt, whether it
        reached a registrar or not (bounded by ``first_announce_timeout``).
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._control_loop)
            ok = False  # stays False if the first attempt times out
            with anyio.move_on_after(self.first_announce_timeout):
                await self._incarnation_from_redis_clock()
                ok = await self.announce("register")
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
        except (*TRANSIENT, ResponseError) as exc:
            log.debug("cannot read Redis TIME (%s); incarnation from the host clock", exc)
            return
        self.incarnation = model.new_incarnation(sec * 1000 + usec // 1000)

    def request_announce(self) -> None:
        """Ask the heartbeat loop to send a full ``register`` now."""
        self._wake.set()

    async def _heartbeat_loop(self, ok: bool) -> None:
        backoff = Backoff(base=0.2, cap=min(self.interval, 5.0))
        kind = "heartbeat" if ok else "register"
        while True:
            if ok:
                backoff.reset()
                delay = self.interval * random.uniform(0.9, 1.1)
            else:
                delay = backoff.next()
            with anyio.move_on_after(delay):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
                kind = "register"
            ok = await self.announce(kind)
            kind = "heartbeat" if ok else "register"

    async def _control_loop(self) -> None:
        backoff = Backoff(base=0.1, cap=2.0)
        lost = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.keys.control)
                reply: Any = await pubsub.parse_response(block=False, timeout=5.0)
                if reply is None:
                    raise TimeoutError("no SUBSCRIBE confirmation")
                backoff.reset()
                if lost:
                    self.request_announce()  # re-announce at once after a reconnect
                lost = False
                await self._listen(pubsub)
            except TRANSIENT:
                lost = True
            finally:
                await close_quietly(pubsub)
            await anyio.sleep(backoff.next())

    async def _listen(self, pubsub: Any) -> None:
        last_rx = anyio.current_time()
        last_ping = last_rx
        while True:
            reply = await pubsub.parse_response(block=False, timeout=1.0)
            now = anyio.current_time()
            if reply is not None:
                last_rx = now
                if isinstance(reply, list) and reply[0] == b"message" and reply[2] == b"reannounce":
                    # Spread the burst of re-announcements over a short window.
                    await anyio.sleep(random.uniform(0, min(self.interval, 2.0)))
                    self.request_announce()
                continue
            if now - last_rx > 15.0:
                raise TimeoutError("control subscription silent")
            if now - last_ping >= 5.0:
                last_ping = now
                await pubsub.ping()


class SyncAgent:
    """The blocking twin of :class:`Agent` for Flask, Django and scripts.

    It runs the same async code in a background thread. ``with SyncAgent(...)``
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
        if self._agent is not None:
            self._agent = None
            self._owner.stop()

    def drain(self) -> bool:
        return self._owner.call(self.agent.drain)

    def __enter__(self) -> SyncAgent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
