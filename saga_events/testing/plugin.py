"""Helpers for testing code that uses saga-events: a pytest plugin and fakes.

Installed as a pytest plugin (entry point ``saga_events``), so these fixtures
are available in any test of a project that installs saga-events:

* ``saga_fake`` -- a :class:`FakeRegistry`: in memory, no Redis, for unit tests.
* ``saga_redis`` -- a private, empty ``redis-server`` on a free port
  (:class:`~saga_events.embedded.RedisServer`), stopped after the test.
* ``saga_registry`` -- ``saga_redis`` plus a running registrar, as a
  :class:`SagaTestRegistry` (clients, peers, bounded waits, fault injection).
* ``saga_redis_url`` -- the URL of that registry's Redis.
* ``saga_http_url`` -- that registry's HTTP API (the seed's REST API), started
  on a free port for the test.
* ``saga_client`` -- a blocking :class:`SagaServiceDiscovery` on that registry.
* ``saga_mirror`` -- a started :class:`SyncMirror` on that registry.

All fixtures are synchronous, so they work in plain tests and under any
async test plugin. They are prefixed ``saga_`` to stay clear of a project's
own ``redis_url`` or ``mirror`` fixtures. The integration fixtures need a
``redis-server`` binary (the ``server`` extra ships one). See docs/TESTING.md.

Also here, for tests against a real Redis:

* :func:`registry_truth` reads what Redis holds for a namespace.
* :func:`wait_mirror_matches` waits until a mirror equals that truth.
* :func:`eventually` waits for a condition that has no event to await.
"""

from __future__ import annotations

import concurrent.futures
import functools
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import anyio
import anyio.from_thread
import msgspec
import pytest

from .. import model
from .._redis import RedisLike, connect
from .._wait import eventually
from ..agent import Agent
from ..client import AsyncSagaServiceDiscovery, SagaServiceDiscovery
from ..embedded import RedisServer
from ..keys import Keys
from ..mirror import Mirror, SyncMirror
from ..model import Instance
from ..registrar import Registrar
from .fake import FakeRegistry

__all__ = [
    "FakeRegistry",
    "SagaTestRegistry",
    "eventually",
    "registry_truth",
    "saga_client",
    "saga_fake",
    "saga_http_url",
    "saga_mirror",
    "saga_redis",
    "saga_redis_url",
    "saga_registry",
    "wait_mirror_matches",
]


