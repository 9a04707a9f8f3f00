"""The Litestar application of a gateway and the ASGI front that guards it.

One job: assemble the routes (:mod:`saga_events.web.routes`) into an app that
answers every failure with an :class:`~saga_events.web.schema.ErrorBody`,
and put in front of it the checks that come before any route:

* the Host header, on loopback binds: only ``localhost``, ``127.0.0.1``,
  ``[::1]`` (or the bound address) with the bound port; anything else is a
  ``421`` (a DNS-rebinding page cannot read or write the registry);
* a register must carry ``Content-Type: application/json``, and the
  bodyless writes (heartbeat, DELETE) must not carry a type a web page can
  send cross-site without a preflight (form, multipart, ``text/plain``):
  ``415`` otherwise, so a cross-site form post cannot write;
* every answer is counted by method and status, and timed by route.

Errors never show internals to callers: a Redis failure is ``503`` with
``registry unavailable`` and a reason code; the Redis message, key names or
ACL errors go to the log (rate-limited), as do undecodable bodies (a JSON
bomb is a ``400 bad_json``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

import msgspec
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)

from .. import __version__, model
from .._redis import TRANSIENT, RateLimitedLog
from ..writer import WriteRejected
from .fast import JSON_HEADERS, FastReads, FastRegister
from .metrics import route_of
from .routes import TOKEN_ENV, Context, handlers
from .schema import NAME_RULE, ErrorBody
from .watch import RAW_SEND

log = logging.getLogger("saga_events.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

_STATUS_OF: Final = {
    "invalid": 422,
    "oversized": 400,
    "not_found": 404,
    "conflict": 409,
    "capped": 503,
}
_REDIS_CODE: Final = re.compile(
    r"(?:^|[\s:-])(OOM|READONLY|NOPERM|NOAUTH|WRONGPASS|LOADING|BUSY|MASTERDOWN|MISCONF"
    r"|NOREPLICAS|CLUSTERDOWN|CROSSSLOT|MOVED|ASK|TRYAGAIN|NOSCRIPT|EXECABORT)\b"
)
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The types a web page may POST cross-site without a CORS preflight.
_FORM_TYPES: Final = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
)
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "[::1]")
_REGISTER: Final = "/api/v1/services/register"


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


def _code_of(exc: RedisError) -> str | None:
    """The reason code of the Redis errors that redis-py turns into classes."""
    for cls, code in (
        (NoPermissionError, "noperm"),
        (ReadOnlyError, "readonly"),
        (OutOfMemoryError, "oom"),
        (BusyLoadingError, "loading"),
        (AuthenticationError, "noauth"),
    ):
        if isinstance(exc, cls):
            return code
    return None


def _error(status: int, reason: str, detail: str) -> Response[ErrorBody]:
    return Response(ErrorBody(status_code=status, error=reason, detail=detail), status_code=status)


class Failures:
    """How the failures of a handler are answered and counted: ``(status, reason,
    detail)`` for a refused write, Redis down or refusing, an unreadable body, or a
    bug. Shared by the app's exception handlers and the front's fast register."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.refusals = RateLimitedLog(log, burst=5, window=60.0)
        self.bugs = RateLimitedLog(log, burst=5, window=60.0)

    def bad_json(self, detail: str) -> tuple[int, str, str]:
        self.stats.rejected["bad_json"] += 1
        return 400, "bad_json", detail

    def rejected(self, exc: WriteRejected) -> tuple[int, str, str]:
        if exc.kind != "not_found":
            self.stats.rejected[exc.reason] += 1
        return _STATUS_OF[exc.kind], exc.reason, exc.detail

    def unavailable(self, method: str, path: str, exc: Exception) -> tuple[int, str, str]:
        self.stats.unavailable += 1
        if isinstance(exc, RedisError) and not isinstance(exc, TRANSIENT):
            # READONLY during a failover, OOM, NOPERM under a narrow role...: the
            # Redis words (key names, ACL rules) are for the log only.
            match = _REDIS_CODE.search(str(exc))
            code = _code_of(exc) or (match.group(1).lower() if match else "refused")
            self.refusals.warning("Redis refused %s %s: %s", method, path, str(exc)[:300])
            return 503, "redis_error", f"registry unavailable ({code}); nothing was changed"
        return 503, "redis_unavailable", "registry unavailable (unreachable); nothing was changed"

    def other(self, method: str, path: str, exc: Exception) -> tuple[int, str, str]:
        if isinstance(exc, WriteRejected):
            return self.rejected(exc)
        if isinstance(exc, (*TRANSIENT, RedisError)):
            return self.unavailable(method, path, exc)
        if isinstance(exc, (RecursionError, msgspec.DecodeError)):
            # A JSON bomb (nesting deeper than the decoder's stack) or a body no
            # decoder could read: bad input, logged without a traceback.
            self.refusals.warning("unreadable body on %s %s: %s", method, path, type(exc).__name__)
            return self.bad_json("request body is not valid JSON (too deeply nested or malformed)")
        self.bugs.warning(
            "HTTP gateway bug on %s %s: %s: %s", method, path, type(exc).__name__, str(exc)[:300]
        )
        log.debug("HTTP gateway bug", exc_info=exc)
        return 500, "internal", "internal error"


