"""The client in REST mode against the real HTTP gateway (in this event loop) and registrar."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from saga_events import (
    Agent,
    AsyncSagaServiceDiscovery,
    Mirror,
    Registrar,
    RegistryUnavailable,
    SagaServiceDiscovery,
    ServiceNotFound,
)
from saga_events.testing import SagaTestRegistry, eventually
from saga_events.web import run_gateway

pytestmark = pytest.mark.anyio


async def _serve(
    registrar: Registrar, redis_url: str, token: str | None = None
) -> AsyncIterator[str]:
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(run_gateway, registrar, redis_url, "127.0.0.1", 0, token)
        yield f"http://{host}:{port}"
        tg.cancel_scope.cancel()


@pytest.fixture
async def saga_url(
    registrar: Registrar, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.delenv("SAGA_API_TOKEN", raising=False)
    async for url in _serve(registrar, redis_url):
        yield url


async def test_rest_client_registers_discovers_and_unregisters_only_its_own(
    saga_url: str, redis_url: str, mirror: Mirror
) -> None:
    """Register through the gateway, discover it, and DELETE only this client's instance."""
    async with Agent(redis_url, "search", "http://10.0.0.1:9200", service_id="peer-1"):
        await mirror.wait_for("search", 2)
        async with AsyncSagaServiceDiscovery(saga_url) as saga:
            assert saga.mode == "rest"
            info = await saga.register_service("search", "http://10.0.0.2:9200", ["rest"])
            assert info.source == "registry"
            assert info.registered_at is not None and info.last_heartbeat is not None
            assert saga.is_registered("search")
            await mirror.wait_until(lambda m: len(m.instances("search")) == 2, 2)
            found = await saga.discover_service("search")
            assert found.service_id in {"peer-1", info.service_id}
            assert await saga.unregister_service("search")
            assert [i.service_id for i in mirror.instances("search")] == ["peer-1"]


async def test_rest_client_registers_again_when_the_registry_forgot_it(
    saga_url: str, mirror: Mirror
) -> None:
    """A heartbeat answered 404 (instance deleted behind its back) leads to a new registration."""
    async with AsyncSagaServiceDiscovery(saga_url, heartbeat_interval=0.2) as saga:
        info = await saga.register_service("billing", "http://10.0.0.3:80")
        first = (await mirror.wait_for("billing", 2)).registered_at_ms
        async with httpx.AsyncClient(base_url=saga_url) as http:
            resp = await http.delete("/api/v1/services/billing")
            assert resp.status_code == 200
        # The gateway removed it (its answer says so). This test's own mirror is not
        # the gateway's: under load it may see the removal after the client's next
        # heartbeat (every 0.2 s) already put it back, so it is not asked here.
        assert resp.json()["removed"] == [info.service_id]
        # The background keep-alive notices on its next heartbeat and registers again.
        await mirror.wait_until(
            lambda m: any(i.registered_at_ms > first for i in m.instances("billing")), 5
        )
        (back,) = mirror.instances("billing")
        assert back.service_id == info.service_id
        assert await saga.refresh_registration("billing")


async def test_rest_discovery_answers_from_cache_within_cache_ttl(
    saga_url: str, mirror: Mirror
) -> None:
    """Following the stream, a removal is seen at once even with a long cache_ttl."""
    async with (
        AsyncSagaServiceDiscovery(saga_url, cache_ttl=300) as cached,
        AsyncSagaServiceDiscovery(saga_url, cache_ttl=0) as uncached,
        AsyncSagaServiceDiscovery(saga_url) as owner,
    ):
        await owner.register_service("quotes", "http://10.0.0.4:80")
        assert (await cached.discover_service("quotes")).source == "registry"
        assert (await uncached.discover_service("quotes")).source == "registry"
        assert await owner.unregister_service("quotes")
        # Both follow the gateway's watch stream: the removal reaches them, whatever
        # their cache_ttl (polling with a cache is tested against a gateway without
        # the stream in test_client_rest_watch.py).
        for client in (cached, uncached):
            follower = client._backend._follower  # type: ignore[attr-defined]
            await follower.wait_until(lambda f: not f.instances("quotes"), 10)
            with pytest.raises(ServiceNotFound):
                await client.discover_service("quotes")


async def test_rest_client_with_wrong_token_keeps_the_host_running(
    registrar: Registrar, redis_url: str, mirror: Mirror
) -> None:
    """A gateway that requires a token: the right one registers, a wrong one only logs."""
    async for url in _serve(registrar, redis_url, token="s3cret"):
        async with (
            AsyncSagaServiceDiscovery(url, api_token="s3cret") as good,
            AsyncSagaServiceDiscovery(url, api_token="wrong") as bad,
        ):
            assert (await good.register_service("ok", "http://10.0.0.5:80")).source == "registry"
            info = await bad.register_service("nope", "http://10.0.0.6:80")
            assert info.source == "local"
            assert not bad.is_registered("nope")
            assert mirror.instances("nope") == []
            assert (await bad.discover_service("ok")).service_url == "http://10.0.0.5:80"


async def test_sync_rest_client_from_a_worker_thread(saga_url: str, mirror: Mirror) -> None:
    """The blocking twin in REST mode, called from a thread as a Flask handler would."""

    def work() -> str:
        with SagaServiceDiscovery(saga_url) as saga:
            info = saga.register_service("flask-rest", "http://10.0.0.7:80", ["rest"])
            assert saga.discover_service("flask-rest").service_id == info.service_id
            return info.service_id

    sid = await anyio.to_thread.run_sync(work)
    assert sid
    await eventually(lambda: not mirror.instances("flask-rest"), 2)


def test_rest_client_rides_out_a_gateway_outage(saga_registry: SagaTestRegistry) -> None:
    """Gateway down: the last answer is served as stale, a fallback answers, nothing raises
    into the host; gateway back on the same port: discovery is live again."""
    url = saga_registry.start_http()
    saga_registry.add("ledger", "http://10.0.0.20:80")
    with SagaServiceDiscovery(
        url, cache_ttl=0, fallbacks={"audit": "http://localhost:8009"}, timeout=1
    ) as saga:
        assert saga.discover_service("ledger").source == "registry"
        saga_registry.stop_http()
        # The client follows the gateway's watch stream: it answers "stale" once its
        # follower has seen the stream drop, which a loaded machine may delay a little.
        deadline = time.monotonic() + 10
        stale = saga.discover_service("ledger")
        while stale.source != "stale" and time.monotonic() < deadline:
            time.sleep(0.05)
            stale = saga.discover_service("ledger")
        assert (stale.service_url, stale.source) == ("http://10.0.0.20:80", "stale")
        assert saga.discover_service("audit").source == "fallback"
        with pytest.raises(RegistryUnavailable):
            saga.discover_service("nothing")
        assert saga.register_service("late", "http://10.0.0.21:80").source == "local"
        assert saga_registry.start_http() == url
        assert saga.discover_service("ledger").source == "registry"
        assert saga.refresh_registration("late")
        assert saga_registry.wait_for("late").service_url == "http://10.0.0.21:80"
