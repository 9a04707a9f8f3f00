"""saga_events.sse_client.WatchFollower against a real gateway (Redis, registrar, uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from saga_events import Mirror, Registrar
from saga_events.sse_client import WatchFollower, WatchUnsupported
from tests.gateway_helpers import Served, serve_gateway

pytestmark = pytest.mark.anyio

REGISTER = "/api/v1/services/register"


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


async def register(served: Served, name: str, url: str) -> str:
    r = await served.client.post(REGISTER, json={"service_name": name, "service_url": url})
    assert r.status_code == 200, r.text
    return str(r.json()["service_id"])


def ids(f: WatchFollower, name: str) -> set[str]:
    return {i["service_id"] for i in f.instances(name)}


async def test_follower_keeps_a_view_from_the_stream(served: Served) -> None:
    """Started after the snapshot; then follows a register and a DELETE."""
    first = await register(served, "orders", "http://10.0.0.1:80")
    follower = WatchFollower(served.base_url, backoff_initial=0.01)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(follower.run)
        assert follower.has_synced and follower.supported and follower.connected
        assert ids(follower, "orders") == {first}
        assert follower.stale is False

        second = await register(served, "billing", "http://10.0.0.2:80")
        await follower.wait_until(lambda f: ids(f, "billing") == {second})
        r = await served.client.delete("/api/v1/services/orders")
        assert r.status_code == 200, r.text
        await follower.wait_until(lambda f: "orders" not in f.services())
        assert list(follower.services()) == ["billing"]
        tg.cancel_scope.cancel()


async def test_follower_resumes_with_last_event_id_after_a_dropped_stream(
    served: Served,
) -> None:
    """When the stream ends, the follower reconnects with its last id: no second snapshot,
    and what happened meanwhile arrives."""
    follower = WatchFollower(served.base_url, backoff_initial=0.2, backoff_max=0.2)
    hub = served.gateway.watch_hub
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(follower.run)
        for w in list(hub._watchers):  # the gateway ends the stream
            w.close()
        await follower.wait_until(lambda f: not f.connected)
        added = await register(served, "orders", "http://10.0.0.1:80")
        await follower.wait_until(lambda f: ids(f, "orders") == {added})
        assert follower.connects == 2
        assert follower.snapshots == 1
        tg.cancel_scope.cancel()


async def test_follower_narrowed_to_a_service(served: Served) -> None:
    """service= follows one service only."""
    await register(served, "orders", "http://10.0.0.1:80")
    follower = WatchFollower(served.base_url, service="billing")
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(follower.run)
        assert follower.services() == {}
        await register(served, "orders", "http://10.0.0.3:80")
        billing = await register(served, "billing", "http://10.0.0.2:80")
        await follower.wait_until(lambda f: ids(f, "billing") == {billing})
        assert list(follower.services()) == ["billing"]
        tg.cancel_scope.cancel()


async def test_follower_reports_a_server_without_the_endpoint(served: Served) -> None:
    """A 404 for the stream raises WatchUnsupported at start: the caller polls instead."""
    follower = WatchFollower(served.base_url + "/not-a-gateway")
    with pytest.raises(WatchUnsupported) as caught:
        with anyio.fail_after(10):
            await follower.run()
    assert caught.value.status == 404
    assert follower.supported is False and not follower.has_synced
