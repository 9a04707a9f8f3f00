"""The SagaServiceDiscovery client: register, keep alive, discover, fall back.

Two transports, chosen by the constructor:

* **Redis** (``redis_url`` given): each registered name is an :class:`Agent`
  (it heartbeats and re-announces by itself), and discovery reads a push
  :class:`Mirror`, started on the first ``discover_service``. The view is live,
  so ``cache_ttl`` plays no part.
* **REST** (only ``saga_url``): the seed's HTTP API (``saga-events up`` serves
  it on port 8030). The client heartbeats each registration in the background,
  registers it again when a heartbeat is not answered with 200. Discovery
  follows the gateway's watch stream (``GET /api/v1/watch``, started on the
  first ``discover_service``) and answers from its view without a request;
  against a gateway without the stream, and once the stream has been down
  ``cache_ttl`` seconds, it polls and caches answers for ``cache_ttl`` seconds.

Failure policy, the same in both modes (the host service must keep running
when the registry does not):

* ``register_service`` raises only for bad arguments (:class:`InvalidEvent`,
  a ``ValueError``) or when the gateway rejects them. When the registry cannot
  be reached it logs a warning, returns the :class:`ServiceInfo` it will keep
  announcing, and retries in the background until it is confirmed;
  ``is_registered(name)`` tells which.
* ``refresh_registration`` and ``unregister_service`` never raise for registry
  trouble: they return whether the registry confirmed. A refresh that fails
  registers again at once.
* ``discover_service`` answers from the registry; if the registry has no live
  instance or cannot be reached it answers from ``fallbacks`` (``source ==
  "fallback"``); otherwise it raises :class:`ServiceNotFound` (the registry
  answered: no instance) or :class:`RegistryUnavailable` (no answer). In REST
  mode a cached answer past its ``cache_ttl`` is still served, marked
  ``source == "stale"``, while the gateway cannot be reached.

:class:`AsyncSagaServiceDiscovery` must be used as ``async with`` (its
heartbeats and watch are tasks it owns). :class:`SagaServiceDiscovery`, the
blocking twin, runs the same code in a background thread, starts on first use
and leaves its registrations on ``close()``, on ``with`` exit, or at
interpreter exit. It can be shared between threads.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import anyio
from anyio.abc import TaskGroup

from . import identity, model
from ._client_base import (
    Backend,
    Filters,
    HealthOptions,
    Registration,
    ServiceInfo,
    check_registration,
)
from ._client_redis import _RedisBackend
from ._client_rest import _RestBackend
from ._portal import PortalOwner
from .errors import InvalidEvent, RegistryUnavailable, ServiceNotFound
from .health import HealthCheck

log = logging.getLogger("saga_events.client")

T = TypeVar("T")

DEFAULT_SAGA_URL: Final = "http://localhost:8030"


def _urls_from_env(saga_url: str | None, redis_url: str | None) -> tuple[str | None, str | None]:
    if saga_url is None and redis_url is None:
        redis_url = os.environ.get("SAGA_REDIS_URL") or None
        if redis_url is None:
            saga_url = os.environ.get("SAGA_SERVICE_URL") or DEFAULT_SAGA_URL
    return saga_url, redis_url


def _mode_for(saga_url: str | None, redis_url: str | None) -> str:
    return "redis" if _urls_from_env(saga_url, redis_url)[1] is not None else "rest"


# -- the client ---------------------------------------------------------------------------


class AsyncSagaServiceDiscovery:
    """Register this service, keep it alive, and discover others (async).

    ``async with AsyncSagaServiceDiscovery(...) as saga:`` — leaving the block
    unregisters every name registered through it. Transport: ``redis_url``
    (Agent + push Mirror) if given, else ``saga_url`` (REST). Without either
    argument, ``SAGA_REDIS_URL`` and then ``SAGA_SERVICE_URL`` are read from
    the environment, and the REST default is ``http://localhost:8030``.

    ``fallbacks`` maps service names to static URLs used when discovery fails.
    ``ttl`` is the registrations' time to live (seconds, default 60); they are
    refreshed every ttl/3 (``heartbeat_interval`` overrides that in REST
    mode). ``timeout`` bounds each request or first announcement;
    ``discovery_timeout`` bounds the wait for the mirror's first sync (Redis).
    ``api_token`` (default ``SAGA_API_TOKEN``) is sent as a bearer token.

    ``health_check`` (a sync or async callable; see :mod:`saga_events.health`)
    runs before each heartbeat of every registration, bounded by
    ``health_timeout``: while it fails (returns False, raises, or does not
    answer in time) the instance is announced draining with
    ``metadata["health"] = "failing: <why>"``, and serving again once it
    passes. A sync check runs on ``health_executor`` (give the host's own
    worker pool, so that stuck workers fail it) or on a private thread. In
    REST mode the status is sent in the heartbeat's body (the gateway's
    ``{"status": "failing"|"passing", "reason": ...}``).
    """

    def __init__(
        self,
        saga_url: str | None = None,
        redis_url: str | None = None,
        cache_ttl: float = 30.0,
        fallbacks: Mapping[str, str] | None = None,
        *,
        namespace: str = "default",
        ttl: float = 60.0,
        heartbeat_interval: float | None = None,
        timeout: float = 5.0,
        discovery_timeout: float = 5.0,
        api_token: str | None = None,
        url_schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES,
        backend: Backend | None = None,
        health_check: HealthCheck | None = None,
        health_timeout: float = 2.0,
        health_executor: concurrent.futures.Executor | None = None,
    ) -> None:
        health = (
            None
            if health_check is None
            else HealthOptions(health_check, health_timeout, health_executor)
        )
        if health is not None and health_timeout <= 0:
            raise ValueError("health_timeout must be > 0 seconds")
        self.fallbacks: dict[str, str] = dict(fallbacks or {})
        for name, url in self.fallbacks.items():
            if not identity.is_valid_name(name):
                raise InvalidEvent("bad_name", f"fallback name {name!r} is not a service name")
            model.check_url(url, url_schemes)
        self.ttl = ttl
        self.namespace = namespace
        self.url_schemes = url_schemes
        self.cache_ttl = cache_ttl
        if backend is None:
            saga_url, redis_url = _urls_from_env(saga_url, redis_url)
            if redis_url is not None:
                backend = _RedisBackend(
                    redis_url,
                    namespace=namespace,
                    timeout=timeout,
                    discovery_timeout=discovery_timeout,
                    url_schemes=url_schemes,
                    health=health,
                )
            else:
                assert saga_url is not None
                backend = _RestBackend(
                    saga_url,
                    cache_ttl=cache_ttl,
                    timeout=timeout,
                    api_token=api_token or os.environ.get("SAGA_API_TOKEN") or None,
                    heartbeat_interval=heartbeat_interval,
                    health=health,
                )
        self._backend = backend
        self.saga_url = saga_url
        self.redis_url = redis_url
        self._service_ids: dict[str, str] = {}
        self._tg: TaskGroup | None = None
        self._closed = False

    @property
    def mode(self) -> str:
        """``"redis"``, ``"rest"`` or ``"fake"``."""
        return self._backend.mode

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncSagaServiceDiscovery:
        if self._closed:
            raise RuntimeError("this client is closed; make a new one")
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._backend.start(self._tg)
        except BaseException:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        try:
            await self._leave_all()
        finally:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def _leave_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for name in list(self._service_ids):
                await self.unregister_service(name)

    async def aclose(self) -> None:
        """Unregister everything and release connections (``async with`` does it for you)."""
        if self._closed:
            return
        if self._tg is not None:
            await self._leave_all()
            self._tg.cancel_scope.cancel()
        self._closed = True
        await self._backend.aclose()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this client is closed")
        if self._tg is None:
            raise RuntimeError(
                "use `async with AsyncSagaServiceDiscovery(...) as saga:` "
                "(or the blocking SagaServiceDiscovery, which starts by itself)"
            )

    # -- registration ---------------------------------------------------------------------

    async def register_service(
        self,
        name: str,
        url: str,
        capabilities: Iterable[str] = (),
        *,
        metadata: Mapping[str, str] | None = None,
        service_id: str | None = None,
    ) -> ServiceInfo:
        """Register ``name`` at ``url`` and keep it alive until unregistered.

        Returns at once when the registry confirms, or after ``timeout`` when
        it cannot be reached: then a warning is logged, the returned info has
        ``source == "local"``, and the client keeps trying in the background.
        Registering a name again updates its URL and capabilities. Raises
        :class:`InvalidEvent` for bad arguments only. ``service_id`` defaults
        to :func:`identity.process_service_id` (host, pid, random): each process
        is its own instance, so a recycled worker's leave never hides a live
        sibling; a process that dies without leaving is reaped one ttl later.
        """
        self._check_open()
        if isinstance(capabilities, str):
            raise InvalidEvent("invalid", "capabilities must be a list of names, not a string")
        sid = service_id or self._service_ids.get(name) or identity.process_service_id()
        reg = Registration(
            service_name=name,
            service_url=url,
            service_id=sid,
            capabilities=tuple(capabilities),
            metadata=dict(metadata or {}),
            ttl=self.ttl,
        )
        check_registration(reg, self.url_schemes)
        info, confirmed = await self._backend.register(reg)
        self._service_ids[name] = sid
        if confirmed:
            log.info("registered %s (%s) at %s", name, sid, url)
        else:
            log.warning(
                "could not register %s with the registry yet; retrying in the background", name
            )
        return info

    async def refresh_registration(self, name: str) -> bool:
        """Heartbeat ``name`` now; on failure register it again. True if confirmed.

        The client heartbeats by itself; this is for callers that want to
        force one (the seed's heartbeat loop). False for a name this client
        did not register. Never raises for registry trouble.
        """
        self._check_open()
        if name not in self._service_ids:
            log.warning("refresh_registration(%r): not registered by this client", name)
            return False
        return await self._backend.refresh(name)

    async def unregister_service(self, name: str) -> bool:
        """Stop announcing ``name`` and remove its instance; True if the registry confirmed.

        False for a name this client did not register. Never raises for
        registry trouble (an instance that could not be removed expires after
        its TTL).
        """
        if self._service_ids.pop(name, None) is None:
            return False
        ok = await self._backend.unregister(name)
        if ok:
            log.info("unregistered %s", name)
        else:
            log.warning("could not tell the registry that %s left; it expires after its TTL", name)
        return ok

    def is_registered(self, name: str) -> bool:
        """True while the registry has confirmed this client's registration of ``name``."""
        return self._backend.is_registered(name)

    @property
    def registered_names(self) -> list[str]:
        """Names this client registered and keeps alive."""
        return sorted(self._service_ids)

    # -- discovery ------------------------------------------------------------------------

    async def discover_service(
        self,
        name: str,
        capability: str | None = None,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> ServiceInfo:
        """Return an instance of ``name`` (smooth weighted round-robin over live ones).

        ``capability``, ``where`` (metadata pairs that must all match) and
        ``prefer`` (pairs preferred, the rest as a fallback) select as
        :meth:`Mirror.pick` does; in REST mode they are sent as query parameters.
        Falls back to ``fallbacks[name]``; else raises :class:`ServiceNotFound`
        or :class:`RegistryUnavailable` (both :class:`SagaError`).
        """
        self._check_open()
        if not identity.is_valid_name(name):
            raise InvalidEvent("bad_name", f"service name {name!r} must match {model.NAME_PATTERN}")
        try:
            filters = Filters.of(capability, where, prefer)
            if filters is None:
                return await self._backend.discover(name)
            return await self._backend.discover(name, filters)
        except (ServiceNotFound, RegistryUnavailable) as exc:
            url = self.fallbacks.get(name)
            if url is None:
                raise
            log.info("%s: %s; using the fallback %s", name, exc, url)
            return ServiceInfo(
                service_id="fallback", service_name=name, service_url=url, source="fallback"
            )

    async def discover_url(self, name: str) -> str:
        """``(await discover_service(name)).service_url``."""
        return (await self.discover_service(name)).service_url


# -- the blocking twin -------------------------------------------------------------------


class SagaServiceDiscovery:
    """The blocking twin of :class:`AsyncSagaServiceDiscovery`, for Flask, Django, scripts.

    Same arguments and methods. It starts a background event-loop thread on
    first use, and ``close()`` (or leaving ``with``, or interpreter exit)
    unregisters everything and stops it. It can be shared between threads.
    """

    def __init__(
        self,
        saga_url: str | None = None,
        redis_url: str | None = None,
        cache_ttl: float = 30.0,
        fallbacks: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        # One dict, shared with the async client once it is built.
        self._fallbacks: dict[str, str] = dict(fallbacks or {})
        self._factory = functools.partial(
            AsyncSagaServiceDiscovery, saga_url, redis_url, cache_ttl, self._fallbacks, **kwargs
        )
        backend = kwargs.get("backend")
        self.mode: str = backend.mode if backend is not None else _mode_for(saga_url, redis_url)
        self._lock = threading.Lock()
        self._owner: PortalOwner | None = None
        self._client: AsyncSagaServiceDiscovery | None = None
        self._closed = False

    def _ensure(self) -> tuple[PortalOwner, AsyncSagaServiceDiscovery]:
        with self._lock:
            if self._closed:
                raise RuntimeError("this client is closed")
            if self._owner is None or self._client is None:
                owner = PortalOwner()
                try:
                    # Built in the loop's thread: its connections belong to that loop.
                    client = owner.build(self._build)
                    owner.enter(client)
                except BaseException:
                    owner.stop()
                    raise
                self._owner, self._client = owner, client
                atexit.register(self.close)
            return self._owner, self._client

    def _build(self) -> AsyncSagaServiceDiscovery:
        client = self._factory()
        client.fallbacks = self._fallbacks
        return client

    def _call(self, func: Callable[[AsyncSagaServiceDiscovery], Awaitable[T]]) -> T:
        """Run ``func(client)`` on the background loop and wait for its result."""
        owner, client = self._ensure()
        return owner.call(func, client)

    @property
    def client(self) -> AsyncSagaServiceDiscovery:
        """The async client that does the work (started on first access)."""
        return self._ensure()[1]

    def start(self) -> SagaServiceDiscovery:
        self._ensure()
        return self

    def close(self) -> None:
        """Unregister everything and stop the background thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            owner, self._owner, self._client = self._owner, None, None
        atexit.unregister(self.close)
        if owner is not None:
            owner.stop()

    def __enter__(self) -> SagaServiceDiscovery:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fallbacks(self) -> dict[str, str]:
        """The static fallback URLs (the async client's own dict; nothing is started)."""
        return self._fallbacks

    def register_service(
        self,
        name: str,
        url: str,
        capabilities: Iterable[str] = (),
        *,
        metadata: Mapping[str, str] | None = None,
        service_id: str | None = None,
    ) -> ServiceInfo:
        """See :meth:`AsyncSagaServiceDiscovery.register_service`."""
        # Materialised in the caller's thread, which owns the iterable.
        caps = list(capabilities) if not isinstance(capabilities, str) else capabilities
        return self._call(
            lambda c: c.register_service(name, url, caps, metadata=metadata, service_id=service_id)
        )

    def refresh_registration(self, name: str) -> bool:
        """See :meth:`AsyncSagaServiceDiscovery.refresh_registration`."""
        return self._call(lambda c: c.refresh_registration(name))

    def unregister_service(self, name: str) -> bool:
        """See :meth:`AsyncSagaServiceDiscovery.unregister_service`."""
        return self._call(lambda c: c.unregister_service(name))

    def is_registered(self, name: str) -> bool:
        return self._ensure()[1].is_registered(name)

    @property
    def registered_names(self) -> list[str]:
        # Read on the loop's thread: registering there changes the names meanwhile.
        owner, client = self._ensure()
        return owner.build(lambda: client.registered_names)

    def discover_service(
        self,
        name: str,
        capability: str | None = None,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> ServiceInfo:
        """See :meth:`AsyncSagaServiceDiscovery.discover_service`."""
        return self._call(lambda c: c.discover_service(name, capability, where, prefer))

    def discover_url(self, name: str) -> str:
        return self.discover_service(name).service_url


__all__ = [
    "AsyncSagaServiceDiscovery",
    "Backend",
    "Registration",
    "SagaServiceDiscovery",
    "ServiceInfo",
]
