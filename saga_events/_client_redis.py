"""The client's Redis transport: one Agent per registered name, one push Mirror (internal).

Contract: registering never raises for Redis trouble (agents retry and report
through ``registered``/``last_error``); discovery answers from the mirror,
``stale`` while it has lost Redis, :class:`RegistryUnavailable` until its
first sync (bounded by ``discovery_timeout`` on the first lookup only).
"""

from __future__ import annotations

import logging

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from . import model
from ._client_base import Filters, HealthOptions, Registration, ServiceInfo, _now
from ._redis import Backoff, connect
from .agent import Agent
from .errors import RegistryUnavailable
from .mirror import Mirror

log = logging.getLogger("saga_events.client")


class _RedisBackend:
    mode = "redis"

    def __init__(
        self,
        redis_url: str,
        *,
        namespace: str,
        timeout: float,
        discovery_timeout: float,
        url_schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES,
        health: HealthOptions | None = None,
    ) -> None:
        self._health = health
        self._redis = connect(redis_url)
        self._namespace = namespace
        self._url_schemes = url_schemes
        self._timeout = timeout
        self._discovery_timeout = discovery_timeout
        self._agents: dict[str, tuple[Agent, anyio.CancelScope]] = {}
        self._mirror: Mirror | None = None
        self._mirror_synced = anyio.Event()
        self._waited_for_sync = False
        self._tg: TaskGroup | None = None

    async def start(self, tg: TaskGroup) -> None:
        self._tg = tg

    async def _run_agent(
        self,
        agent: Agent,
        *,
        task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        # Agent.run never raises (outages and refusals are retried and reported
        # through agent.registered / agent.last_error), so nothing wraps it here.
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                await tg.start(agent.run)
                task_status.started(scope)

    async def register(self, reg: Registration) -> tuple[ServiceInfo, bool]:
        assert self._tg is not None
        current = self._agents.get(reg.service_name)
        if current is not None and current[0].service_id == reg.service_id:
            agent = current[0]
            ok = await agent.update(  # never raises for Redis; InvalidEvent for bad input
                service_url=reg.service_url,
                capabilities=reg.capabilities,
                metadata=reg.metadata,
            )
            if not ok:
                agent.request_announce()
        else:
            if current is not None:
                await self.unregister(reg.service_name)
            agent = Agent(
                self._redis,
                reg.service_name,
                reg.service_url,
                capabilities=reg.capabilities,
                metadata=reg.metadata,
                ttl=reg.ttl,
                service_id=reg.service_id,
                namespace=self._namespace,
                url_schemes=self._url_schemes,
                first_announce_timeout=self._timeout,
                health_check=self._health.check if self._health is not None else None,
                health_timeout=self._health.timeout if self._health is not None else 2.0,
                health_executor=self._health.executor if self._health is not None else None,
            )
            scope = await self._tg.start(self._run_agent, agent)
            self._agents[reg.service_name] = (agent, scope)
            ok = agent.registered
        now = _now()
        info = msgspec.structs.replace(
            reg.local_info(),
            registered_at=now,
            last_heartbeat=now if ok else None,
            source="registry" if ok else "local",
        )
        return info, ok

    async def refresh(self, name: str) -> bool:
        entry = self._agents.get(name)
        if entry is None:
            return False
        agent = entry[0]
        ok = await agent.announce()  # never raises: outages and refusals are reported
        if not ok:
            agent.request_announce()  # the agent's loop registers again, with backoff
        return ok

    async def unregister(self, name: str) -> bool:
        entry = self._agents.pop(name, None)
        if entry is None:
            return False
        agent, scope = entry
        scope.cancel()
        if agent.health is not None:
            agent.health.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
            return await agent.leave()  # never raises: a refused leave expires after its TTL
        return False

    def is_registered(self, name: str) -> bool:
        entry = self._agents.get(name)
        return entry is not None and entry[0].registered

    async def _run_mirror(self, mirror: Mirror) -> None:
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(mirror.run)  # retries outages by itself until synced
                    self._mirror_synced.set()
            except Exception as exc:  # e.g. an ACL without the mirror's grants
                log.error("the client's mirror stopped (%s); restarting it", exc)
                await anyio.sleep(backoff.next())

    async def discover(self, name: str, filters: Filters | None = None) -> ServiceInfo:
        assert self._tg is not None
        if self._mirror is None:
            self._mirror = Mirror(self._redis, namespace=self._namespace)
            self._tg.start_soon(self._run_mirror, self._mirror)
        if not self._mirror_synced.is_set() and not self._waited_for_sync:
            # Only the first lookup waits for the first snapshot; later ones answer
            # at once (fallback or RegistryUnavailable) while Redis stays unreachable.
            self._waited_for_sync = True
            with anyio.move_on_after(self._discovery_timeout):
                await self._mirror_synced.wait()
        # ``run`` also reports started when Redis refused the mirror (an ACL without
        # its grants): it serves nothing then, which is "unavailable", not "not found".
        if not self._mirror_synced.is_set() or not self._mirror.has_synced:
            why = self._mirror.last_error or "the mirror has not synced with Redis yet"
            raise RegistryUnavailable(name, why)
        if filters is None:
            inst = self._mirror.pick(name)  # raises ServiceNotFound
        else:
            inst = self._mirror.pick(
                name,
                filters.capability,
                where=dict(filters.where) or None,
                prefer=dict(filters.prefer) or None,
            )
        return ServiceInfo.from_instance(inst, "stale" if self._mirror.stale else "registry")

    async def aclose(self) -> None:
        for agent, _scope in self._agents.values():
            if agent.health is not None:
                agent.health.close()
        # Shielded: a close in a cancelled scope would stop at its first await and
        # leave the pool's sockets open (redis-py closes them in a gather).
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._redis.aclose()
