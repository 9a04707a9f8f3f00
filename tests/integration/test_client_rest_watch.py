"""The REST client follows the gateway's watch stream: discoveries come from its view.

Against the real gateway and registrar. The gateway's GET requests are counted
from its own ``/metrics`` (the request latency histogram's count for the
route ``/api/v1/services/{name}``), so "answered from the stream" means the
gateway saw no GET.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from saga_events import AsyncSagaServiceDiscovery, Mirror, Registrar, ServiceNotFound
from saga_events._client_rest import _RestBackend
from saga_events._wait import eventually
from saga_events.identity import parse_epoch
from saga_events.web import run_gateway, server, surface

pytestmark = pytest.mark.anyio


async def discover_gets(url: str) -> int:
    """How many GET /api/v1/services/{name} the gateway has answered."""
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("saga_http_request_duration_seconds_count{")
        and 'method="GET"' in line
        and 'route="/api/v1/services/{name}"' in line
    )


async def _serve(registrar: Registrar, redis_url: str) -> AsyncIterator[str]:
    # The registrar's first rebuild (an empty Redis) over first: its epoch change makes
    # the gateway's mirror resync once (stale for a moment), which a test's register
    # answered before it would meet as a watch stream gone stale.
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def epoch_ready() -> bool:
            epoch = parse_epoch(await client.get(registrar.keys.epoch))
            return epoch is not None and not epoch.rebuilding

        await eventually(epoch_ready, 10, what="the registrar's first rebuild")
    finally:
        await client.aclose()
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(run_gateway, registrar, redis_url, "127.0.0.1", 0, None)
        yield f"http://{host}:{port}"
        tg.cancel_scope.cancel()


@pytest.fixture
async def saga_url(
    registrar: Registrar, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.delenv("SAGA_API_TOKEN", raising=False)
    async for url in _serve(registrar, redis_url):
        yield url


@pytest.fixture
async def watchless_url(
    registrar: Registrar, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """A gateway built without the watch route (an older server): /api/v1/watch is 404."""
    monkeypatch.delenv("SAGA_API_TOKEN", raising=False)

    def without_watch(hub: Any, mirror: Mirror) -> list[Any]:
        return [r for r in surface.web_routes(hub, mirror) if "/api/v1/watch" not in r.paths]

    monkeypatch.setattr(server, "web_routes", without_watch)
    async for url in _serve(registrar, redis_url):
        yield url


async def test_discover_after_another_clients_register_comes_from_the_stream(
    saga_url: str,
) -> None:
    """A registration by another client reaches this one's view; discover sends no GET."""
    async with (
        AsyncSagaServiceDiscovery(saga_url) as reader,
        AsyncSagaServiceDiscovery(saga_url) as writer,
    ):
        backend: Any = reader._backend
        # The first discovery starts the follower (the name is absent: asked by GET).
        with pytest.raises(ServiceNotFound, match="no-such"):
            await reader.discover_service("no-such")
        follower = backend._follower
        assert follower is not None
        await follower.wait_until(lambda f: f.current, 10)
        info = await writer.register_service("orders", "http://10.1.0.1:80", ["rest"])
        await follower.wait_until(lambda f: bool(f.instances("orders")), 10)
        before = await discover_gets(saga_url)
        found = await reader.discover_service("orders")
        assert found.service_id == info.service_id
        assert found.service_url == "http://10.1.0.1:80"
        assert found.capabilities == ("rest",)
        assert found.source == "registry"
        assert await discover_gets(saga_url) == before
        assert backend.watch_answers == 1
        # A removal by the other client reaches the view too: then the name is asked by GET.
        assert await writer.unregister_service("orders")
        await follower.wait_until(lambda f: not f.instances("orders"), 10)
        with pytest.raises(ServiceNotFound, match="orders"):
            await reader.discover_service("orders")
        assert await discover_gets(saga_url) == before + 1


async def test_own_register_and_unregister_are_read_back_at_once(saga_url: str) -> None:
    """Read-your-writes: this client's own change is answered even before the stream shows it."""
    async with AsyncSagaServiceDiscovery(saga_url) as saga:
        with pytest.raises(ServiceNotFound, match="mine"):
            await saga.discover_service("mine")
        info = await saga.register_service("mine", "http://10.1.0.2:80")
        assert (await saga.discover_service("mine")).service_id == info.service_id
        moved = await saga.register_service("mine", "http://10.1.0.3:80")
        assert (await saga.discover_service("mine")).service_url == moved.service_url
        assert await saga.unregister_service("mine")
        with pytest.raises(ServiceNotFound, match="mine"):
            await saga.discover_service("mine")


