"""The SagaServiceDiscovery client: register, keep alive, discover, fall back.

Two transports, chosen by the constructor:

* **Redis** (``redis_url`` given): each registered name is an :class:`Agent`
  (it heartbeats and re-announces by itself), and discovery reads a push
  :class:`Mirror`, started on the first ``discover_service``. The view is live,
  so ``cache_ttl`` plays no part.
* **REST** (only ``saga_url``): the seed's HTTP API (``saga-events up`` serves
  it on port 8030). The client heartbeats each registration in the background,
  registers it again when a heartbeat is not answered with 200, and caches
  discovery answers for ``cache_ttl`` seconds.

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
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from . import identity, model
from ._portal import PortalOwner
from ._redis import Backoff, connect
from .agent import Agent
from .errors import InvalidEvent, RegistryUnavailable, ServiceNotFound
from .keys import is_valid_name
from .mirror import Mirror
from .model import Instance

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("saga_events.client")

T = TypeVar("T")

DEFAULT_SAGA_URL: Final = "http://localhost:8030"

Source = Literal["registry", "stale", "cache", "fallback", "local"]


class ServiceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One service instance as the client reports it (the seed's shape).

    ``source`` says where the answer came from: ``registry`` (a live answer),
    ``cache`` (REST mode, younger than ``cache_ttl``), ``stale`` (the registry
    cannot be reached; the last answer it gave), ``fallback`` (the static
    ``fallbacks`` map) or ``local`` (a registration not confirmed yet).
    ``last_heartbeat`` is None where it is not known: a push mirror does not
    see heartbeats (by design they cost mirrors nothing). ``ttl_seconds`` and
    ``draining`` are the record's (None and False where not known).

    It is also the REST API's shape: :meth:`from_json` decodes the gateway's
    answer for one instance (unknown fields ignored) and :meth:`to_dict` gives
    it back, so the client and the web side use one class.
    """

    service_id: str
    service_name: str
    service_url: str
    capabilities: tuple[str, ...] = ()
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_seconds: float | None = None
    draining: bool = False
    source: Source = "registry"

    @classmethod
    def from_instance(
        cls,
        inst: Instance,
        source: Source = "registry",
        last_heartbeat: datetime | None = None,
    ) -> ServiceInfo:
        return cls(
            service_id=inst.service_id,
            service_name=inst.service_name,
            service_url=inst.service_url,
            capabilities=inst.capabilities,
            registered_at=inst.registered_at,
            last_heartbeat=last_heartbeat,
            metadata=dict(inst.metadata),
            ttl_seconds=inst.ttl_ms / 1000,
            draining=inst.draining,
            source=source,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ServiceInfo:
        """Decode the REST API's JSON for one instance; ``source`` is ``registry``.

        Raises ``msgspec.ValidationError``/``DecodeError`` (``msgspec.MsgspecError``)
        for a body of another shape.
        """
        info = _wire_decoder.decode(raw)
        # ``source`` is ours to say, not the server's.
        return info if info.source == "registry" else info.with_source("registry")

    def with_source(self, source: Source) -> ServiceInfo:
        return msgspec.structs.replace(self, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The seed's JSON shape (ISO-8601 UTC times), plus ``metadata`` and ``source``."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        out["capabilities"] = list(self.capabilities)
        for field in ("registered_at", "last_heartbeat"):
            value = getattr(self, field)
            out[field] = _iso(value) if value is not None else None
        return out


def _iso(dt: datetime) -> str:
    return model.iso_utc(int(dt.timestamp() * 1000))


def _now() -> datetime:
    return datetime.now(UTC)


_wire_decoder: Final = msgspec.json.Decoder(ServiceInfo)


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """What the client keeps announcing for one registered name."""

    service_name: str
    service_url: str
    service_id: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl: float = 60.0

    def local_info(self) -> ServiceInfo:
        return ServiceInfo(
            service_id=self.service_id,
            service_name=self.service_name,
            service_url=self.service_url,
            capabilities=self.capabilities,
            metadata=dict(self.metadata),
            source="local",
        )


def _validate(reg: Registration, schemes: frozenset[str]) -> None:
    """Check ``reg`` by the registrar's own rules (:func:`identity.check_announce`).

    The same check in both modes, and the agent's: a registration the
    registrar would drop (e.g. an over-long metadata key) is refused here, not
    published to be rejected out of sight.
    """
    identity.check_announce(
        reg.service_name,
        reg.service_id,
        reg.service_url,
        reg.capabilities,
        reg.metadata,
        round(reg.ttl * 1000),
        schemes=schemes,
    )


class Backend(Protocol):
    """A transport of the client (internal): Redis, REST, or the in-memory fake."""

    mode: str

    async def start(self, tg: TaskGroup) -> None: ...

    async def register(self, reg: Registration) -> tuple[ServiceInfo, bool]:
        """Start announcing ``reg``; return what is registered and whether it is confirmed."""
        ...

    async def refresh(self, name: str) -> bool: ...

    async def unregister(self, name: str) -> bool: ...

    def is_registered(self, name: str) -> bool: ...

    async def discover(self, name: str) -> ServiceInfo: ...

    async def aclose(self) -> None: ...


# -- Redis: agents and a push mirror --------------------------------------------------------


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
    ) -> None:
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

    async def discover(self, name: str) -> ServiceInfo:
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
        if not self._mirror_synced.is_set():
            raise RegistryUnavailable(name, "the mirror has not synced with Redis yet")
        inst = self._mirror.pick(name)  # raises ServiceNotFound
        return ServiceInfo.from_instance(inst, "stale" if self._mirror.stale else "registry")

    async def aclose(self) -> None:
        await self._redis.aclose()


# -- REST: the seed's HTTP API --------------------------------------------------------------


def _why(exc: BaseException) -> str:
    """An exception as text, with its type (httpx's timeouts have an empty message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RestRegistration:
    def __init__(self, reg: Registration, scope: anyio.CancelScope) -> None:
        self.reg = reg
        self.scope = scope
        self.confirmed = False


class _RestBackend:
    mode = "rest"

    def __init__(
        self,
        saga_url: str,
        *,
        cache_ttl: float,
        timeout: float,
        api_token: str | None,
        heartbeat_interval: float | None,
        clock: Callable[[], float] = time.monotonic,
        transport: Any = None,
    ) -> None:
        try:
            import httpx
        except ImportError:  # pragma: no cover - httpx is a core dependency
            raise ImportError("the REST mode needs httpx: pip install httpx") from None
        headers = {"User-Agent": "saga-events-client"}
        if api_token:
            headers["Authorization"] = f"Bearer {api_token}"
        self.saga_url = saga_url.rstrip("/")
        self._http: httpx.AsyncClient = httpx.AsyncClient(
            base_url=self.saga_url, timeout=timeout, headers=headers, transport=transport
        )
        self._httpx_errors: tuple[type[Exception], ...] = (httpx.HTTPError, OSError)
        self._cache_ttl = cache_ttl
        self._heartbeat_interval = heartbeat_interval
        self._clock = clock
        self._cache: dict[str, tuple[float, ServiceInfo]] = {}
        self._regs: dict[str, _RestRegistration] = {}
        self._tg: TaskGroup | None = None

    async def start(self, tg: TaskGroup) -> None:
        self._tg = tg

    async def _post_register(self, reg: Registration) -> ServiceInfo | None:
        """POST the registration; None if the gateway could not be reached or refused."""
        body: dict[str, Any] = {
            "service_name": reg.service_name,
            "service_url": reg.service_url,
            "capabilities": list(reg.capabilities),
            "service_id": reg.service_id,
            "ttl_seconds": reg.ttl,
        }
        if reg.metadata:
            body["metadata"] = reg.metadata
        try:
            resp = await self._http.post("/api/v1/services/register", json=body)
        except self._httpx_errors as exc:
            log.warning(
                "%s: cannot reach %s to register (%s)", reg.service_name, self.saga_url, _why(exc)
            )
            return None
        if resp.status_code in (400, 413, 422):
            raise InvalidEvent("rejected", f"the gateway refused the registration: {resp.text}")
        if resp.status_code in (401, 403):
            log.error(
                "%s: the gateway refused the API token (%d); set api_token or SAGA_API_TOKEN",
                reg.service_name,
                resp.status_code,
            )
            return None
        if resp.status_code != 200:
            log.warning(
                "%s: registration answered %d: %s",
                reg.service_name,
                resp.status_code,
                resp.text[:200],
            )
            return None
        self._cache.pop(reg.service_name, None)
        try:
            return ServiceInfo.from_json(resp.content)
        except msgspec.MsgspecError as exc:
            log.warning("%s: unreadable registration answer (%s)", reg.service_name, exc)
            return None

    async def _post_heartbeat(self, reg: Registration) -> bool:
        try:
            resp = await self._http.post(
                f"/api/v1/services/{reg.service_name}/heartbeat",
                params={"service_id": reg.service_id},
            )
        except self._httpx_errors as exc:
            log.warning("%s: heartbeat failed (%s)", reg.service_name, _why(exc))
            return False
        if resp.status_code != 200:
            log.info(
                "%s: heartbeat answered %d; registering again", reg.service_name, resp.status_code
            )
            return False
        return True

    async def _keep_alive(self, name: str) -> None:
        entry = self._regs[name]
        ttl = entry.reg.ttl
        interval = self._heartbeat_interval or ttl / 3
        backoff = Backoff(base=0.5, cap=min(interval, 30.0))
        while True:
            if entry.confirmed:
                backoff.reset()
                await anyio.sleep(interval * random.uniform(0.9, 1.1))
            else:
                await anyio.sleep(backoff.next())
            try:
                entry.confirmed = await self._refresh_entry(entry)
            except Exception:
                # Never let the keep-alive die, nor take the host service with it.
                log.exception("%s: unexpected error in the heartbeat loop", name)
                entry.confirmed = False

    async def _refresh_entry(self, entry: _RestRegistration) -> bool:
        if entry.confirmed and await self._post_heartbeat(entry.reg):
            return True
        try:
            return await self._post_register(entry.reg) is not None
        except InvalidEvent as exc:  # the gateway's rules changed under us: keep trying, loudly
            log.error("%s: %s", entry.reg.service_name, exc)
            return False

    async def _run_keep_alive(
        self, name: str, *, task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            await self._keep_alive(name)

    async def register(self, reg: Registration) -> tuple[ServiceInfo, bool]:
        assert self._tg is not None
        old = self._regs.get(reg.service_name)
        if old is not None and old.reg.service_id != reg.service_id:
            await self.unregister(reg.service_name)
        info = await self._post_register(reg)
        # Looked up after the POST: a concurrent first registration of the same
        # name may have started its keep-alive meanwhile; one per name.
        entry = self._regs.get(reg.service_name)
        if entry is not None:
            entry.reg = reg
        else:
            entry = _RestRegistration(reg, anyio.CancelScope())
            self._regs[reg.service_name] = entry
            entry.scope = await self._tg.start(self._run_keep_alive, reg.service_name)
        entry.confirmed = info is not None
        return (info if info is not None else reg.local_info()), info is not None

    async def refresh(self, name: str) -> bool:
        entry = self._regs.get(name)
        if entry is None:
            return False
        entry.confirmed = await self._refresh_entry(entry)
        return entry.confirmed

    async def unregister(self, name: str) -> bool:
        entry = self._regs.pop(name, None)
        if entry is None:
            return False
        entry.scope.cancel()
        self._cache.pop(name, None)
        with anyio.CancelScope(shield=True):
            try:
                resp = await self._http.delete(
                    f"/api/v1/services/{name}", params={"service_id": entry.reg.service_id}
                )
            except self._httpx_errors as exc:
                log.warning(
                    "%s: cannot reach %s to unregister (%s)", name, self.saga_url, _why(exc)
                )
                return False
        if resp.status_code == 404 or 200 <= resp.status_code < 300:
            return True
        log.warning("%s: unregister answered %d: %s", name, resp.status_code, resp.text[:200])
        return False

    def is_registered(self, name: str) -> bool:
        entry = self._regs.get(name)
        return entry is not None and entry.confirmed

    async def discover(self, name: str) -> ServiceInfo:
        now = self._clock()
        cached = self._cache.get(name)
        if cached is not None and now - cached[0] < self._cache_ttl:
            return cached[1].with_source("cache")
        try:
            resp = await self._http.get(f"/api/v1/services/{name}")
        except self._httpx_errors as exc:
            return self._stale_or_raise(name, cached, f"cannot reach {self.saga_url}: {_why(exc)}")
        if resp.status_code == 404:
            self._cache.pop(name, None)
            raise ServiceNotFound(name)
        if resp.status_code != 200:
            return self._stale_or_raise(name, cached, f"the gateway answered {resp.status_code}")
        try:
            info = ServiceInfo.from_json(resp.content)
        except msgspec.MsgspecError as exc:
            return self._stale_or_raise(name, cached, f"unreadable answer: {exc}")
        self._cache[name] = (now, info)
        return info

    def _stale_or_raise(
        self, name: str, cached: tuple[float, ServiceInfo] | None, reason: str
    ) -> ServiceInfo:
        if cached is not None:
            log.warning("%s: %s; serving the last answer", name, reason)
            return cached[1].with_source("stale")
        raise RegistryUnavailable(name, reason)

    async def aclose(self) -> None:
        await self._http.aclose()


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
    ) -> None:
        self.fallbacks: dict[str, str] = dict(fallbacks or {})
        for name, url in self.fallbacks.items():
            if not is_valid_name(name):
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
                )
            else:
                assert saga_url is not None
                backend = _RestBackend(
                    saga_url,
                    cache_ttl=cache_ttl,
                    timeout=timeout,
                    api_token=api_token or os.environ.get("SAGA_API_TOKEN") or None,
                    heartbeat_interval=heartbeat_interval,
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
        _validate(reg, self.url_schemes)
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

    async def discover_service(self, name: str) -> ServiceInfo:
        """Return an instance of ``name`` (round-robin over live ones in Redis mode).

        Falls back to ``fallbacks[name]``; else raises :class:`ServiceNotFound`
        or :class:`RegistryUnavailable` (both :class:`SagaError`).
        """
        self._check_open()
        if not is_valid_name(name):
            raise InvalidEvent("bad_name", f"service name {name!r} must match {model.NAME_PATTERN}")
        try:
            return await self._backend.discover(name)
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

    def discover_service(self, name: str) -> ServiceInfo:
        """See :meth:`AsyncSagaServiceDiscovery.discover_service`."""
        return self._call(lambda c: c.discover_service(name))

    def discover_url(self, name: str) -> str:
        return self.discover_service(name).service_url


__all__ = [
    "AsyncSagaServiceDiscovery",
    "Backend",
    "Registration",
    "SagaServiceDiscovery",
    "ServiceInfo",
]
