"""The HTTP gateway: the seed's REST API, served from inside a registrar process.

Reads come from the gateway's own :class:`~saga_events.mirror.Mirror` (a
dictionary lookup, no Redis round trip except for ``last_heartbeat``). Writes
become the same events an :class:`~saga_events.agent.Agent` publishes,
checked by the same rules (:func:`saga_events.model.decode_event`), and are
applied by the registrar's own Lua script through :meth:`Registrar.apply`.
A write is answered only once the gateway's mirror shows it, so a client
reads its own writes: a GET right after a register never answers 404.

Ordering of HTTP writes (they have no agent incarnation):

* A registration of an instance that Redis does not hold starts a new
  incarnation taken from the gateway's clock: ``max(last + 1, now_ms * 1000)``
  (a hybrid clock: never goes back, even if the wall clock does), and above
  the instance's tombstone if one is left from a recent DELETE.
* A re-register or a DELETE of an instance Redis holds is applied with
  ``after_newest``: the script gives it the instance's newest applied
  incarnation and the next ``seq``, so it outranks everything before it.
  An unchanged record is then a refresh (only the deadline moves,
  ``registered_at`` is kept, mirrors see nothing), a changed one an update.
* A heartbeat carries exactly the newest applied ``(incarnation, seq)``
  (read from the registrar's order hash), so it only moves the deadline and
  never outranks the owner's own next event (an Agent's update).
* A write the script still answers ``stale`` (it lost a race with a
  tombstone) is retried from what Redis holds now, up to eight attempts
  with a short random pause; within one gateway, writes to one instance
  take turns.

The web stack (Litestar, uvicorn) is imported only with this module, which
the CLI imports only when HTTP is on.

It serves one registrar; an instance of :class:`Gateway` is not thread-safe
(it lives on the registrar's event loop).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus
from msgspec import Meta
from redis.exceptions import RedisError

try:
    import uvicorn
    from litestar import Litestar, Request, Response, delete, get, post
    from litestar.connection import ASGIConnection
    from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
    from litestar.handlers.base import BaseRouteHandler
    from litestar.openapi import OpenAPIConfig, ResponseSpec
    from litestar.openapi.spec import Components, SecurityScheme
    from litestar.params import Body, Parameter
except ImportError as exc:  # pragma: no cover - exercised by hand
    raise ImportError(
        "the HTTP gateway needs the server extra: pip install 'saga-events[server]'"
    ) from exc

from . import __version__, model
from ._redis import TRANSIENT, RedisLike, connect
from .errors import InvalidEvent, SagaError
from .mirror import ChangesOverflow, Mirror
from .registrar import ApplyResult, Registrar
from .web.surface import web_routes
from .web.watch import WatchHub

log = logging.getLogger("saga_events.gateway")

DEFAULT_HTTP_PORT: Final = 8030
DEFAULT_HTTP_HOST: Final = "127.0.0.1"
TOKEN_ENV: Final = "SAGA_API_TOKEN"
_WRITE_RETRIES: Final = 8

_NAME_RULE: Final = "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"

# The OpenAPI document states the rules in ECMA-262 regex syntax (``$``, not
# Python's ``\Z``); saga_events.model then applies the exact rules to every
# write, so a name with a trailing newline still gets a 422.
_NAME_DOC_PATTERN: Final = model.NAME_PATTERN.removesuffix(r"\Z") + "$"

PathName = Annotated[
    str,
    Parameter(
        pattern=_NAME_DOC_PATTERN,
        description=f"Service name: {_NAME_RULE}.",
    ),
]
QueryId = Annotated[
    str | None,
    Parameter(
        pattern=_NAME_DOC_PATTERN,
        required=False,
        description="Only this instance of the service (default: every instance).",
    ),
]


class GatewayError(SagaError):
    """Raised when the gateway cannot start (e.g. its address is in use)."""


# -- wire shapes -------------------------------------------------------------------


_URL_DOC_PATTERN: Final = (
    f"^({'|'.join(sorted(model.DEFAULT_URL_SCHEMES))})"
    r"://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][!-~]*)?$"
)

HttpName = Annotated[
    str, Meta(pattern=_NAME_DOC_PATTERN, description=f"{_NAME_RULE}.", examples=["gateway"])
]
HttpUrl = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=2048,
        description=(
            "Absolute URL with a host; scheme one of http, https, grpc, grpcs, tcp, redis "
            "(the registrar's allow-list)."
        ),
        examples=["http://localhost:8000"],
        extra_json_schema={"extra": {"pattern": _URL_DOC_PATTERN}},
    ),
]
HttpCapabilities = Annotated[
    list[HttpName],
    Meta(
        description="What the instance offers, e.g. rest, graphql, grpc.",
        examples=[["rest", "graphql", "grpc"]],
        extra_json_schema={"extra": {"items": {"type": "string", "pattern": _NAME_DOC_PATTERN}}},
    ),
]

HttpMetadata = Annotated[
    dict[model.MetaKey, model.MetaValue],
    Meta(
        description="Free-form string labels (keys 1-128, values up to 2048 characters).",
        extra_json_schema={
            "extra": {
                "propertyNames": {"minLength": 1, "maxLength": 128},
                "additionalProperties": {"type": "string", "maxLength": 2048},
            }
        },
    ),
]


class RegisterRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/services/register``; unknown fields are ignored."""

    service_name: HttpName
    service_url: HttpUrl
    capabilities: HttpCapabilities = []
    service_id: HttpName | None = None
    metadata: HttpMetadata = {}
    ttl_seconds: Annotated[
        float,
        Meta(
            ge=model.MIN_TTL_MS / 1000,
            le=model.MAX_TTL_MS / 1000,
            description="Seconds until the instance expires unless heartbeated (default 60).",
        ),
    ] = model.DEFAULT_TTL_MS / 1000


