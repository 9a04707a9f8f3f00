"""The one subscription session: confirm, deliver in order, ping, reconnect, never raise."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events.connection import SessionStats, Subscription, Timing, consume, open_client
from saga_events.embedded import RedisServer
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio


async def test_consume_delivers_in_order_and_resubscribes_after_a_kill(
    redis_server: RedisServer,
) -> None:
    """Messages arrive in order; a killed subscription reconnects, runs on_connect again,
    and keeps delivering; the consumer never raises."""
    client = open_client(redis_server.url)
    admin = aioredis.Redis.from_url(redis_server.url)
    got: list[bytes] = []
    connects: list[Subscription] = []
    stats = SessionStats()

    async def on_connect(sub: Subscription) -> None:
        connects.append(sub)

    async def on_batch(batch: list[Any]) -> None:
        got.extend(reply[-1] for reply in batch if reply[0] in (b"message", b"pmessage"))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consume(
                client, name="t", channels=["c"], patterns=["p:*"], on_connect=on_connect,
                on_batch=on_batch, timing=Timing(ping_interval=0.1, ping_timeout=1.0),
                stats=stats,
            ))  # fmt: skip
            await eventually(lambda: connects, 5, what="subscribed")
            await eventually(lambda: admin.publish("c", b"probe"), 5, what="a subscriber")
            for i in range(100):
                await admin.publish("c" if i % 2 else "p:x", str(i).encode())
            await eventually(lambda: len(got) >= 101, 5, what="100 messages")
            assert got[1:101] == [str(i).encode() for i in range(100)]
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await eventually(lambda: len(connects) >= 2, 10, what="resubscribed")
            await eventually(lambda: admin.publish("c", b"after"), 5, what="a subscriber")
            await eventually(lambda: b"after" in got, 5, what="delivery after reconnect")
            assert stats.transient_errors >= 1
            tg.cancel_scope.cancel()
    finally:
        await admin.aclose()
        await client.aclose()


async def test_a_silent_subscription_is_a_disconnect(redis_server: RedisServer) -> None:
    """A paused Redis answers no PING: after ping_timeout the session fails and reconnects."""
    client = open_client(redis_server.url)
    connects = 0
    stats = SessionStats()

    async def on_connect(sub: Subscription) -> None:
        nonlocal connects
        connects += 1

    async def on_batch(batch: list[Any]) -> None:
        pass

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: consume(
                client, name="t", channels=["c"], on_connect=on_connect, on_batch=on_batch,
                timing=Timing(ping_interval=0.1, ping_timeout=0.5), stats=stats,
            ))  # fmt: skip
            await eventually(lambda: connects == 1, 5, what="subscribed")
            redis_server.pause()
            try:
                await eventually(lambda: stats.transient_errors >= 1, 10, what="silence seen")
            finally:
                redis_server.resume()
            await eventually(lambda: connects >= 2, 10, what="resubscribed")
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()
