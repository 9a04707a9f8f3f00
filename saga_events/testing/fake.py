"""An in-memory registry for unit tests of code that uses the client.

:class:`FakeRegistry` holds instances in a dictionary. Its clients
(``registry.client()`` async, ``registry.sync_client()`` blocking) are the
real :class:`AsyncSagaServiceDiscovery` / :class:`SagaServiceDiscovery` classes
with an in-memory transport, so fallbacks, argument validation and the
failure policy are the real ones.

What it does not do, on purpose (it is deterministic and has no clock):
instances never expire by themselves and nothing heartbeats in the
background. Call :meth:`FakeRegistry.expire` to make an instance vanish as if
its TTL ran out, and ``available = False`` to make the registry unreachable
(registrations then return ``source == "local"``, discovery falls back or
raises :class:`RegistryUnavailable`). It can be shared between threads.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from anyio.abc import TaskGroup

from .._client_base import Filters
from ..agent import default_service_id
from ..client import (
    AsyncSagaServiceDiscovery,
    Registration,
    SagaServiceDiscovery,
    ServiceInfo,
)
from ..errors import RegistryUnavailable, ServiceNotFound


class FakeRegistry:
    """A registry in a dictionary: add, expire and inspect instances; hand out clients.

    ``log`` records every write as ``(action, service_name, service_id)`` with
    action ``register``, ``heartbeat`` or ``leave``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, dict[str, ServiceInfo]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self.available = True
        self.log: list[tuple[str, str, str]] = []

    # -- what tests do to it --------------------------------------------------------------

    def add(
        self,
        name: str,
        url: str,
        capabilities: Iterable[str] = (),
        *,
        service_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ServiceInfo:
        """Put an instance in the registry (as if another service registered it)."""
        now = datetime.now(UTC)
        info = ServiceInfo(
            service_id=service_id or default_service_id(),
            service_name=name,
            service_url=url,
            capabilities=tuple(capabilities),
            registered_at=now,
            last_heartbeat=now,
            metadata=dict(metadata or {}),
        )
        with self._lock:
            self._instances.setdefault(name, {})[info.service_id] = info
            self._rr.setdefault(name, itertools.count())
        return info

    def expire(self, name: str, service_id: str | None = None) -> int:
        """Remove instances of ``name`` (all, or one id) as if their TTL ran out."""
        with self._lock:
            group = self._instances.get(name, {})
            ids = [service_id] if service_id is not None else list(group)
            removed = sum(group.pop(i, None) is not None for i in ids)
            if not group:
                self._instances.pop(name, None)
            return removed

    def clear(self) -> None:
        with self._lock:
            self._instances.clear()
            self.log.clear()

    # -- what tests read ------------------------------------------------------------------

    def instances(self, name: str) -> list[ServiceInfo]:
        with self._lock:
            return sorted(self._instances.get(name, {}).values(), key=lambda i: i.service_id)

    def services(self) -> dict[str, list[ServiceInfo]]:
        with self._lock:
            names = sorted(self._instances)
        return {name: self.instances(name) for name in names}

    def pick(self, name: str, filters: Filters | None = None) -> ServiceInfo:
        """An instance of ``name`` (matching ``filters``), round-robin; raises ServiceNotFound."""
        with self._lock:
            live = sorted(self._instances.get(name, {}).values(), key=lambda i: i.service_id)
            if filters is not None:
                live = filters.choose(live)
            if not live:
                raise ServiceNotFound(name, filters.capability if filters else None)
            return live[next(self._rr[name]) % len(live)]

    # -- clients --------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> AsyncSagaServiceDiscovery:
        """An async client bound to this registry (use it with ``async with``)."""
        return AsyncSagaServiceDiscovery(backend=_FakeBackend(self), **kwargs)

    def sync_client(self, **kwargs: Any) -> SagaServiceDiscovery:
        """A blocking client bound to this registry (``close()`` it, or use ``with``)."""
        return SagaServiceDiscovery(backend=_FakeBackend(self), **kwargs)

    # -- used by the fake transport ---------------------------------------------------------

    def _write(self, action: str, reg: Registration) -> ServiceInfo | None:
        with self._lock:
            self.log.append((action, reg.service_name, reg.service_id))
            if not self.available:
                return None
        if action == "leave":
            self.expire(reg.service_name, reg.service_id)
            return None
        if action == "heartbeat":
            with self._lock:
                current = self._instances.get(reg.service_name, {}).get(reg.service_id)
            return current
        now = datetime.now(UTC)
        with self._lock:
            group = self._instances.setdefault(reg.service_name, {})
            old = group.get(reg.service_id)
            info = ServiceInfo(
                service_id=reg.service_id,
                service_name=reg.service_name,
                service_url=reg.service_url,
                capabilities=reg.capabilities,
                registered_at=old.registered_at if old is not None else now,
                last_heartbeat=now,
                metadata=dict(reg.metadata),
            )
            group[reg.service_id] = info
            self._rr.setdefault(reg.service_name, itertools.count())
        return info


class _FakeBackend:
    """The client's transport onto a :class:`FakeRegistry` (internal)."""

    mode = "fake"

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry
        self._regs: dict[str, Registration] = {}
        self._confirmed: dict[str, bool] = {}

    async def start(self, tg: TaskGroup) -> None:
        pass

    async def register(self, reg: Registration) -> tuple[ServiceInfo, bool]:
        old = self._regs.get(reg.service_name)
        if old is not None and old.service_id != reg.service_id:
            await self.unregister(reg.service_name)
        self._regs[reg.service_name] = reg
        info = self.registry._write("register", reg)
        self._confirmed[reg.service_name] = info is not None
        return (info, True) if info is not None else (reg.local_info(), False)

    async def refresh(self, name: str) -> bool:
        reg = self._regs.get(name)
        if reg is None:
            return False
        ok = self.registry._write("heartbeat", reg) is not None
        if not ok:  # the real clients register again after a failed heartbeat
            ok = self.registry._write("register", reg) is not None
        self._confirmed[name] = ok
        return ok

    async def unregister(self, name: str) -> bool:
        reg = self._regs.pop(name, None)
        self._confirmed.pop(name, None)
        if reg is None:
            return False
        available = self.registry.available
        self.registry._write("leave", reg)
        return available

    def is_registered(self, name: str) -> bool:
        return self._confirmed.get(name, False)

    async def discover(self, name: str, filters: Filters | None = None) -> ServiceInfo:
        if not self.registry.available:
            raise RegistryUnavailable(name, "the fake registry is set unavailable")
        return self.registry.pick(name, filters)

    async def aclose(self) -> None:
        pass