async def registry_truth(redis: RedisLike, namespace: str = "default") -> dict[str, Instance]:
    """Every instance record in Redis for ``namespace``, keyed by Redis key.

    Found by SCAN (not by the index), so a record missing from the index still
    counts; records that do not decode are reported as errors.
    """
    client = connect(redis)
    keys = Keys(namespace)
    try:
        found: dict[str, Instance] = {}
        async for raw_key in client.scan_iter(match=f"{keys.inst_prefix}*", count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            raw = await client.get(key)
            if raw is None:
                continue
            try:
                found[key] = model.decode_instance(raw)
            except msgspec.DecodeError as exc:
                raise AssertionError(f"record {key} does not decode: {exc}") from None
        return found
    finally:
        if isinstance(redis, str):
            await client.aclose()


def _diff(view: dict[str, Instance], truth: dict[str, Instance]) -> str:
    lines = []
    for key in sorted(set(view) | set(truth)):
        a, b = view.get(key), truth.get(key)
        if a != b:
            lines.append(f"  {key}: mirror={a!r} redis={b!r}")
    return "\n".join(lines)


async def wait_mirror_matches(
    mirror: Mirror,
    redis: RedisLike,
    *,
    namespace: str = "default",
    timeout: float = 5.0,  # noqa: ASYNC109 - a plain bound, used by tests
    expected: set[str] | None = None,
) -> dict[str, Instance]:
    """Wait until ``mirror``'s view equals Redis's truth (and, if given, has
    exactly the ``expected`` keys); return the truth or raise AssertionError."""
    truth: dict[str, Instance] = {}
    with anyio.move_on_after(timeout):
        while True:
            truth = await registry_truth(redis, namespace)
            view = mirror.snapshot()
            if view == truth and (expected is None or set(truth) == expected):
                return truth
            await anyio.sleep(0.02)
    view = mirror.snapshot()
    msg = f"mirror differs from Redis after {timeout} s:\n{_diff(view, truth)}"
    if expected is not None and set(truth) != expected:
        msg += f"\nexpected keys {sorted(expected)}, Redis has {sorted(truth)}"
    raise AssertionError(msg)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class SagaTestRegistry:
    """A registrar on a private Redis, run in a background thread, for tests.

    ``client()``/``async_client()`` make clients on it; ``add()`` registers a
    peer service (a real Agent) the code under test can discover;
    ``wait_for()``/``wait_gone()`` wait, bounded, for what the registry's own
    mirror shows; ``restart_redis()`` and ``stop_registrar()`` inject faults.
    """

    def __init__(self, server: RedisServer, *, namespace: str = "default") -> None:
        self.server = server
        self.namespace = namespace
        self._portal_cm: AbstractContextManager[anyio.from_thread.BlockingPortal] | None = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._registrar_cm: AbstractContextManager[Registrar] | None = None
        self._mirror_cm: AbstractContextManager[Mirror] | None = None
        self._mirror: Mirror | None = None
        self._peers: dict[str, AbstractContextManager[Agent]] = {}
        self._registrar: Registrar | None = None
        self._http_task: concurrent.futures.Future[Any] | None = None
        self._http_url: str | None = None
        self._http_port = 0

    @property
    def redis_url(self) -> str:
        return self.server.url

    @property
    def portal(self) -> anyio.from_thread.BlockingPortal:
        if self._portal is None:
            raise RuntimeError("the test registry is not started")
        return self._portal

    def start(self) -> SagaTestRegistry:
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self._portal = self._portal_cm.__enter__()
        try:
            self.start_registrar()
            mirror = self.portal.call(self._make_mirror)
            self._mirror_cm = self.portal.wrap_async_context_manager(mirror)
            self._mirror = self._mirror_cm.__enter__()
        except BaseException:
            self.close()
            raise
        return self

    async def _make_registrar(self) -> Registrar:
        # The production rebuild_wait: agents answer a re-announce request after a
        # random delay of up to 2 s, and a shorter wait would end a rebuild early.
        # The registry's mirror is the registrar's last view (restored after an
        # empty Redis restart) and serves the HTTP API: one mirror, as in `up`.
        return Registrar(self.redis_url, namespace=self.namespace, view=self._view)

    def _view(self) -> Iterable[Instance]:
        return self._mirror.snapshot().values() if self._mirror is not None else ()

    async def _make_mirror(self) -> Mirror:
        return Mirror(self.redis_url, namespace=self.namespace, sync_timeout=10)

    def start_registrar(self) -> None:
        """Start the registrar (again, after :meth:`stop_registrar`)."""
        if self._registrar_cm is None:
            registrar = self.portal.call(self._make_registrar)
            cm = self.portal.wrap_async_context_manager(registrar)
            self._registrar = cm.__enter__()
            self._registrar_cm = cm

    def stop_registrar(self) -> None:
        """Stop the registrar: events go unheard, clients report not registered."""
        self.stop_http()
        self._registrar = None
        cm, self._registrar_cm = self._registrar_cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    def restart_redis(self) -> None:
        """Kill Redis and start an empty one on the same port (a crash and restart)."""
        self.server.restart()

    def start_http(self, token: str | None = None) -> str:
        """Serve the HTTP API (the seed's REST API); return its base URL.

        The first start picks a free port; a start after :meth:`stop_http`
        reuses it, so clients find the API again. Needs the ``server`` extra
        (Litestar, uvicorn). ``token`` makes writes require
        ``Authorization: Bearer <token>``.
        """
        if self._http_url is None:
            if self._registrar is None:
                raise RuntimeError("the registrar is stopped: start_registrar() first")
            from ..web import run_gateway

            future, (host, port) = self.portal.start_task(
                functools.partial(
                    run_gateway,
                    self._registrar,
                    self.redis_url,
                    "127.0.0.1",
                    self._http_port,
                    token,
                    mirror=self._mirror,
                )
            )
            self._http_task, self._http_port = future, port
            self._http_url = f"http://{host}:{port}"
        return self._http_url

    def stop_http(self) -> None:
        """Stop serving the HTTP API (clients in REST mode then see an outage)."""
        task, self._http_task, self._http_url = self._http_task, None, None
        if task is not None:
            task.cancel()  # marks the future at once; the server stops a moment later
            deadline = time.monotonic() + 10
            while _accepts("127.0.0.1", self._http_port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the HTTP API still answers on port {self._http_port}")
                time.sleep(0.01)

    @property
    def http_url(self) -> str | None:
        """The base URL of the HTTP API while :meth:`start_http` serves it."""
        return self._http_url

    def close(self) -> None:
        self.stop_http()
        for name in list(self._peers):
            self.remove(name)
        for attr in ("_mirror_cm", "_registrar_cm"):
            cm = getattr(self, attr)
            setattr(self, attr, None)
            if cm is not None:
                cm.__exit__(None, None, None)
        self._mirror = None
        if self._portal_cm is not None:
            cm, self._portal_cm, self._portal = self._portal_cm, None, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> SagaTestRegistry:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- clients and peers ----------------------------------------------------------------

    def client(self, **kwargs: Any) -> SagaServiceDiscovery:
        """A blocking client in Redis mode on this registry (close it, or use ``with``)."""
        kwargs.setdefault("namespace", self.namespace)
        return SagaServiceDiscovery(redis_url=self.redis_url, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncSagaServiceDiscovery:
        """An async client in Redis mode on this registry (use it with ``async with``)."""
        kwargs.setdefault("namespace", self.namespace)
        return AsyncSagaServiceDiscovery(redis_url=self.redis_url, **kwargs)

    def add(
        self,
        name: str,
        url: str,
        capabilities: Iterable[str] = (),
        *,
        metadata: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Instance:
        """Register a peer instance of ``name`` (a real Agent) and wait until it is live."""
        if name in self._peers:
            self.remove(name)

        async def make() -> Agent:
            return Agent(
                self.redis_url,
                name,
                url,
                capabilities=capabilities,
                metadata=metadata,
                namespace=self.namespace,
            )

        cm = self.portal.wrap_async_context_manager(self.portal.call(make))
        cm.__enter__()
        self._peers[name] = cm
        return self.wait_for(name, timeout)

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Stop a peer added with :meth:`add` (it says leave) and wait until it is gone."""
        cm = self._peers.pop(name, None)
        if cm is not None:
            cm.__exit__(None, None, None)
            self.wait_gone(name, timeout)

    # -- what the registry shows ----------------------------------------------------------

    @property
    def mirror(self) -> Mirror:
        if self._mirror is None:
            raise RuntimeError("the test registry is not started")
        return self._mirror

    def services(self) -> dict[str, list[Instance]]:
        """Every service with live instances, as the registry's own mirror shows it."""
        # Read on the mirror's own thread: it changes the view there at any moment.
        return self.portal.call(self.mirror.services)

    def instances(self, name: str) -> list[Instance]:
        return self.portal.call(self.mirror.instances, name)

    def wait_for(self, name: str, timeout: float = 5.0) -> Instance:
        """Wait until ``name`` has a live instance; raise ServiceNotFound after ``timeout``."""
        return self.portal.call(self.mirror.wait_for, name, timeout)

    def wait_gone(self, name: str, timeout: float = 5.0) -> None:
        """Wait until ``name`` has no instance; raise AssertionError after ``timeout``."""
        # Polled, not awaited: an awaited return comes the instant this mirror
        # applies the change, often before a test's own mirrors (told at the same
        # moment) have, and tests that look at theirs next lost that race.
        deadline = time.monotonic() + timeout
        while self.instances(name):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name!r} still has instances after {timeout} s")
            time.sleep(0.01)


# -- the pytest plugin ------------------------------------------------------------------


@pytest.fixture
def saga_fake() -> FakeRegistry:
    """An in-memory registry with ``client()``/``sync_client()``: no Redis, no network."""
    return FakeRegistry()


@pytest.fixture
def saga_redis() -> Iterator[RedisServer]:
    """A private, empty redis-server on a free port (temp dir, no persistence)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def saga_registry(saga_redis: RedisServer) -> Iterator[SagaTestRegistry]:
    """A registrar on ``saga_redis``, running in a background thread."""
    with SagaTestRegistry(saga_redis) as registry:
        yield registry


@pytest.fixture
def saga_redis_url(saga_registry: SagaTestRegistry) -> str:
    """The Redis URL of ``saga_registry`` (pass it as ``redis_url=`` or ``SAGA_REDIS_URL``)."""
    return saga_registry.redis_url


@pytest.fixture
def saga_http_url(saga_registry: SagaTestRegistry) -> str:
    """The HTTP API (the seed's REST API) of ``saga_registry``, on a free port."""
    return saga_registry.start_http()


@pytest.fixture
def saga_client(saga_registry: SagaTestRegistry) -> Iterator[SagaServiceDiscovery]:
    """A blocking client in Redis mode on ``saga_registry``, closed after the test."""
    with saga_registry.client() as client:
        yield client


@pytest.fixture
def saga_mirror(saga_registry: SagaTestRegistry) -> Iterator[SyncMirror]:
    """A started :class:`SyncMirror` on ``saga_registry``."""
    with SyncMirror(saga_registry.redis_url, namespace=saga_registry.namespace) as mirror:
        yield mirror
