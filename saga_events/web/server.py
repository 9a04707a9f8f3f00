"""Serving the gateway: the :class:`Gateway` object, its socket and its uvicorn server.

One job: bind the address, run uvicorn on it with limits that keep the
registrar's process alive whatever HTTP clients do, and stop gracefully on
cancellation. Contract of the limits (:class:`Limits`):

* a request's headers must arrive within ``header_timeout`` seconds of the
  connection (or of its first byte after the previous answer), else the
  connection is closed: silent and half-sent connections do not stay;
* an idle keep-alive connection is closed after ``keep_alive_timeout``;
* at most ``max_connections`` connections are held: one beyond is answered
  ``503`` and closed at once, and requests beyond it (uvicorn's
  ``limit_concurrency``) get ``503``. The default leaves half the process's
  file descriptors (``RLIMIT_NOFILE``) to the registrar and its Redis
  clients, capped at 1,000; the gateway's Redis pool is sized to match, so
  concurrent writes never wait on or fail for a pool slot.

A loopback bind checks the Host header (see :mod:`saga_events.web.app`); a
non-loopback bind without a token logs a loud warning at start: anyone who
can reach it can register and remove instances.

uvicorn never touches the process's signal handlers (the host owns them).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

import anyio
import uvicorn
from anyio.abc import TaskStatus
from litestar import Litestar
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import model
from .._redis import RedisLike, connect
from ..errors import SagaError
from ..identity import parse_epoch
from ..mirror import Mirror
from ..registrar import Registrar
from ..writer import Writer
from .app import LOOPBACK_NAMES, Front, build_app
from .metrics import GatewayMetrics, GatewayStats
from .routes import TOKEN_ENV, Context
from .schema import ServiceInfo
from .surface import web_routes
from .watch import WatchHub

log = logging.getLogger("saga_events.gateway")

DEFAULT_HTTP_PORT: Final = 8030
DEFAULT_HTTP_HOST: Final = "127.0.0.1"
_FD_RESERVE: Final = 128


class GatewayError(SagaError):
    """Raised when the gateway cannot start (e.g. its address is in use)."""


def _default_max_connections() -> int:
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no rlimit on this platform
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(16, min(1000, (soft - _FD_RESERVE) // 2))


@dataclass(frozen=True)
class Limits:
    """What one HTTP client may hold of the gateway (see the module docstring)."""

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = field(default_factory=_default_max_connections)
    max_header_bytes: int = 16 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values a loopback bind on ``host:port`` answers to."""
    bound = f"[{host}]" if ":" in host else host
    return frozenset(f"{h}:{port}".lower() for h in (*LOOPBACK_NAMES, bound))


try:  # C parser; the pure-Python h11 where the platform has no wheel
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _FastProtocol
except ImportError:  # pragma: no cover - platforms without httptools
    _FastProtocol = None  # type: ignore[assignment,misc]

_PARSER_ENV: Final = "SAGA_HTTP_PARSER"  # "h11" forces the pure-Python parser


class _Corked:
    """A connection's transport whose writes within one turn of the loop go out as one.

    uvicorn writes a response's head and body separately: two ``send`` calls,
    two packets (TCP_NODELAY) where one does. A head and what follows it are
    gathered and flushed by a callback at the loop's next turn, or at once by
    ``close``; any other write (a stream's next chunk) goes at once.
    """

    __slots__ = ("_loop", "_parts", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._parts: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._parts:
            if bytes(data[:7]) != b"HTTP/1.":
                # Not a response's head (e.g. the next chunk of a stream): nothing to
                # gather it with, so it goes at once.
                self._transport.write(data)
                return
            self._loop.call_soon(self._flush)
        self._parts.append(bytes(data))

    def _flush(self) -> None:
        parts = self._parts
        if parts:
            self._parts = []
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._parts = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._parts)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


def _base_protocol() -> type[H11Protocol]:
    if _FastProtocol is not None and os.environ.get(_PARSER_ENV, "").lower() != "h11":
        return _FastProtocol  # type: ignore[return-value]  # same interface for what we use
    return H11Protocol