def build_app(ctx: Context, *, max_body_bytes: int, extra_routes: Sequence[Any] = ()) -> Litestar:
    """The Litestar application serving ``ctx``'s routes (and ``extra_routes``: the
    watch stream, the dashboard, service discovery). Sets ``ctx.failures``."""
    stats = ctx.metrics.stats
    failures = ctx.failures = Failures(stats)

    def bad_json(detail: str) -> Response[ErrorBody]:
        return _error(*failures.bad_json(detail))

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
                    msg += f" ({NAME_RULE})"
                parts.append(f"{key}: {msg}" if key else msg)
                reason = reason or _reason_of_validation(key, msg)
        detail = "; ".join(parts) or str(exc.detail)
        reason = reason or _reason_of_validation(None, str(exc.detail))
        stats.rejected[reason] += 1
        return _error(400, reason, f"{exc.detail}: {detail}" if parts else detail)

    def on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
        status = exc.status_code
        if status == 413:  # the body limit: bad input like any other
            stats.rejected["oversized"] += 1
            return _error(400, "oversized", f"request body exceeds {max_body_bytes} bytes")
        if status == 401:
            stats.rejected["unauthorized"] += 1
            response = _error(401, "unauthorized", str(exc.detail))
            response.headers["WWW-Authenticate"] = 'Bearer realm="saga-events"'
            return response
        if status == 400:
            detail = str(exc.detail)
            if "json" not in detail.lower():
                detail = f"request body is not valid JSON: {detail}"
            return bad_json(detail)
        reason = {404: "not_found", 405: "method_not_allowed"}.get(
            status, "bad_request" if status < 500 else "internal"
        )
        detail = str(exc.detail) if status < 500 else "internal error"
        response = _error(status, reason, detail)
        for key, value in (exc.headers or {}).items():  # e.g. Allow on a 405
            response.headers[key] = value
        return response

    def on_rejected(request: Request[Any, Any, Any], exc: WriteRejected) -> Response[ErrorBody]:
        return _error(*failures.rejected(exc))

    def on_other(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
        return _error(*failures.other(request.method, request.url.path, exc))

    return Litestar(
        route_handlers=[*handlers(ctx), *extra_routes],
        exception_handlers={
            ValidationException: on_validation,
            HTTPException: on_http,
            WriteRejected: on_rejected,
            Exception: on_other,
        },
        request_max_body_size=max_body_bytes,
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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _error_bytes(status: int, reason: str, detail: str) -> bytes:
    return msgspec.json.encode(ErrorBody(status_code=status, error=reason, detail=detail))


async def _send_json(send: Send, status: int, body: bytes) -> None:
    """An answer with the headers Litestar sends for JSON: type and length."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [JSON_HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Front:
    """The ASGI entry point uvicorn serves: Host and Content-Type checks, counting and
    timing, then the app. ``allowed_hosts`` (lower-case ``host:port`` values) is None
    when any Host is accepted (a non-loopback bind)."""

    def __init__(
        self, app: ASGIApp, ctx: Context, *, max_body_bytes: int = model.MAX_EVENT_BYTES
    ) -> None:
        self.app = app
        self.ctx = ctx
        self.allowed_hosts: frozenset[str] | None = None
        self.fast = FastReads(ctx.writer, ctx.heartbeats, ctx.choose)
        self.fast_register = FastRegister(
            ctx.writer, ctx.heartbeats, ctx.authorized, max_body_bytes
        )
        self._timers: dict[tuple[str, str], Any] = {}  # the histogram's children, bound once

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        if self.allowed_hosts is not None:
            host = _header(scope, b"host")
            if host is not None and host.strip().lower() not in self.allowed_hosts:
                return 421, "bad_host", "this gateway answers only to localhost on its own port"
        method, path = scope["method"], str(scope["path"])
        if method in ("POST", "DELETE") and path.startswith("/api/v1/services"):
            ctype = _header(scope, b"content-type")
            media = ctype.split(";", 1)[0].strip().lower() if ctype is not None else None
            if path == "/api/v1/services/register":
                refused = media != "application/json"
            else:  # bodyless: only what a cross-site page can send without a preflight
                refused = media in _FORM_TYPES
            if refused:
                return (
                    415,
                    "unsupported_media_type",
                    "writes need 'Content-Type: application/json'",
                )
        return None

    async def _register(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """Answer a register without the app where :class:`FastRegister` can (None);
        else the ``receive`` to give the app (what was read of the body, replayed)."""
        read: list[Message] = []
        chunks: list[bytes] = []
        size, limit = 0, self.fast_register.max_body_bytes
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":
                break
            chunk = bytes(message.get("body", b""))
            chunks.append(chunk)
            size += len(chunk)
            if size > limit or not message.get("more_body", False):
                break
        data = None
        whole = read[-1]["type"] == "http.request" and not read[-1].get("more_body", False)
        auth = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
        if whole and len(auth) <= 1:
            header = bytes(auth[0]).decode("latin-1") if auth else None
            data = self.fast_register.request(b"".join(chunks), header)
        if data is None:

            async def replay() -> Message:
                return read.pop(0) if read else await receive()

            return replay
        try:
            status, body = 200, await self.fast_register.answer(data)
        except Exception as exc:  # answered as the app's handlers answer it
            failures = self.ctx.failures
            if failures is None:
                raise
            status, reason, detail = failures.other(str(scope["method"]), _REGISTER, exc)
            body = _error_bytes(status, reason, detail)
        await _send_json(send, status, body)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stats = self.ctx.metrics.stats
        scope[RAW_SEND] = send  # for the watch stream's chunks (see web.watch)
        method, path = str(scope["method"]), str(scope["path"])
        if method in ("POST", "DELETE") and path.startswith("/api/v1/services"):
            stats.received += 1  # every write request, accepted or not

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                stats.responses[(method, int(message["status"]))] += 1
            await send(message)

        started = time.perf_counter()
        try:
            refusal = self._refusal(scope)
            if refusal is None:
                if method == "POST" and path == _REGISTER and not scope.get("query_string"):
                    app_receive = await self._register(scope, receive, counting_send)
                    if app_receive is None:
                        return
                    receive = app_receive
                if method == "GET" and not scope.get("query_string"):
                    answer = self.fast.route(path)
                    body = await answer() if answer is not None else None
                    if body is not None:
                        await _send_json(counting_send, 200, body)
                        return
                await self.app(scope, receive, counting_send)
                return
            status, reason, detail = refusal
            stats.rejected[reason] += 1
            await _send_json(counting_send, status, _error_bytes(status, reason, detail))
        finally:
            label = method if method in _KNOWN_METHODS else "other"
            route = route_of(method, path)
            timer = self._timers.get((route, label))
            if timer is None:
                timer = self._timers[(route, label)] = self.ctx.metrics.latency.labels(route, label)
            timer.observe(time.perf_counter() - started)
