"""The client's REST transport: the seed's HTTP API with keep-alive and a cache (internal).

Contract: each registration is heartbeated in the background and registered
again when a heartbeat is not answered 200; discovery answers are cached
``cache_ttl`` seconds and served ``stale`` while the gateway is unreachable.
Only the gateway's 400/413/422 raise (:class:`InvalidEvent`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from ._redis import Backoff
from .errors import InvalidEvent, RegistryUnavailable, ServiceNotFound

if TYPE_CHECKING:
    import httpx

from ._client_base import Filters, Registration, ServiceInfo

log = logging.getLogger("saga_events.client")


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

    async def discover(self, name: str, filters: Filters | None = None) -> ServiceInfo:
        now = self._clock()
        params = filters.params() if filters is not None else []
        key = f"{name}?{urlencode(params)}" if params else name  # a filtered answer: its own entry
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._cache_ttl:
            return cached[1].with_source("cache")
        try:
            resp = await self._http.get(f"/api/v1/services/{name}", params=params)
        except self._httpx_errors as exc:
            return self._stale_or_raise(name, cached, f"cannot reach {self.saga_url}: {_why(exc)}")
        if resp.status_code == 404:
            self._cache.pop(key, None)
            raise ServiceNotFound(name, filters.capability if filters else None)
        if resp.status_code != 200:
            return self._stale_or_raise(name, cached, f"the gateway answered {resp.status_code}")
        try:
            info = ServiceInfo.from_json(resp.content)
        except msgspec.MsgspecError as exc:
            return self._stale_or_raise(name, cached, f"unreadable answer: {exc}")
        self._cache[key] = (now, info)
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