class ServiceInfo(msgspec.Struct, kw_only=True):
    """One live instance, in the seed's shape (times are ISO-8601 UTC)."""

    service_id: str
    service_name: str
    service_url: str
    capabilities: list[str]
    registered_at: str
    last_heartbeat: str
    metadata: dict[str, str]
    ttl_seconds: float
    draining: bool


class ServiceList(msgspec.Struct, kw_only=True):
    """Every service with at least one instance, and its instances."""

    services: dict[str, list[ServiceInfo]]
    count: int
    stale: bool


class HeartbeatResult(msgspec.Struct, kw_only=True):
    """Which instances of a service a heartbeat kept alive."""

    service_name: str
    service_ids: list[str]
    last_heartbeat: str


class DeregisterResult(msgspec.Struct, kw_only=True):
    """Which instances of a service a DELETE removed."""

    service_name: str
    removed: list[str]


class RedisHealth(msgspec.Struct, kw_only=True):
    ok: bool
    latency_ms: float | None
    error: str | None


class RegistrarHealth(msgspec.Struct, kw_only=True):
    rid: str
    subscribed: bool
    uptime_seconds: float


class MirrorHealth(msgspec.Struct, kw_only=True):
    synced: bool
    stale: bool
    instances: int


class Health(msgspec.Struct, kw_only=True):
    """``ok`` when Redis answers; ``degraded`` when it answers but the view lags."""

    status: Literal["ok", "degraded", "unavailable"]
    redis: RedisHealth
    registrar: RegistrarHealth
    mirror: MirrorHealth


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the HTTP status, a short reason code, and what is wrong."""

    status_code: int
    error: str
    detail: str


# -- helpers ---------------------------------------------------------------------------


def derived_service_id(service_name: str, service_url: str) -> str:
    """The stable instance id of an HTTP registration that names none.

    The same (name, url) always gives the same id, so a client that
    re-registers (after a failed heartbeat, or a restart) refreshes its
    instance instead of adding a second one.
    """
    digest = hashlib.sha256(f"{service_name}\n{service_url}".encode()).hexdigest()[:12]
    return f"{service_name[:100]}-{digest}"


class HybridClock:
    """Microsecond-scale counter: the wall clock in ms times 1000, never going back.

    ``tick()`` returns ``max(last + 1, now_ms * 1000)``, so values grow strictly
    within one gateway even when the wall clock steps back, and roughly follow
    real time across gateways. It fits the events' ``incarnation`` field
    (< 2**53) until the year 2255.
    """

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self._last = 0

    def tick(self) -> int:
        self._last = max(self._last + 1, self._now_ms() * 1000)
        return self._last


def _info(inst: model.Instance, last_heartbeat_ms: int | None = None) -> ServiceInfo:
    return ServiceInfo(
        service_id=inst.service_id,
        service_name=inst.service_name,
        service_url=inst.service_url,
        capabilities=list(inst.capabilities),
        registered_at=model.iso_utc(inst.registered_at_ms),
        last_heartbeat=model.iso_utc(
            inst.registered_at_ms if last_heartbeat_ms is None else last_heartbeat_ms
        ),
        metadata=dict(inst.metadata),
        ttl_seconds=inst.ttl_ms / 1000,
        draining=inst.draining,
    )


def _announce_like(
    inst: model.Instance, kind: type[model.Announce], incarnation: int, seq: int
) -> model.Announce:
    # A draining record stays draining: its body must not change on a refresh.
    cls = model.Drain if inst.draining else kind
    return cls(
        service_name=inst.service_name,
        service_id=inst.service_id,
        incarnation=incarnation,
        seq=seq,
        service_url=inst.service_url,
        capabilities=inst.capabilities,
        metadata=inst.metadata,
        ttl_ms=inst.ttl_ms,
    )


def _reason_of_validation(key: str | None, message: str) -> str:
    """A short reason code for a request the web layer could not read."""
    text = message.lower()
    if "json" in text or "malformed" in text:
        return "bad_json"
    if "missing required" in text:
        return "missing_field"
    field = (key or "").split(".")[-1].split("[")[0]
    if field in ("service_name", "service_id", "name"):
        return "bad_name"
    return {
        "capabilities": "bad_capabilities",
        "service_url": "bad_url",
        "ttl_seconds": "bad_ttl",
        "metadata": "bad_metadata",
    }.get(field, "invalid")


@dataclass
class GatewayStats:
    """Counters of one gateway; rendered by ``GET /metrics``."""

    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    responses: Counter[tuple[str, int]] = field(default_factory=Counter)
    unavailable: int = 0
    view_timeouts: int = 0


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner.

    uvicorn would replace the SIGINT/SIGTERM handlers for the whole process;
    in a registrar process the CLI owns them and cancels the task group,
    which stops this server gracefully.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _Rejected(Exception):
    """An error answer; ``counted`` ones are bad input and show in the rejected metrics."""

    def __init__(self, status: int, reason: str, detail: str, *, counted: bool = True) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.counted = counted


def _ordering(value: bytes | str | None) -> tuple[int, int] | None:
    """An ``incarnation:seq`` value (the registrar's order hash, a tombstone); None if
    absent or unreadable."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    inc, sep, seq = text.partition(":")
    if sep and inc.isascii() and inc.isdigit() and seq.isascii() and seq.isdigit():
        return int(inc), int(seq)
    return None


def _not_found(name: str, service_id: str | None) -> _Rejected:
    what = f"instance {service_id!r} of service {name!r}" if service_id else f"service {name!r}"
    return _Rejected(404, "not_found", f"no live {what}", counted=False)


# -- the gateway ------------------------------------------------------------------------


class Gateway:
    """The REST API of a registrar.

    ``await tg.start(gateway.run, host, port)`` binds the address, starts
    uvicorn and returns ``(host, port)`` once the server accepts connections
    (port 0 picks a free one). Cancelling the task stops the server
    gracefully. ``mirror`` must be running (``has_synced``) in the same event
    loop; ``redis`` is used for ``/health`` and ``last_heartbeat`` reads.
    """

    def __init__(
        self,
        registrar: Registrar,
        mirror: Mirror,
        redis: RedisLike,
        *,
        token: str | None = None,
        write_timeout: float = 5.0,
        max_body_bytes: int = model.MAX_EVENT_BYTES,
    ) -> None:
        self.registrar = registrar
        self.mirror = mirror
        self._redis = connect(redis)
        self._owns_client = isinstance(redis, str)
        # An empty token (e.g. SAGA_API_TOKEN="") means no token, not "match the empty string".
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV)) or None
        self.write_timeout = write_timeout
        self.max_body_bytes = max_body_bytes
        self.clock = HybridClock()
        self.stats = GatewayStats()
        self._view_changed = anyio.Event()
        self._stale_since: float | None = None
        self._app: Litestar | None = None
        self._locks: dict[tuple[str, str], tuple[anyio.Lock, int]] = {}
        self.address: tuple[str, int] | None = None
        self.watch_hub = WatchHub(mirror, _info)  # the web surface (issue 12)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def app(self) -> Litestar:
        """The Litestar application (built once)."""
        if self._app is None:
            self._app = build_app(self)
        return self._app

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """The ASGI entry point that uvicorn serves: the app, counting every answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        if scope["method"] in ("POST", "DELETE") and str(scope["path"]).startswith(
            "/api/v1/services"
        ):
            self.stats.received += 1  # every write request, accepted or not

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.stats.responses[(str(scope["method"]), int(message["status"]))] += 1
            await send(message)

        await self.app(scope, receive, counting_send)

    async def run(
        self,
        host: str = DEFAULT_HTTP_HOST,
        port: int = DEFAULT_HTTP_PORT,
        *,
        task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve HTTP until cancelled; raises GatewayError if the address is taken."""
        sock = _bind(host, port)
        bound = sock.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        config = uvicorn.Config(
            self.asgi,
            interface="asgi3",
            lifespan="off",
            log_config=None,  # the host process owns logging
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            server_header=False,
        )
        server = _QuietServer(config)
        failure: list[BaseException] = []
        stopped = anyio.Event()

        async def serve() -> None:
            # Shielded: on cancellation we ask uvicorn to exit and let it close
            # its connections, instead of killing it mid-request.
            with anyio.CancelScope(shield=True):
                try:
                    await server.serve(sockets=[sock])
                except BaseException as exc:  # SystemExit from a failed startup too
                    failure.append(exc)
                finally:
                    server.should_exit = True
                    stopped.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._follow_view)
                tg.start_soon(self._watch_staleness)
                await tg.start(self.watch_hub.run)
                tg.start_soon(serve)
                try:
                    with anyio.fail_after(10):
                        # uvicorn offers a flag, not an event, for "accepting".
                        while not server.started:
                            if failure or server.should_exit:
                                raise GatewayError(
                                    f"HTTP gateway could not start on {host}:{port}: "
                                    f"{failure[0] if failure else 'uvicorn stopped'}"
                                )
                            await anyio.sleep(0.01)
                    log.info("HTTP gateway listening on http://%s:%d", *self.address)
                    task_status.started(self.address)
                    await stopped.wait()
                    if failure:
                        raise GatewayError(f"HTTP gateway stopped: {failure[0]}")
                finally:
                    server.should_exit = True
                    tg.cancel_scope.cancel()  # the helpers; serve() finishes shielded
        finally:
            sock.close()
            if self._owns_client:
                with anyio.CancelScope(shield=True):
                    await self._redis.aclose()

    async def _follow_view(self) -> None:
        # Wakes writers waiting for their write to show in the mirror.
        while True:
            try:
                async with self.mirror.changes() as changes:
                    async for _change in changes:
                        self._wake()
                return  # the mirror closed
            except ChangesOverflow:
                self._wake()  # fell behind: waiters re-check the view, then follow anew

    def _wake(self) -> None:
        event, self._view_changed = self._view_changed, anyio.Event()
        event.set()

    async def _watch_staleness(self) -> None:
        while True:
            if self.mirror.stale:
                if self._stale_since is None:
                    self._stale_since = time.monotonic()
            else:
                self._stale_since = None
            await anyio.sleep(0.25)

    async def _wait_view(self, done: Callable[[], bool]) -> bool:
        with anyio.move_on_after(self.write_timeout):
            while not done():
                await self._view_changed.wait()
            return True
        self.stats.view_timeouts += 1
        return False

    @asynccontextmanager
    async def _serialized(self, name: str, service_id: str) -> AsyncIterator[None]:
        """One write at a time per instance within this gateway: concurrent
        registers of one instance would otherwise keep losing races to each other."""
        key = (name, service_id)
        lock, users = self._locks.get(key, (anyio.Lock(), 0))
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

    def _viewed(self, name: str, service_id: str) -> model.Instance | None:
        for inst in self.mirror.instances(name):
            if inst.service_id == service_id:
                return inst
        return None

    # -- reads ---------------------------------------------------------------------------

    async def _last_heartbeats(self, insts: list[model.Instance]) -> list[int | None]:
        """``deadline - ttl`` from the registrar's deadlines set; None where unknown.

        A read must not fail because Redis is slow or down (the mirror's view
        is served as it is): then the registration time stands in.
        """
        if not insts:
            return []
        keys = self.registrar.keys
        with anyio.move_on_after(0.5):
            try:
                pipe = self._redis.pipeline(transaction=False)
                for inst in insts:
                    pipe.zscore(keys.deadlines, keys.inst(inst.service_name, inst.service_id))
                scores = await pipe.execute()
                return [
                    None if s is None else int(s) - inst.ttl_ms
                    for s, inst in zip(scores, insts, strict=True)
                ]
            except TRANSIENT:
                pass
        return [None] * len(insts)

    async def describe(self, insts: list[model.Instance]) -> list[ServiceInfo]:
        beats = await self._last_heartbeats(insts)
        return [_info(i, b) for i, b in zip(insts, beats, strict=True)]

    def choose(self, name: str) -> model.Instance | None:
        """The instance a GET by name answers: round-robin over live ones, else a draining one."""
        # Only this service's instances: services() would copy and sort the whole
        # view on every GET. The check also keeps the mirror's fallbacks out.
        insts = self.mirror.instances(name)
        if not insts:
            return None
        try:
            return self.mirror.pick(name)
        except SagaError:
            return insts[0]

    async def health(self) -> tuple[int, Health]:
        error: str | None = None
        latency: float | None = None
        started = time.perf_counter()
        try:
            with anyio.fail_after(1.0):
                await self._redis.ping()
            latency = round((time.perf_counter() - started) * 1000, 3)
        except (*TRANSIENT, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        reg = self.registrar
        body = Health(
            status="unavailable" if error else ("degraded" if self.mirror.stale else "ok"),
            redis=RedisHealth(ok=error is None, latency_ms=latency, error=error),
            registrar=RegistrarHealth(
                rid=reg.rid,
                subscribed=reg.subscribed,
                uptime_seconds=round(time.time() - reg.started_ms / 1000, 3),
            ),
            mirror=MirrorHealth(
                synced=self.mirror.has_synced, stale=self.mirror.stale, instances=len(self.mirror)
            ),
        )
        return (503 if error else 200), body

    # -- writes ---------------------------------------------------------------------------

    def check(self, event: model.Event) -> model.AnyEvent:
        """Run an event through the registrar's own validation (``model.decode_event``)."""
        raw = model.encode(event)
        try:
            return model.decode_event(raw, event.service_name, schemes=self.registrar.url_schemes)
        except InvalidEvent as exc:
            status = 400 if exc.reason == "oversized" else 422
            raise _Rejected(status, exc.reason, exc.detail) from None

    async def _stored(self, name: str, service_id: str) -> tuple[model.Instance | None, int]:
        """What Redis holds now for an instance: its record, and the incarnation
        of its tombstone (0 if none)."""
        keys = self.registrar.keys
        rec, tomb = await self._redis.mget(keys.inst(name, service_id), keys.tomb(name, service_id))
        inst = None
        if rec is not None:
            try:
                inst = model.decode_instance(rec)
            except msgspec.DecodeError:
                inst = None  # unreadable: a fresh incarnation replaces it
        tomb_pair = _ordering(tomb)
        return inst, tomb_pair[0] if tomb_pair else 0

    async def register(self, req: RegisterRequest) -> ServiceInfo:
        name = req.service_name
        sid = req.service_id or derived_service_id(name, req.service_url)
        # Checked before any Redis I/O: bad input gets its 422 even while Redis is
        # down. Each attempt below changes only the ordering fields, which come
        # from the gateway's clock or from what the registrar stored.
        checked = self.check(
            model.Register(
                service_name=name,
                service_id=sid,
                incarnation=0,
                seq=0,
                service_url=req.service_url,
                capabilities=tuple(req.capabilities),
                metadata=dict(req.metadata),
                ttl_ms=round(req.ttl_seconds * 1000),
            )
        )
        assert isinstance(checked, model.Register)
        result: ApplyResult | None = None
        event: model.Announce | None = None
        async with self._serialized(name, sid):
            for attempt in range(_WRITE_RETRIES):
                if attempt:
                    await anyio.sleep(random.uniform(0, 0.002 * attempt))  # let the winner finish
                stored, tomb_inc = await self._stored(name, sid)
                if stored is not None:
                    inc, seq = stored.incarnation, stored.seq + 1
                else:
                    inc, seq = max(self.clock.tick(), tomb_inc + 1), 1
                event = msgspec.structs.replace(checked, incarnation=inc, seq=seq)
                result = await self.registrar.apply(event, after_newest=True)
                if result.status != "stale":
                    break
        if result is None or event is None or result.status == "stale":
            raise _Rejected(
                409, "conflict", f"instance {name}/{sid} is being changed by another writer; retry"
            )
        written = (result.incarnation, result.seq)

        def shown() -> bool:
            inst = self._viewed(name, sid)
            if inst is None:
                return False
            if result is not None and result.status == "refreshed":
                return True
            return (inst.incarnation, inst.seq) >= written

        if not await self._wait_view(shown):
            log.warning("register %s/%s applied but not yet in the gateway's view", name, sid)
        inst = self._viewed(name, sid)
        if inst is None:  # only after a view timeout: answer from the event itself
            inst = model.Instance(
                incarnation=event.incarnation,
                seq=event.seq,
                registered_at_ms=result.registered_at_ms,
                **msgspec.structs.asdict(model.body_of(event)),
            )
        return _info(inst, result.now_ms)

    async def _newest_pairs(self, insts: list[model.Instance]) -> list[tuple[int, int]]:
        """The newest (incarnation, seq) applied to each instance: the registrar's
        order hash, or the record's own pair where the hash has none."""
        keys = self.registrar.keys
        raw = await self._redis.hmget(
            keys.order, [keys.inst(i.service_name, i.service_id) for i in insts]
        )
        return [
            _ordering(value) or (inst.incarnation, inst.seq)
            for inst, value in zip(insts, raw, strict=True)
        ]

    def _targets(self, name: str, service_id: str | None) -> list[model.Instance]:
        """The live instances a heartbeat or DELETE acts on; a 404 when there are none."""
        insts = self.mirror.instances(name)
        if service_id is not None:
            insts = [i for i in insts if i.service_id == service_id]
        if not insts:
            raise _not_found(name, service_id)
        return insts

    async def heartbeat(self, name: str, service_id: str | None) -> HeartbeatResult:
        targets = self._targets(name, service_id)
        # A heartbeat carries exactly the newest (incarnation, seq) applied to
        # the instance: the script then only moves its deadline. A newer pair
        # would outrank the owner's own next events (an Agent's update would
        # be dropped as stale); an older one would be ignored.
        pairs = await self._newest_pairs(targets)
        events = [
            self.check(_announce_like(i, model.Heartbeat, inc, seq))
            for i, (inc, seq) in zip(targets, pairs, strict=True)
        ]
        results = await self.registrar.apply_many(events)
        return HeartbeatResult(
            service_name=name,
            service_ids=[i.service_id for i in targets],
            last_heartbeat=model.iso_utc(max(r.now_ms for r in results)),
        )

    async def deregister(self, name: str, service_id: str | None) -> DeregisterResult:
        targets = self._targets(name, service_id)
        removed: list[str] = []
        lost: list[str] = []
        for inst in targets:
            current: model.Instance | None = inst
            for attempt in range(_WRITE_RETRIES):
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
            raise _Rejected(
                409,
                "conflict",
                f"{name}: instance {', '.join(lost)} is being changed by another writer "
                f"and was not removed{done}; retry",
            )
        gone = set(removed)

        def shown() -> bool:
            return not any(i.service_id in gone for i in self.mirror.instances(name))

        if not await self._wait_view(shown):
            log.warning("deregister of %s applied but still in the gateway's view", name)
        return DeregisterResult(service_name=name, removed=sorted(removed))

    # -- authorisation ------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    # -- metrics --------------------------------------------------------------------------

    def metrics_text(self) -> str:
        from .metrics import render_metrics

        return render_metrics(self)

    def stale_seconds(self) -> float:
        """How long the gateway's view has been stale; 0.0 while it is current."""
        if self._stale_since is None or not self.mirror.stale:
            return 0.0
        return time.monotonic() - self._stale_since


async def run_gateway(
    registrar: Registrar,
    redis: str,
    host: str = DEFAULT_HTTP_HOST,
    port: int = DEFAULT_HTTP_PORT,
    token: str | None = None,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP API of ``registrar`` with a mirror of its own, until cancelled.

    ``await tg.start(run_gateway, registrar, url, host, port)`` returns the
    bound ``(host, port)`` once the mirror has synced and the server accepts
    connections.
    """
    async with Mirror(redis, namespace=registrar.keys.ns) as mirror:
        gateway = Gateway(registrar, mirror, redis, token=token)
        await gateway.run(host, port, task_status=task_status)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it: without it, Nagle holds a response's body
        # until the client's delayed ACK of its headers (40 ms per request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise GatewayError(f"HTTP gateway cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


# -- the Litestar application -------------------------------------------------------------------

_ERR: Final = {
    400: ResponseSpec(
        ErrorBody,
        generate_examples=False,
        description="The request cannot be read: says what is wrong.",
    ),
    401: ResponseSpec(
        ErrorBody, generate_examples=False, description="A bearer token is required for writes."
    ),
    404: ResponseSpec(
        ErrorBody, generate_examples=False, description="No live instance has that name."
    ),
    409: ResponseSpec(
        ErrorBody,
        generate_examples=False,
        description="Another writer changed the instance meanwhile.",
    ),
    422: ResponseSpec(
        ErrorBody,
        generate_examples=False,
        description="The registration breaks the registry's rules.",
    ),
    503: ResponseSpec(
        ErrorBody, generate_examples=False, description="Redis is unreachable; nothing was changed."
    ),
}


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: _ERR[c] for c in codes}


def _error(status: int, reason: str, detail: str) -> Response[ErrorBody]:
    return Response(ErrorBody(status_code=status, error=reason, detail=detail), status_code=status)


def build_app(gw: Gateway) -> Litestar:
    """The Litestar application of gateway ``gw``."""

    def require_token(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if not gw.authorized(connection.headers.get("authorization")):
            raise NotAuthorizedException(
                "this gateway requires 'Authorization: Bearer <token>' for writes "
                f"(the token set in {TOKEN_ENV})"
            )

    write_security: list[dict[str, list[str]]] | None = [{"bearer": []}] if gw.token else None

    @post(
        "/api/v1/services/register",
        status_code=200,
        guards=[require_token],
        responses=_errors(400, 401, 409, 422, 503),
        security=write_security,
        summary="Register (or re-register) an instance",
        description=(
            "Without service_id the id is derived from (service_name, service_url), so "
            "registering again refreshes the same instance. The registration expires after "
            "ttl_seconds (default 60) unless heartbeated."
        ),
    )
    async def register(
        data: Annotated[RegisterRequest, Body(description="The instance to register.")],
    ) -> ServiceInfo:
        return await gw.register(data)

    @post(
        "/api/v1/services/{name:str}/heartbeat",
        status_code=200,
        guards=[require_token],
        responses=_errors(400, 401, 404, 503),
        security=write_security,
        summary="Keep every live instance of a service alive",
        description=(
            "Moves the deadline of every instance of the service (or only ?service_id=). "
            "404 when none is live: the client should register again."
        ),
    )
    async def heartbeat(name: PathName, service_id: QueryId = None) -> HeartbeatResult:
        return await gw.heartbeat(name, service_id)

    @delete(
        "/api/v1/services/{name:str}",
        status_code=200,
        guards=[require_token],
        responses=_errors(400, 401, 404, 409, 503),
        security=write_security,
        summary="Deregister every instance of a service",
        description="Removes every instance of the service, or only ?service_id=.",
    )
    async def deregister(name: PathName, service_id: QueryId = None) -> DeregisterResult:
        return await gw.deregister(name, service_id)

    @get(
        "/api/v1/services/{name:str}",
        responses=_errors(400, 404),
        summary="Discover one live instance of a service",
        description="Round-robin over the live, non-draining instances.",
    )
    async def discover(name: PathName) -> ServiceInfo:
        inst = gw.choose(name)
        if inst is None:
            raise _not_found(name, None)
        return (await gw.describe([inst]))[0]

    @get("/api/v1/services", summary="List every service and its instances")
    async def list_services() -> ServiceList:
        services = gw.mirror.services()
        flat = [i for insts in services.values() for i in insts]
        infos = iter(await gw.describe(flat))
        return ServiceList(
            services={name: [next(infos) for _ in insts] for name, insts in services.items()},
            count=len(flat),
            stale=gw.mirror.stale,
        )

    @get(
        "/health",
        responses={
            503: ResponseSpec(Health, generate_examples=False, description="Redis is unreachable.")
        },
        summary="Redis, registrar and view state",
    )
    async def health() -> Response[Health]:
        status, body = await gw.health()
        return Response(body, status_code=status)

    @get("/metrics", media_type="text/plain; version=0.0.4", summary="Prometheus metrics")
    async def metrics() -> str:
        return gw.metrics_text()

    def on_validation(
        request: Request[Any, Any, Any], exc: ValidationException
    ) -> Response[ErrorBody]:
        extra = exc.extra if isinstance(exc.extra, list) else []
        parts: list[str] = []
        reason = ""
        for item in extra:
            if isinstance(item, dict):
                key = item.get("key")
                msg = str(item.get("message", ""))
                if key == "data" and msg == "'data'":  # Litestar's words for "no body"
                    msg = "JSON body is missing: expected an object with service_name, service_url"
                elif "matching regex" in msg:
                    msg += f" ({_NAME_RULE})"
                parts.append(f"{key}: {msg}" if key else msg)
                reason = reason or _reason_of_validation(key, msg)
        detail = "; ".join(parts) or str(exc.detail)
        reason = reason or _reason_of_validation(None, str(exc.detail))
        gw.stats.rejected[reason] += 1
        return _error(400, reason, f"{exc.detail}: {detail}" if parts else detail)

    def on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
        status = exc.status_code
        if status == 413:  # the body limit: bad input like any other (issue 3)
            gw.stats.rejected["oversized"] += 1
            return _error(400, "oversized", f"request body exceeds {gw.max_body_bytes} bytes")
        reason = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "bad_request" if status < 500 else "internal"
        )
        if status == 401:
            gw.stats.rejected["unauthorized"] += 1
            response = _error(401, reason, str(exc.detail))
            response.headers["WWW-Authenticate"] = 'Bearer realm="saga-events"'
            return response
        detail = str(exc.detail)
        if status == 400:
            gw.stats.rejected["bad_json"] += 1
            reason = "bad_json"
            if "json" not in detail.lower():
                detail = f"request body is not valid JSON: {detail}"
        response = _error(status, reason, detail)
        for key, value in (exc.headers or {}).items():  # e.g. Allow on a 405
            response.headers[key] = value
        return response

    def on_rejected(request: Request[Any, Any, Any], exc: _Rejected) -> Response[ErrorBody]:
        if exc.counted:
            gw.stats.rejected[exc.reason] += 1
        return _error(exc.status, exc.reason, exc.detail)

    def on_redis(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        gw.stats.unavailable += 1
        return _error(
            503,
            "redis_unavailable",
            f"Redis is unreachable ({type(exc).__name__}); nothing was changed",
        )

    def on_other(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        if isinstance(exc, TRANSIENT):
            return on_redis(request, exc)
        if isinstance(exc, RedisError):  # e.g. READONLY during a failover, OOM
            gw.stats.unavailable += 1
            log.warning("Redis refused a gateway write: %s", exc)
            return _error(503, "redis_error", f"Redis refused the write: {exc}")
        log.exception("HTTP gateway bug on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    app = Litestar(
        route_handlers=[
            *[register, heartbeat, deregister, discover, list_services, health, metrics],
            *web_routes(gw.watch_hub, gw.mirror),
        ],
        exception_handlers={
            ValidationException: on_validation,
            HTTPException: on_http,
            _Rejected: on_rejected,
            Exception: on_other,
        },
        request_max_body_size=gw.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="saga-events HTTP gateway",
            version=__version__,
            description=(
                "The Saga REST API served by a saga-events registrar. Writes become registry "
                "events; reads come from the gateway's live view of the registry."
            ),
            path="/schema",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description=TOKEN_ENV)
                }
            ),
        ),
        debug=False,
        logging_config=None,  # the host process owns logging
    )
    return app
