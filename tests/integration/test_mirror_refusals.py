"""A mirror that Redis refuses (NOPERM) never raises into its host; it says why and retries."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar, ServiceNotFound
from saga_events.embedded import RedisServer

pytestmark = pytest.mark.anyio

USER = "no-psubscribe"
PASSWORD = "pw-9f3a"


async def make_user(admin: aioredis.Redis, *rules: str) -> None:
    await admin.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}",
                                "~*", "&*", "+@all", *rules)  # fmt: skip


def user_url(server: RedisServer) -> str:
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


async def test_mirror_without_psubscribe_starts_stale_says_why_and_recovers(
    redis_server: RedisServer,
) -> None:
    """Issue 8: `async with Mirror` and `tg.start(mirror.run)` return instead of raising
    NoPermissionError; the mirror is stale with `last_error`, serves fallbacks, and syncs
    once the user is granted PSUBSCRIBE."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await make_user(admin, "-psubscribe")
        async with Registrar(redis_server.url, rebuild_wait=0.1):
            async with Agent(redis_server.url, "payment", "http://10.0.0.5:80", service_id="p"):
                mirror = Mirror(user_url(redis_server), fallbacks={"billing": "http://b:80"})
                async with anyio.create_task_group() as tg:
                    with anyio.fail_after(10):
                        await tg.start(mirror.run)
                    assert mirror.stale and not mirror.has_synced
                    assert mirror.last_error is not None and "NOPERM" in mirror.last_error.upper()
                    assert mirror.pick("billing").service_url == "http://b:80"
                    with pytest.raises(ServiceNotFound):
                        mirror.pick("payment")
                    refusals = mirror.stats.refusals
                    await mirror.wait_until(lambda m: m.stats.refusals > refusals, 10)
                    await make_user(admin)  # PSUBSCRIBE granted
                    await mirror.wait_until(lambda m: m.has_synced and not m.stale, 15)
                    assert mirror.pick("payment").service_id == "p"
                    assert mirror.last_error is None
                    tg.cancel_scope.cancel()
                await mirror.aclose()
    finally:
        await admin.aclose()


async def test_async_with_returns_on_a_refusal(redis_server: RedisServer) -> None:
    """The context-manager form too: no exception into the host, stale and the reason."""
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        await make_user(admin, "-psubscribe")
        with anyio.fail_after(15):
            async with Mirror(user_url(redis_server)) as mirror:
                assert mirror.stale and not mirror.has_synced and len(mirror) == 0
                assert "NOPERM" in (mirror.last_error or "").upper()
    finally:
        await admin.aclose()
