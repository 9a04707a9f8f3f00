"""AsyncSagaServiceDiscovery and SagaServiceDiscovery are twins: one scenario passes on both.

register, register again (update in place), refresh, discover, unregister,
close; the blocking twin's calls run in a worker thread, as Flask's would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio.to_thread
import pytest

from saga_events import (
    AsyncSagaServiceDiscovery,
    Mirror,
    Registrar,
    SagaServiceDiscovery,
    ServiceInfo,
    ServiceNotFound,
)
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio
T = TypeVar("T")


class SyncAsAsync:
    """The blocking client, each call made from a worker thread."""

    def __init__(self, client: SagaServiceDiscovery) -> None:
        self.client = client

    async def _run(self, func: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(func)

    async def register_service(self, *args: Any, **kwargs: Any) -> ServiceInfo:
        return await self._run(lambda: self.client.register_service(*args, **kwargs))

    async def refresh_registration(self, name: str) -> bool:
        return await self._run(lambda: self.client.refresh_registration(name))

    async def unregister_service(self, name: str) -> bool:
        return await self._run(lambda: self.client.unregister_service(name))

    async def discover_service(self, name: str) -> ServiceInfo:
        return await self._run(lambda: self.client.discover_service(name))

    def is_registered(self, name: str) -> bool:
        return self.client.is_registered(name)


@asynccontextmanager
async def client(kind: str, redis_url: str) -> AsyncIterator[Any]:
    if kind == "async":
        async with AsyncSagaServiceDiscovery(redis_url=redis_url, ttl=3.0) as saga:
            yield saga
    else:
        sync = SagaServiceDiscovery(redis_url=redis_url, ttl=3.0)
        try:
            yield SyncAsAsync(sync)
        finally:
            await anyio.to_thread.run_sync(sync.close)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_client_twins_register_update_refresh_unregister(
    kind: str, redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    async with client(kind, redis_url) as saga:
        first = await saga.register_service("twin-svc", "http://10.0.0.80:80", ["rest"])
        assert first.source == "registry" and saga.is_registered("twin-svc")
        second = await saga.register_service("twin-svc", "http://10.0.0.81:80", ["rest"])
        assert second.service_id == first.service_id
        await mirror.wait_until(
            lambda m: [i.service_url for i in m.instances("twin-svc")] == ["http://10.0.0.81:80"],
            timeout=10,
        )
        assert await saga.refresh_registration("twin-svc")
        found = await saga.discover_service("twin-svc")
        assert (found.service_id, found.ttl_seconds) == (first.service_id, 3.0)
        assert await saga.unregister_service("twin-svc")
        assert not saga.is_registered("twin-svc")
        await mirror.wait_until(lambda m: not m.instances("twin-svc"), timeout=10)
        assert not await saga.refresh_registration("twin-svc")

        async def gone_from_the_clients_own_mirror() -> bool:
            try:
                await saga.discover_service("twin-svc")
            except ServiceNotFound:
                return True
            return False

        await eventually(gone_from_the_clients_own_mirror, 10)
