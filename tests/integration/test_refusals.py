"""Redis refusing commands (OOM, READONLY) never takes the registrar down."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar
from saga_events.testing import eventually, wait_mirror_matches

pytestmark = pytest.mark.anyio


async def test_registrar_survives_redis_refusing_writes(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """With Redis out of memory the registrar counts the refused events and keeps
    running; when memory is back, the next heartbeat registers the instance."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        async with Agent(redis_url, "starved", "http://10.3.0.1:80", service_id="s", ttl=3):
            await eventually(lambda: registrar.stats.rejected["redis_refused"] >= 1, 5)
            assert mirror.instances("starved") == []
            assert registrar.subscribed
            await admin.config_set("maxmemory", "0")
            await mirror.wait_for("starved", 5)
            await wait_mirror_matches(mirror, redis_url)
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
