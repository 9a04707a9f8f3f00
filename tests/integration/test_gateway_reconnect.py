"""A gateway heartbeat whose connection died since its last use (Redis restarted empty,
a CLIENT KILL) is applied on a fresh connection instead of being answered 503.

The chaos run's "[pick after registrar_pause] mirror 0 dropped live instance svc-h-14":
after a ``redis_restart`` the gateway's held connections were dead; the first heartbeats
sent on them (one per dead connection, seconds after Redis was back) were answered 503,
and a seed-style REST client (20 s ttl, a heartbeat every 10 s, no retry before its next
tick) that lost two in a row was reaped ~20 s later, during whichever fault ran then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from saga_events import Mirror, Registrar
from saga_events._redis import connect
from saga_events.writer import Registration, Writer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def writer(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Writer]:
    client = connect(redis_url)  # as the gateway's: no retries inside redis-py
    try:
        yield Writer(registrar, mirror, client, write_timeout=10.0)
    finally:
        await client.aclose()


async def test_heartbeat_on_connections_killed_since_last_use_is_kept(
    writer: Writer, redis_url: str
) -> None:
    """Every normal connection killed between two heartbeats: the second is still
    applied (the deadline moves) and answered with the id. Failed before: the
    registrar's held pipeline connection raised ConnectionError (the gateway's 503)."""
    inst, _ = await writer.register(Registration("pay", "http://10.0.0.1:80", ttl_ms=20_000))
    sid = inst.service_id
    kept, _ = await writer.heartbeat("pay", sid)  # the pipeline now holds a connection
    assert kept == [sid]
    admin = aioredis.Redis.from_url(redis_url)
    try:
        key = writer.registrar.keys.inst("pay", sid)
        before = await admin.zscore(writer.registrar.keys.deadlines, key)
        killed = await admin.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 2, killed  # the writer's and the registrar's connections at least
        kept, _ = await writer.heartbeat("pay", sid)
        assert kept == [sid]
        after = await admin.zscore(writer.registrar.keys.deadlines, key)
        assert before is not None and after is not None and after >= before
    finally:
        await admin.aclose()