async def test_falls_back_to_polling_against_a_gateway_without_the_stream(
    watchless_url: str, mirror: Mirror
) -> None:
    """404 on /api/v1/watch: the client polls, caching answers cache_ttl seconds."""
    async with httpx.AsyncClient(base_url=watchless_url) as http:
        assert (await http.get("/api/v1/watch")).status_code == 404
    async with (
        AsyncSagaServiceDiscovery(watchless_url, cache_ttl=30) as reader,
        AsyncSagaServiceDiscovery(watchless_url) as writer,
    ):
        backend: Any = reader._backend
        await writer.register_service("legacy", "http://10.1.0.4:80")
        await mirror.wait_for("legacy", 5)
        before = await discover_gets(watchless_url)
        first = await reader.discover_service("legacy")
        assert first.source == "registry"
        assert not backend._watch
        assert backend._follower.supported is False
        second = await reader.discover_service("legacy")
        assert second.source == "cache"
        assert await discover_gets(watchless_url) == before + 1
        assert backend.watch_answers == 0


async def test_stream_down_serves_the_last_view_then_polls(saga_url: str, mirror: Mirror) -> None:
    """With the stream lost, the last view serves within cache_ttl, then discovery polls."""
    now = [0.0]
    backend = _RestBackend(
        saga_url,
        cache_ttl=30,
        timeout=5,
        api_token=None,
        heartbeat_interval=None,
        clock=lambda: now[0],
    )
    async with (
        AsyncSagaServiceDiscovery(backend=backend) as reader,
        AsyncSagaServiceDiscovery(saga_url) as writer,
    ):
        await writer.register_service("flaky", "http://10.1.0.5:80")
        await mirror.wait_for("flaky", 5)
        await reader.discover_service("flaky")  # starts the follower
        follower = backend._follower
        assert follower is not None
        await follower.wait_until(lambda f: f.current and bool(f.instances("flaky")), 10)
        assert (await reader.discover_service("flaky")).source == "registry"
        # The follower marks the view down when its connection ends; the view stays.
        follower.connected = False
        follower._wake()
        before = await discover_gets(saga_url)
        now[0] += 29
        assert (await reader.discover_service("flaky")).source == "cache"
        assert await discover_gets(saga_url) == before
        now[0] += 2  # down for longer than cache_ttl: ask the gateway
        assert (await reader.discover_service("flaky")).source == "registry"
        assert await discover_gets(saga_url) == before + 1


async def test_discover_from_the_stream_honours_weights_and_drains(saga_url: str) -> None:
    """Plain discoveries answered from the stream pick as Mirror.pick does: smooth
    weighted round-robin over metadata ``weight``, draining instances never."""
    async with (
        AsyncSagaServiceDiscovery(saga_url) as reader,
        httpx.AsyncClient(base_url=saga_url) as http,
    ):
        for sid, meta in (("w3", {"weight": "3"}), ("w1", {}), ("w0", {"weight": "0"})):
            r = await http.post(
                "/api/v1/services/register",
                json={"service_name": "api", "service_url": f"http://{sid}:80",
                      "service_id": sid, "metadata": meta},
            )  # fmt: skip
            assert r.status_code == 200, r.text
        with pytest.raises(ServiceNotFound):
            await reader.discover_service("none")  # starts the follower
        backend: Any = reader._backend
        follower = backend._follower
        await follower.wait_until(lambda f: len(f.instances("api")) == 3, 10)
        before = await discover_gets(saga_url)
        got = [(await reader.discover_service("api")).service_id for _ in range(8)]
        assert sorted(got) == ["w1", "w1"] + ["w3"] * 6  # exact shares per period; w0 never
        assert got[:4] == ["w3", "w1", "w3", "w3"]  # smooth, as nginx (and Mirror.pick)
        r = await http.post("/api/v1/services/api/drain?service_id=w3", json={"by": "t"})
        assert r.status_code == 200, r.text
        await follower.wait_until(
            lambda f: any(i["service_id"] == "w3" and i["draining"] for i in f.instances("api")),
            10,
        )
        assert {(await reader.discover_service("api")).service_id for _ in range(6)} == {"w1"}
        assert await discover_gets(saga_url) == before  # all from the stream's view
