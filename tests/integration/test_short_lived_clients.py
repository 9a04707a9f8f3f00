"""Short-lived clients (a topology's one-command asks) close their socket even when the
caller is cancelled (saga_events._redis.closing)."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events._redis import closing
from saga_events.embedded import RedisServer
from saga_events.testing import eventually
from saga_events.topology import Topology

pytestmark = pytest.mark.anyio


async def test_a_cancelled_one_command_ask_closes_its_socket(redis_server: RedisServer) -> None:
    """An ask cancelled while its node does not answer (paused) closes its socket (the
    read that is cancelled disconnects; the close after it must not leave another)."""
    address = (redis_server.host, redis_server.port)
    watcher = aioredis.Redis.from_url(redis_server.url)
    try:
        await watcher.client_setname("watcher")
        topology = Topology(f"redis+cluster://{address[0]}:{address[1]}")
        redis_server.pause()
        try:
            with anyio.move_on_after(0.5) as scope:
                await topology._role(address)  # connects, sends ROLE, waits for the reply
            assert scope.cancelled_caught
        finally:
            redis_server.resume()

        await eventually(lambda: _only(watcher), 10, what="the ask's socket closed")
    finally:
        await watcher.aclose()


async def test_closing_closes_the_client_in_a_cancelled_scope(redis_server: RedisServer) -> None:
    """``closing`` closes its client even when the scope around it is already cancelled
    (a task group ending mid-ask): an unshielded ``aclose`` is cancelled at its first
    await, redis-py's gather of disconnects never runs, and the idle socket stays open
    until its StreamWriter is collected after the loop closed."""
    watcher = aioredis.Redis.from_url(redis_server.url)
    try:
        await watcher.client_setname("watcher")
        with anyio.CancelScope() as scope:
            async with closing(aioredis.Redis.from_url(redis_server.url)) as client:
                await client.ping()  # one idle connection in the client's pool
                scope.cancel()

        await eventually(lambda: _only(watcher), 10, what="the client's socket closed")
    finally:
        await watcher.aclose()


async def _only(watcher: aioredis.Redis) -> bool:
    """True when ``watcher`` (named "watcher") is the server's only normal client."""
    listed = await watcher.client_list(_type="normal")
    return not [c for c in listed if c.get("name") != "watcher"]


async def test_the_client_backend_closes_in_a_cancelled_scope(redis_server: RedisServer) -> None:
    """The saga client's Redis backend closes its pool even when its ``aclose`` runs in an
    already cancelled scope (a caller's task group ending)."""
    from saga_events._client_redis import _RedisBackend

    watcher = aioredis.Redis.from_url(redis_server.url)
    try:
        await watcher.client_setname("watcher")
        backend = _RedisBackend(
            redis_server.url, namespace="default", timeout=2.0, discovery_timeout=2.0
        )
        await backend._redis.ping()  # one idle connection in the backend's pool
        with anyio.CancelScope() as scope:
            scope.cancel()
            await backend.aclose()

        await eventually(lambda: _only(watcher), 10, what="the backend's socket closed")
    finally:
        await watcher.aclose()
