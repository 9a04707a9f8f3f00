"""An in-memory registry for unit tests of code that uses the client.

:class:`FakeRegistry` holds instances in a dictionary. Its clients
(``registry.client()`` async, ``registry.sync_client()`` blocking) are the
real :class:`AsyncSagaServiceDiscovery` / :class:`SagaServiceDiscovery` classes
with an in-memory transport, so fallbacks, argument validation and the
failure policy are the real ones.

Picks are the real :class:`~saga_events.Mirror`'s: the fake keeps a
:class:`~saga_events.view.View` (the mirror's store and pick policy, with
:mod:`saga_events.selection`) beside its dictionary, so ``weight`` metadata,
``where``/``prefer``, the strategy (``FakeRegistry(strategy=...)``) and
draining instances are honoured exactly as a mirror does: for the same
instances and the same calls, the same sequence of picks.
:meth:`FakeRegistry.drain` / :meth:`FakeRegistry.undrain` stand for an
operator's drain (an override the instance's own re-registrations keep).

What it does not do, on purpose (it is deterministic and has no clock):
instances never expire by themselves, nothing heartbeats in the background,
and a drain has no duration. Call :meth:`FakeRegistry.expire` to make an instance vanish as if
its TTL ran out, and ``available = False`` to make the registry unreachable
(registrations then return ``source == "local"``, discovery falls back or
raises :class:`RegistryUnavailable`). It can be shared between threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from anyio.abc import TaskGroup

from .. import model
from .._client_base import Filters
from ..agent import default_service_id
from ..client import (
    AsyncSagaServiceDiscovery,
    Registration,
    SagaServiceDiscovery,
    ServiceInfo,
)
from ..errors import RegistryUnavailable, ServiceNotFound
from ..view import View


class FakeRegistry:
    """A registry in a dictionary: add, expire and inspect instances; hand out clients.

    ``log`` records every write as ``(action, service_name, service_id)`` with
    action ``register``, ``heartbeat`` or ``leave``.
    """

    def __init__(self, strategy: str = "round_robin") -> None:
        self._lock = threading.Lock()
        self._instances: dict[str, dict[str, ServiceInfo]] = {}
        self._overrides: dict[tuple[str, str], model.DrainOverride] = {}
        self._seq = itertools.count(1)
        #: the mirror's own store and pick policy; written under ``_lock``
        self.view = View(strategy=strategy)
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
            return self._store(info)

    def expire(self, name: str, service_id: str | None = None) -> int:
        """Remove instances of ``name`` (all, or one id) as if their TTL ran out."""
        with self._lock:
            group = self._instances.get(name, {})
            ids = [service_id] if service_id is not None else list(group)
            removed = 0
            for sid in ids:
                if group.pop(sid, None) is not None:
                    removed += 1
                    self._overrides.pop((name, sid), None)  # a leave or reap drops it
                    self.view.remove(_key(name, sid))
            if not group:
                self._instances.pop(name, None)
            self.view.publish()
            return removed

    def clear(self) -> None:
        with self._lock:
            for key in list(self.view.snapshot()):
                self.view.remove(key)
            self.view.publish()
            self._instances.clear()
            self._overrides.clear()
            self.log.clear()

    def drain(
        self, name: str, service_id: str | None = None, *, by: str = "operator", reason: str = ""
    ) -> list[ServiceInfo]:
        """An operator's drain of ``name`` (or one id): never picked, still listed,
        kept when the instance registers again, until :meth:`undrain`. Returns the
        instances drained (none when ``name`` has none)."""
        at_ms = int(time.time() * 1000)
        with self._lock:
            group = self._instances.get(name, {})
            ids = [service_id] if service_id is not None else sorted(group)
            out = []
            for sid in ids:
                if sid in group:
                    self._overrides[(name, sid)] = model.DrainOverride(
                        by=by, reason=reason, at_ms=at_ms
                    )
                    out.append(self._store(group[sid]))
            return out

    def undrain(self, name: str, service_id: str | None = None) -> list[ServiceInfo]:
        """End an operator's drain of ``name`` (or one id); returns the instances."""
        with self._lock:
            group = self._instances.get(name, {})
            ids = [service_id] if service_id is not None else sorted(group)
            out = []
            for sid in ids:
                if sid in group:
                    self._overrides.pop((name, sid), None)
                    out.append(self._store(group[sid]))
            return out

    def _store(self, info: ServiceInfo) -> ServiceInfo:
        """Put ``info`` in the dictionary and the view, the override applied (under _lock)."""
        name, sid = info.service_name, info.service_id
        override = self._overrides.get((name, sid))
        info = msgspec.structs.replace(info, draining=override is not None)
        self._instances.setdefault(name, {})[sid] = info
        registered = info.registered_at or datetime.now(UTC)
        inst = model.Instance(
            incarnation=1,
            seq=next(self._seq),
            registered_at_ms=int(registered.timestamp() * 1000),
            service_name=name,
            service_id=sid,
            service_url=info.service_url,
            capabilities=info.capabilities,
            metadata=dict(info.metadata),
            draining=override is not None,
            override=override,
        )
        self.view.put(_key(name, sid), inst)
        self.view.publish()
        return info

    # -- what tests read ------------------------------------------------------------------

    def instances(self, name: str) -> list[ServiceInfo]:
        with self._lock:
            return sorted(self._instances.get(name, {}).values(), key=lambda i: i.service_id)

    def services(self) -> dict[str, list[ServiceInfo]]:
        with self._lock:
            names = sorted(self._instances)
        return {name: self.instances(name) for name in names}

    def pick(
        self,
        name: str,
        filters: Filters | None = None,
        *,
        capability: str | None = None,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> ServiceInfo:
        """A live, non-draining instance of ``name`` chosen as :meth:`Mirror.pick` does
        (the same view and strategy: weights, ``where``, ``prefer``); raises
        ServiceNotFound. ``filters`` is the client's form of the same selectors."""
        if filters is not None:
            capability = filters.capability
            where = dict(filters.where) or None
            prefer = dict(filters.prefer) or None
        inst = self.view.pick(name, capability, where=where, prefer=prefer)
        if inst is None:
            raise ServiceNotFound(name, capability)
        with self._lock:
            info = self._instances.get(name, {}).get(inst.service_id)
        return info if info is not None else ServiceInfo.from_instance(inst)

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
            old = self._instances.get(reg.service_name, {}).get(reg.service_id)
            info = ServiceInfo(
                service_id=reg.service_id,
                service_name=reg.service_name,
                service_url=reg.service_url,
                capabilities=reg.capabilities,
                registered_at=old.registered_at if old is not None else now,
                last_heartbeat=now,
                metadata=dict(reg.metadata),
            )
            return self._store(info)


def _key(name: str, sid: str) -> str:
    return f"fake:{name}:{sid}"


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
