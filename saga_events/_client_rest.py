"""The client's REST transport: the seed's HTTP API with keep-alive, a watch and a cache (internal).

Contract: each registration is heartbeated in the background and registered
again when a heartbeat is not answered 200. With a ``health_check``, each
heartbeat first runs it and carries its verdict as the body
``{"status": "failing"|"passing", "reason": ...}`` (a registration made while
it fails is followed at once by a failing heartbeat). Discovery follows the gateway's
watch stream (``GET /api/v1/watch``, a :class:`WatchFollower` started on the
first ``discover``) and answers from its view, by the mirror's default
strategy (smooth weighted round-robin over metadata ``weight``) over the live
instances, without a request: current within milliseconds. It asks the
gateway (``GET /api/v1/services/{name}``, the poll path) instead when the
view has no live instance of the name (a registration may be a few
milliseconds ahead of the stream), when this client's own register or
unregister of the name has not reached the view yet (read-your-writes), and
when the view stopped being current (stream down or the gateway stale) more
than ``cache_ttl`` seconds ago; within ``cache_ttl`` the last view is served
marked ``cache``. A gateway without the endpoint (404/405) is polled for good.
Poll answers are cached ``cache_ttl`` seconds; while the gateway is
unreachable the last poll answer, else the view's last instance, is served
``stale``. Only the gateway's 400/413/422 raise
(:class:`InvalidEvent`).
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
from .model import Instance
from .selection import Selection, SelectionState
from .sse_client import WatchFollower, WatchUnsupported

if TYPE_CHECKING:
    import httpx

from ._client_base import Filters, HealthOptions, Registration, ServiceInfo
from .health import HealthGate

log = logging.getLogger("saga_events.client")


def _as_instance(info: ServiceInfo) -> Instance:
    """What the selection reads of an instance (id, capabilities, metadata)."""
    return Instance(
        incarnation=0,
        seq=0,
        registered_at_ms=0,
        service_name=info.service_name,
        service_id=info.service_id,
        service_url=info.service_url,
        capabilities=info.capabilities,
        metadata=info.metadata,
        draining=info.draining,
    )


def _why(exc: BaseException) -> str:
    """An exception as text, with its type (httpx's timeouts have an empty message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RestRegistration:
    def __init__(
        self, reg: Registration, scope: anyio.CancelScope, gate: HealthGate | None = None
    ) -> None:
        self.reg = reg
        self.scope = scope
        self.confirmed = False
        self.gate = gate  # the client's health_check, run before each heartbeat


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
        watch: bool = True,
        health: HealthOptions | None = None,
    ) -> None:
        self._health = health
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
        self._timeout = timeout
        self._watch = watch  # False once the gateway has no stream or the follower failed
        self._follower: WatchFollower | None = None
        # name -> (the follower's event count, its selection, its instances by id)
        self._selections: dict[str, tuple[int, Selection, dict[str, ServiceInfo]]] = {}
        # Our own writes not seen in the view yet: name -> (service_id, url or None if left).
        self._own: dict[str, tuple[str, str | None]] = {}
        self.watch_answers = 0  # discoveries answered from the stream's view
        self.poll_answers = 0  # discoveries that asked the gateway

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
        self._own[reg.service_name] = (reg.service_id, reg.service_url)
        try:
            return ServiceInfo.from_json(resp.content)
        except msgspec.MsgspecError as exc:
            log.warning("%s: unreadable registration answer (%s)", reg.service_name, exc)
            return None

    async def _post_heartbeat(self, reg: Registration, gate: HealthGate | None = None) -> bool:
        body: dict[str, str] | None = None
        if gate is not None:  # the health check's verdict, for the gateway to store
            failure = gate.failure
            body = (
                {"status": "passing"}
                if failure is None
                else {"status": "failing", "reason": failure.removeprefix("failing: ")}
            )
        try:
            resp = await self._http.post(
                f"/api/v1/services/{reg.service_name}/heartbeat",
                params={"service_id": reg.service_id},
                json=body,
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
        gate = entry.gate
        if gate is not None:
            await gate.run()  # never raises: a failure is sent as the heartbeat's status
        if entry.confirmed and await self._post_heartbeat(entry.reg, gate):
            return True
        try:
            if await self._post_register(entry.reg) is None:
                return False
            if gate is not None and gate.failure is not None:
                # A registration is serving: say at once that it is failing.
                await self._post_heartbeat(entry.reg, gate)
            return True
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
            gate = self._health.gate() if self._health is not None else None
            entry = _RestRegistration(reg, anyio.CancelScope(), gate)
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
        if entry.gate is not None:
            entry.gate.close()
        self._cache.pop(name, None)
        self._own[name] = (entry.reg.service_id, None)
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

    # -- discovery -----------------------------------------------------------------------

    def _start_follower(self) -> WatchFollower | None:
        if not self._watch or self._tg is None:
            return None
        if self._follower is None:
            self._follower = WatchFollower(self.saga_url, client=self._http, clock=self._clock)
            self._tg.start_soon(self._follow, self._follower)
        return self._follower

    async def _follow(self, follower: WatchFollower) -> None:
        try:
            await follower.run()
        except WatchUnsupported as exc:
            log.info("%s; discovery polls every cache_ttl (%ss)", exc, self._cache_ttl)
        except Exception:
            log.exception("the watch stream follower failed; discovery polls from now on")
        finally:
            self._watch = False

    async def _from_stream(self, name: str) -> ServiceInfo | None:
        """An answer from the watch stream's view, or None: ask the gateway."""
        follower = self._start_follower()
        if follower is None:
            return None

        def settled(f: WatchFollower) -> bool:
            return f.has_synced or f.failures > 0 or f.supported is False

        if not settled(follower):
            try:
                await follower.wait_until(settled, timeout=self._timeout)
            except TimeoutError:
                return None
        if not self._watch or not follower.has_synced:
            return None
        current = follower.current
        if not current and follower.down_for() >= self._cache_ttl:
            return None
        own = self._own.get(name)
        insts = follower.instances(name)
        if own is not None:
            sid, url = own
            mine = [i for i in insts if i.get("service_id") == sid]
            seen = (url is None and not mine) or (bool(mine) and mine[0].get("service_url") == url)
            if not seen:
                return None
            del self._own[name]
        info = self._last_view(name)
        if info is None:
            return None
        self.watch_answers += 1
        return info if current else info.with_source("cache")

    def _last_view(self, name: str) -> ServiceInfo | None:
        """The next instance of ``name`` in the follower's view: live ones first, picked
        as :meth:`Mirror.pick` does (smooth weighted round-robin over metadata
        ``weight``, :mod:`saga_events.selection`). The selection is built once per
        version of the view (the follower's event count), not per call."""
        follower = self._follower
        if follower is None or not follower.has_synced:
            return None
        version = follower.events
        cached = self._selections.get(name)
        if cached is None or cached[0] != version:
            state = cached[1].state if cached is not None else SelectionState()
            insts = follower.instances(name)
            live = [i for i in insts if not i.get("draining")] or insts
            infos: dict[str, ServiceInfo] = {}
            for raw in live:
                try:
                    info = ServiceInfo.from_json(msgspec.json.encode(raw))
                except msgspec.MsgspecError as exc:
                    log.warning("%s: unreadable instance in the watch stream (%s)", name, exc)
                    continue
                infos[info.service_id] = info
            candidates = tuple(_as_instance(i) for i in infos.values())
            cached = (version, Selection(candidates, state), infos)
            self._selections[name] = cached
        _version, selection, infos = cached
        if not selection.candidates:
            return None
        return infos[selection.round_robin().service_id]

    async def discover(self, name: str, filters: Filters | None = None) -> ServiceInfo:
        # Filtered lookups are answered by the gateway (it applies the selectors);
        # plain ones from the watch stream's view when it is current.
        if filters is None or not filters.params():
            answer = await self._from_stream(name)
            if answer is not None:
                return answer
        self.poll_answers += 1
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
        last = self._last_view(name)
        if last is not None:
            log.warning("%s: %s; serving the watch stream's last view", name, reason)
            return last.with_source("stale")
        raise RegistryUnavailable(name, reason)

    async def aclose(self) -> None:
        for entry in self._regs.values():
            if entry.gate is not None:
                entry.gate.close()
        await self._http.aclose()
