"""The REST routes: each translates HTTP to a writer or view call and back, nothing more.

Contract: handlers parse the path, query and body (Litestar and msgspec,
with the shapes of :mod:`saga_events.web.schema`), call
:class:`~saga_events.writer.Writer` for writes or read the gateway's view,
and return wire shapes. Ordering, ids, retries and read-your-writes are the
writer's; status codes for its refusals are :mod:`saga_events.web.app`'s.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import anyio
import msgspec
from litestar import Request, Response, delete, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.params import Body, Parameter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import model
from .._redis import TRANSIENT
from ..drain import drain as operator_drain
from ..drain import undrain as operator_undrain
from ..errors import SagaError
from ..writer import Writer, WriteRejected, not_found
from .fast import Heartbeats, registration
from .metrics import CONTENT_TYPE, GatewayMetrics
from .schema import (
    NAME_DOC_PATTERN,
    NAME_RULE,
    DeregisterResult,
    DrainRequest,
    DrainResult,
    ErrorBody,
    Health,
    HeartbeatResult,
    HeartbeatStatus,
    MirrorHealth,
    RedisHealth,
    RegisterRequest,
    RegistrarHealth,
    ServiceInfo,
    ServiceList,
    iso_utc,
)

TOKEN_ENV: Final = "SAGA_API_TOKEN"

PathName = Annotated[
    str, Parameter(pattern=NAME_DOC_PATTERN, description=f"Service name: {NAME_RULE}.")
]
QueryPairs = Annotated[
    list[str] | None,
    Parameter(
        required=False,
        description="Metadata pairs as key:value (split at the first ':'), repeatable.",
    ),
]
QueryId = Annotated[
    str | None,
    Parameter(
        pattern=NAME_DOC_PATTERN,
        required=False,
        description="Only this instance of the service (default: every instance).",
    ),
]


@dataclass
class Context:
    """What the routes work with: the writer (and through it the registrar and the
    view), the metrics, a Redis client for reads, and the write token."""

    writer: Writer
    metrics: GatewayMetrics
    redis: Redis
    token: str | None
    #: last heartbeat times, kept briefly (see :mod:`saga_events.web.fast`)
    heartbeats: Heartbeats = field(init=False)
    #: how failures are answered (``web.app.Failures``, set by ``build_app``)
    failures: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.heartbeats = Heartbeats(self.writer)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self.token.encode())

    async def describe(self, insts: list[model.Instance]) -> list[ServiceInfo]:
        beats = await self.heartbeats.of(insts)
        return [ServiceInfo.of(i, b) for i, b in zip(insts, beats, strict=True)]

    def choose(
        self,
        name: str,
        capability: str | None = None,
        where: dict[str, str] | None = None,
        prefer: dict[str, str] | None = None,
    ) -> model.Instance | None:
        """The instance a GET by name answers: round-robin over live ones, else a draining
        one (without filters only: a filtered GET answers only what matches)."""
        view = self.writer.view
        filtered = capability is not None or bool(where) or bool(prefer)
        insts = view.instances(name)
        if not insts:
            return None
        try:
            return view.pick(name, capability, where=where, prefer=prefer)
        except SagaError:
            return None if filtered else insts[0]

    async def health(self) -> tuple[int, Health]:
        error: str | None = None
        latency: float | None = None
        started = time.perf_counter()
        try:
            with anyio.fail_after(1.0):
                await self.redis.ping()
            latency = round((time.perf_counter() - started) * 1000, 3)
        except TimeoutError:
            error = "timeout"
        except TRANSIENT:
            error = "unreachable"
        reg, view = self.writer.registrar, self.writer.view
        flags_bad = reg.notifications_ok is False
        body = Health(
            status="unavailable" if error else ("degraded" if view.stale or flags_bad else "ok"),
            redis=RedisHealth(ok=error is None, latency_ms=latency, error=error),
            registrar=RegistrarHealth(
                rid=reg.rid,
                subscribed=reg.subscribed,
                uptime_seconds=round(time.time() - reg.started_ms / 1000, 3),
                notifications_ok=reg.notifications_ok,
                notifications_problem=reg.notifications_reason,
            ),
            mirror=MirrorHealth(synced=view.has_synced, stale=view.stale, instances=len(view)),
        )
        return (503 if error else 200), body


_ERR: Final = {
    400: "The request cannot be read: says what is wrong.",
    401: "A bearer token is required for writes.",
    404: "No live instance has that name.",
    409: "Another writer changed the instance meanwhile.",
    415: "Writes need 'Content-Type: application/json'.",
    422: "The registration breaks the registry's rules.",
    503: (
        "The registry is unavailable (Redis unreachable or refusing, or its instance cap "
        "is reached: cap_refused); nothing was changed."
    ),
}


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(ErrorBody, generate_examples=False, description=_ERR[c]) for c in codes}


def handlers(ctx: Context) -> list[Any]:
    """The route handlers of the REST API, bound to ``ctx``."""

    # async: Litestar runs a plain function guard in a worker thread (a thread hop per write).
    async def require_token(
        connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
    ) -> None:
        if not ctx.authorized(connection.headers.get("authorization")):
            raise NotAuthorizedException(
                "this gateway requires 'Authorization: Bearer <token>' for writes "
                f"(the token set in {TOKEN_ENV})"
            )

    write_security: list[dict[str, list[str]]] | None = [{"bearer": []}] if ctx.token else None
    # Without a token the guard passes everything: not run (Litestar copies the route
    # handler for each guard call).
    write_guards: list[Any] = [require_token] if ctx.token is not None else []

    def write(
        route: Callable[..., HTTPRouteHandler],
        path: str,
        codes: tuple[int, ...],
        *,
        summary: str,
        description: str,
    ) -> HTTPRouteHandler:
        """A write route: 200, the token guard, its error answers and security scheme."""
        return route(
            path,
            status_code=200,
            guards=write_guards,
            responses=_errors(*codes),
            security=write_security,
            summary=summary,
            description=description,
        )

    writer = ctx.writer

    @write(
        post,
        "/api/v1/services/register",
        (400, 401, 409, 415, 422, 503),
        summary="Register (or re-register) an instance",
        description=(
            "Without service_id the id is derived from (service_name, service_url), so "
            "registering again refreshes the same instance. The registration expires after "
            "ttl_seconds (default 60) unless heartbeated. Needs Content-Type: application/json."
        ),
    )
    async def register(
        data: Annotated[RegisterRequest, Body(description="The instance to register.")],
    ) -> ServiceInfo:
        inst, now_ms = await writer.register(registration(data))
        ctx.heartbeats.forget(data.service_name)
        return ServiceInfo.of(inst, now_ms)

    @write(
        post,
        "/api/v1/services/{name:str}/heartbeat",
        (400, 401, 404, 415, 503),
        summary="Keep every live instance of a service alive",
        description=(
            "Moves the deadline of every instance of the service (or only ?service_id=). "
            "404 when none is live (also when it expired a moment ago): register again. "
            'An optional JSON body {"status": "failing"|"passing", "reason": "..."} reports '
            "the service's health: failing stores it draining with metadata "
            "health='failing: <reason>', passing serves it again."
        ),
    )
    async def heartbeat(
        request: Request[Any, Any, Any], name: PathName, service_id: QueryId = None
    ) -> HeartbeatResult:
        raw = await request.body()
        status: HeartbeatStatus | None = None
        if raw.strip():
            try:
                status = msgspec.json.decode(raw, type=HeartbeatStatus)
            except msgspec.MsgspecError as exc:
                detail = f"heartbeat body: expected {{'status': 'failing'|'passing'}}: {exc}"
                raise ValidationException(detail) from None
        try:
            ids, now_ms = await writer.heartbeat(
                name,
                service_id,
                status.status if status is not None else None,
                status.reason if status is not None else "",
            )
        finally:
            ctx.heartbeats.forget(name)
        return HeartbeatResult(service_name=name, service_ids=ids, last_heartbeat=iso_utc(now_ms))

    @write(
        delete,
        "/api/v1/services/{name:str}",
        (400, 401, 404, 409, 415, 503),
        summary="Deregister every instance of a service",
        description="Removes every instance of the service, or only ?service_id=.",
    )
    async def deregister(name: PathName, service_id: QueryId = None) -> DeregisterResult:
        try:
            removed = await writer.deregister(name, service_id)
        finally:
            ctx.heartbeats.forget(name)
        return DeregisterResult(service_name=name, removed=removed)

    @write(
        post,
        "/api/v1/services/{name:str}/drain",
        (400, 401, 404, 409, 415, 422, 503),
        summary="Take instances out of rotation (an operator's override)",
        description=(
            "Every instance of the service, or only ?service_id=, is stored draining "
            "whatever its own heartbeats say, until /undrain or ?duration=SECONDS. Who "
            'and why: a JSON body {"by": ..., "reason": ...} or the headers X-Saga-By '
            "and X-Saga-Reason."
        ),
    )
    async def drain(
        request: Request[Any, Any, Any],
        name: PathName,
        service_id: QueryId = None,
        duration: Annotated[
            float | None,
            Parameter(
                required=False,
                gt=0,
                le=365 * 86400,
                description="Seconds until the drain ends (at most a year).",
            ),
        ] = None,
    ) -> DrainResult:
        by, reason = await _who(request)
        insts = await operator_drain(
            writer, name, service_id, by=by, reason=reason, duration=duration
        )
        ctx.heartbeats.forget(name)
        return DrainResult(service_name=name, instances=await ctx.describe(insts))

    @write(
        post,
        "/api/v1/services/{name:str}/undrain",
        (400, 401, 404, 409, 415, 503),
        summary="End an operator's drain",
        description="Every instance of the service, or only ?service_id=.",
    )
    async def undrain(name: PathName, service_id: QueryId = None) -> DrainResult:
        insts = await operator_undrain(writer, name, service_id)
        ctx.heartbeats.forget(name)
        return DrainResult(service_name=name, instances=await ctx.describe(insts))

    @get(
        "/api/v1/services/{name:str}",
        responses=_errors(400, 404),
        summary="Discover one live instance of a service",
        description=(
            "Round-robin (weighted by metadata 'weight') over the live, non-draining "
            "instances. ?capability= keeps those with it; ?where=key:value (repeatable) "
            "keeps those whose metadata has every pair; ?prefer=key:value (repeatable) "
            "picks among those that also have these pairs, and among the rest when none does."
        ),
    )
    async def discover(
        name: PathName,
        capability: Annotated[
            str | None, Parameter(required=False, description="Only instances with it.")
        ] = None,
        where: QueryPairs = None,
        prefer: QueryPairs = None,
    ) -> ServiceInfo:
        must = _pairs("where", where)
        wish = _pairs("prefer", prefer)
        inst = ctx.choose(name, capability, must, wish)
        if inst is None:
            if capability is not None or must or wish:
                raise WriteRejected(
                    "not_found", "not_found", f"no live instance of {name!r} matches the filters"
                )
            raise not_found(name, None)
        return (await ctx.describe([inst]))[0]

    @get("/api/v1/services", summary="List every service and its instances")
    async def list_services() -> ServiceList:
        services = writer.view.services()
        flat = [i for insts in services.values() for i in insts]
        infos = iter(await ctx.describe(flat))
        return ServiceList(
            services={name: [next(infos) for _ in insts] for name, insts in services.items()},
            count=len(flat),
            stale=writer.view.stale,
        )

    @get(
        "/health",
        responses={
            503: ResponseSpec(Health, generate_examples=False, description="Redis is unreachable.")
        },
        summary="Redis, registrar and view state",
    )
    async def health() -> Response[Health]:
        status, body = await ctx.health()
        return Response(body, status_code=status)

    @get("/metrics", media_type=CONTENT_TYPE, summary="Prometheus metrics")
    async def metrics() -> str:
        await _read_revision(ctx)
        return ctx.metrics.render()

    return [
        register,
        heartbeat,
        deregister,
        drain,
        undrain,
        discover,
        list_services,
        health,
        metrics,
    ]


async def _who(request: Request[Any, Any, Any]) -> tuple[str, str]:
    """Who drains and why: the JSON body, else the X-Saga-By/X-Saga-Reason headers."""
    raw = await request.body()
    by = request.headers.get("x-saga-by") or ""
    reason = request.headers.get("x-saga-reason") or ""
    if raw.strip():
        try:
            body = msgspec.json.decode(raw, type=DrainRequest)
        except msgspec.MsgspecError as exc:
            detail = f"drain body: expected {{'by': str, 'reason': str}}: {exc}"
            raise ValidationException(detail) from None
        by = body.by if body.by is not None else by
        reason = body.reason if body.reason is not None else reason
    return by, reason


def _pairs(label: str, raw: list[str] | None) -> dict[str, str] | None:
    """``key:value`` query values as a dict; a value without ':' is a 400."""
    if not raw:
        return None
    out: dict[str, str] = {}
    for item in raw:
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise ValidationException(
                f"{label}={item!r}: expected key:value (a metadata key, ':', the value)"
            )
        out[key] = value
    return out


async def _read_revision(ctx: Context) -> None:
    """The registry revision for the gauge; left as it was when Redis does not answer."""
    with anyio.move_on_after(0.5):
        try:
            raw = await ctx.redis.get(ctx.writer.registrar.keys.rev)
        except (*TRANSIENT, RedisError):  # e.g. a role that may not GET it: left as it was
            return
        ctx.metrics.revision = int(raw) if raw is not None and raw.isdigit() else None