def _guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a header
    timeout, a header size limit and a hard connection cap."""
    base = _base_protocol()
    check_size = base is not H11Protocol  # h11 enforces h11_max_incomplete_event_size

    class Guarded(base):  # type: ignore[valid-type,misc]
        _header_timer: asyncio.TimerHandle | None = None
        _pending = 0  # bytes received while waiting for a request's headers

        def connection_made(self, transport: asyncio.Transport) -> None:
            corked = _Corked(transport, asyncio.get_running_loop())
            super().connection_made(corked)
            if len(self.connections) > limits.max_connections:
                transport.write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                    b"connection: close\r\n\r\n"
                )
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _waiting(self) -> bool:
            return self.cycle is None or bool(self.cycle.response_complete)

        def _expired(self) -> None:
            self._header_timer = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._waiting():
                self._arm()  # the next request's headers start arriving
                self._pending += len(data)
            super().data_received(data)
            if not self._waiting():
                self._disarm()  # its headers are in: the request runs
                self._pending = 0
            elif (
                check_size
                and self._pending > limits.max_header_bytes
                and not self.transport.is_closing()
            ):
                # What h11 answers for headers over its limit.
                self.send_400_response("Invalid HTTP request received.")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner (the CLI cancels the task group)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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


class Gateway:
    """The REST API of a registrar.

    ``await tg.start(gateway.run, host, port)`` binds the address, starts
    uvicorn and returns ``(host, port)`` once the server accepts connections
    (port 0 picks a free one). Cancelling the task stops the server
    gracefully. ``mirror`` must be running (``has_synced``) in the same event
    loop; ``redis`` is used for ``/health`` and the writer's reads.
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
        limits: Limits | None = None,
    ) -> None:
        self.registrar = registrar
        self.mirror = mirror
        self.limits = limits or Limits()
        # Pool sized to the connection cap: redis-py's default of 100 would fail
        # the 101st concurrent write with a false 503.
        self._redis = connect(redis, max_connections=self.limits.max_connections + 32)
        self._owns_client = isinstance(redis, str)
        # An empty token (e.g. SAGA_API_TOKEN="") means no token, not "match the empty string".
        self.token = (token if token is not None else os.environ.get(TOKEN_ENV)) or None
        self.max_body_bytes = max_body_bytes
        self.writer = Writer(registrar, mirror, self._redis, write_timeout=write_timeout)
        # Push over HTTP, the dashboard and Prometheus SD read the same view.
        self.watch_hub = WatchHub(mirror, ServiceInfo.of)
        self.metrics = GatewayMetrics(
            registrar,
            mirror,
            view_timeouts=lambda: self.writer.view_timeouts,
            watchers=lambda: self.watch_hub.watchers,
        )
        self.context = Context(self.writer, self.metrics, self._redis, self.token)
        self._app: Litestar | None = None
        self._front: Front | None = None
        self.address: tuple[str, int] | None = None

    @property
    def stats(self) -> GatewayStats:
        return self.metrics.stats

    @property
    def app(self) -> Litestar:
        """The Litestar application (built once)."""
        if self._app is None:
            self._app = build_app(
                self.context,
                max_body_bytes=self.max_body_bytes,
                extra_routes=web_routes(self.watch_hub, self.mirror),
            )
        return self._app

    @property
    def asgi(self) -> Front:
        """The ASGI entry point that uvicorn serves (the app behind its checks)."""
        if self._front is None:
            self._front = Front(self.app, self.context, max_body_bytes=self.max_body_bytes)
        return self._front

    def authorized(self, header: str | None) -> bool:
        return self.context.authorized(header)

    def metrics_text(self) -> str:
        return self.metrics.render()

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
        front = self.asgi
        if is_loopback(host):
            front.allowed_hosts = allowed_hosts(self.address[0], self.address[1])
        elif self.token is None:
            log.warning(
                "HTTP gateway on %s:%d has NO TOKEN: anyone who can reach it can register "
                "and remove instances. Set %s, or bind to 127.0.0.1.",
                host,
                self.address[1],
                TOKEN_ENV,
            )
        limits = self.limits
        config = uvicorn.Config(
            front,
            interface="asgi3",
            http=_guarded_protocol(limits),
            lifespan="off",
            log_config=None,  # the host process owns logging
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=max(1, round(limits.keep_alive_timeout)),
            # uvicorn 503s a request once connections >= the limit: +1 lets the
            # last connection under the cap be served.
            limit_concurrency=limits.max_connections + 1,
            h11_max_incomplete_event_size=limits.max_header_bytes,
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

    async def _watch_staleness(self) -> None:
        while True:
            self.metrics.note_staleness()
            await anyio.sleep(0.25)


async def run_gateway(
    registrar: Registrar,
    redis: str,
    host: str = DEFAULT_HTTP_HOST,
    port: int = DEFAULT_HTTP_PORT,
    token: str | None = None,
    *,
    mirror: Mirror | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP API of ``registrar`` until cancelled.

    ``await tg.start(run_gateway, registrar, url, host, port)`` returns the
    bound ``(host, port)`` once the mirror has synced and the server accepts
    connections. ``mirror`` is a running mirror of the registrar's namespace
    to serve from (the caller runs it and may give it to the registrar as its
    ``view``: one mirror per process); by default the gateway runs its own.
    """
    if mirror is not None:
        await _settled(mirror, registrar.rebuild_wait + SETTLE_MARGIN)
        gateway = Gateway(registrar, mirror, redis, token=token)
        await gateway.run(host, port, task_status=task_status)
        return
    async with Mirror(redis, namespace=registrar.keys.ns) as mirror:
        await _settled(mirror, registrar.rebuild_wait + SETTLE_MARGIN)
        gateway = Gateway(registrar, mirror, redis, token=token)
        await gateway.run(host, port, task_status=task_status)


#: how much longer than the registrar's rebuild wait the gateway waits to serve
SETTLE_MARGIN: Final = 5.0


async def _settled(mirror: Mirror, bound: float) -> None:
    """Wait, at most ``bound`` s, until the registry's epoch is ready (no rebuild
    running: a registrar's first start on an empty Redis rebuilds) and the mirror is
    current, so the first answers don't come from a view about to go stale for the
    rebuild's resync. Past the bound (Redis unreachable, no registrar), serve anyway:
    answers then say ``stale``."""

    def ready(m: Mirror) -> bool:
        epoch = parse_epoch(m.epoch)
        return epoch is not None and not epoch.rebuilding and not m.stale

    try:
        await mirror.wait_until(ready, bound)
    except TimeoutError:
        log.warning(
            "serving before the registry settled (epoch %r, stale %s after %.1f s)",
            mirror.epoch,
            mirror.stale,
            bound,
        )


__all__ = [
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "Gateway",
    "GatewayError",
    "Limits",
    "run_gateway",
]
