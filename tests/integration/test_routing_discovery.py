"""Filters in discovery: the HTTP API's query syntax and the seed client's arguments
(Redis, REST and the fake), against a real registrar and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import anyio
import httpx
import pytest

from saga_events import (
    Agent,
    AsyncSagaServiceDiscovery,
    InvalidEvent,
    Mirror,
    Registrar,
    ServiceNotFound,
)
from saga_events.testing import FakeRegistry, eventually
from saga_events.web import run_gateway

pytestmark = pytest.mark.anyio

ZONED = {
    "eu-a": ({"zone": "eu-1", "tier": "gold"}, ("gpu",)),
    "eu-b": ({"zone": "eu-1"}, ()),
    "us-a": ({"zone": "us-1"}, ("gpu",)),
}


@pytest.fixture
async def zoned(redis_url: str, mirror: Mirror) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for sid, (meta, caps) in ZONED.items():
            await stack.enter_async_context(
                Agent(
                    redis_url,
                    "api",
                    f"http://{sid}:80",
                    service_id=sid,
                    metadata=meta,
                    capabilities=caps,
                )
            )
        await mirror.wait_until(lambda m: len(m.instances("api")) == len(ZONED), 10)
        yield


@pytest.fixture
async def saga_url(
    registrar: Registrar, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    monkeypatch.delenv("SAGA_API_TOKEN", raising=False)
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(run_gateway, registrar, redis_url, "127.0.0.1", 0, None)
        yield f"http://{host}:{port}"
        tg.cancel_scope.cancel()


async def ids_of(http: httpx.AsyncClient, params: list[tuple[str, str]], n: int = 6) -> set[str]:
    out = set()
    for _ in range(n):
        resp = await http.get("/api/v1/services/api", params=params)
        assert resp.status_code == 200, resp.text
        out.add(resp.json()["service_id"])
    return out


async def test_http_discovery_takes_capability_where_and_prefer(zoned: None, saga_url: str) -> None:
    async with httpx.AsyncClient(base_url=saga_url) as http:

        async def all_seen() -> bool:
            return await ids_of(http, []) == set(ZONED)

        await eventually(all_seen, 10, what="the gateway's view has every instance")
        assert await ids_of(http, [("where", "zone:eu-1")]) == {"eu-a", "eu-b"}
        assert await ids_of(http, [("where", "zone:eu-1"), ("where", "tier:gold")]) == {"eu-a"}
        assert await ids_of(http, [("capability", "gpu")]) == {"eu-a", "us-a"}
        assert await ids_of(http, [("capability", "gpu"), ("prefer", "zone:us-1")]) == {"us-a"}
        assert await ids_of(http, [("prefer", "zone:ap-1")]) == set(ZONED)  # fallback
        resp = await http.get("/api/v1/services/api", params={"where": "zone:ap-1"})
        assert resp.status_code == 404 and "matches the filters" in resp.text
        resp = await http.get("/api/v1/services/api", params={"where": "zone"})
        assert resp.status_code == 400 and "expected key:value" in resp.text, resp.text
        # The shape is the seed's: unchanged keys.
        body = (await http.get("/api/v1/services/api", params={"where": "zone:us-1"})).json()
        assert body["service_id"] == "us-a" and body["metadata"] == {"zone": "us-1"}


async def test_client_discover_service_filters_in_redis_and_rest_modes(
    zoned: None, saga_url: str, redis_url: str
) -> None:
    async with (
        AsyncSagaServiceDiscovery(redis_url=redis_url) as saga,
        AsyncSagaServiceDiscovery(saga_url, cache_ttl=0) as rest,
    ):
        for client in (saga, rest):
            got = {
                (await client.discover_service("api", where={"zone": "eu-1"})).service_id
                for _ in range(6)
            }
            assert got == {"eu-a", "eu-b"}, client.mode
            found = await client.discover_service("api", "gpu", prefer={"zone": "us-1"})
            assert found.service_id == "us-a"
            with pytest.raises(ServiceNotFound):
                await client.discover_service("api", where={"zone": "ap-1"})
            with pytest.raises(InvalidEvent, match="bad_filter"):
                await client.discover_service("api", where={"": "x"})


def test_sync_client_of_the_fake_takes_the_same_filters() -> None:
    fake = FakeRegistry()
    with fake.sync_client() as a, fake.sync_client() as b:
        a.register_service("api", "http://a:80", metadata={"zone": "eu-1"})
        b.register_service("api", "http://b:80", metadata={"zone": "us-1"})
        assert b.discover_service("api", where={"zone": "us-1"}).service_url == "http://b:80"
        got = {b.discover_service("api", prefer={"zone": "ap-1"}).service_url for _ in range(4)}
        assert got == {"http://a:80", "http://b:80"}
        with pytest.raises(ServiceNotFound):
            b.discover_service("api", "gpu")
