"""A publisher's oversized messages cannot knock the registrar off pub/sub (after
`saga-events setup`), and what is lost when it could is repaired by heartbeats."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.notify import PROTO_MAX_BULK_LEN, apply_setup
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio
K = Keys("default")
HUGE = 33 * 1024 * 1024  # over Redis's default pub/sub hard limit of 32 MB
TTL_MS = 3000  # heartbeats every ttl/3 = 1 s (±10 %): the repair bound
# The repair bound: one heartbeat interval plus its jitter, plus the registrar's
# reconnect; "eventually" gets slack on top for a loaded machine.
REPAIR_BOUND_S = TTL_MS / 3000 * 1.1 + 2.0


async def publish_quietly(client: aioredis.Redis, channel: str, size: int) -> str:
    """PUBLISH ``size`` bytes; return how it went ('N receivers' or the refusal)."""
    try:
        return f"{await client.publish(channel, b'x' * size)} receivers"
    except (ResponseError, RedisConnectionError) as exc:
        return f"refused: {exc}"


async def test_after_setup_the_biggest_message_cannot_disturb_the_registrar(
    redis_server: RedisServer,
) -> None:
    """After setup, the biggest message Redis accepts (1 MB) is rejected as oversized and
    a 33 MB one is refused by Redis; another service registering meanwhile is seen at
    once and the registrar never loses its subscription."""
    url = redis_server.url
    admin = aioredis.Redis.from_url(url)
    attacker = aioredis.Redis.from_url(url)
    try:
        await apply_setup(admin)
        async with (
            Registrar(url, rebuild_wait=0.1, manage_config=False) as registrar,
            Mirror(url) as mirror,
        ):
            reconnects = registrar.stats.reconnects
            biggest = PROTO_MAX_BULK_LEN
            assert await publish_quietly(attacker, K.events("payment"), biggest) != "0 receivers"
            async with Agent(url, "billing", "http://10.0.0.7:80", ttl=TTL_MS / 1000):
                outcome = await publish_quietly(attacker, K.events("payment"), HUGE)
                assert outcome.startswith("refused"), outcome
                with anyio.fail_after(REPAIR_BOUND_S):
                    await mirror.wait_for("billing")
            await eventually(lambda: registrar.stats.rejected["oversized"] >= 1, 10)
            assert registrar.stats.reconnects == reconnects
            assert registrar.subscribed
    finally:
        await admin.aclose()
        await attacker.aclose()


async def test_without_setup_a_lost_register_is_repaired_by_the_next_heartbeat(
    redis_url: str,
) -> None:
    """On Redis's defaults a 33 MB publish gets the registrar's connection closed (output
    buffer over 32 MB) and events sent meanwhile are lost; the registrar reconnects and
    the agent's next heartbeat, which carries the full record, brings the instance."""
    attacker = aioredis.Redis.from_url(redis_url)
    try:
        async with (
            Registrar(url := redis_url, rebuild_wait=0.1) as registrar,
            Mirror(url) as mirror,
        ):
            outcome = await publish_quietly(attacker, K.events("payment"), HUGE)
            assert outcome == "1 receivers", outcome  # PUBLISH said it was delivered
            async with Agent(url, "billing", "http://10.0.0.7:80", ttl=TTL_MS / 1000):
                with anyio.fail_after(REPAIR_BOUND_S + 5):
                    await mirror.wait_for("billing")
            assert registrar.stats.reconnects >= 1  # it was knocked off, and came back
            await eventually(lambda: registrar.subscribed, 10)
    finally:
        await attacker.aclose()
