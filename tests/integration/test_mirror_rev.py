"""Anti-entropy: the registry revision repairs a mirror that lost a notification."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar, model
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.model import Instance
from saga_events.testing import eventually, wait_mirror_matches

pytestmark = pytest.mark.anyio
K = Keys("default")

# What the registrar's scripts do for a record change, in one script: write, index, rev
# and (ARGV feed = '1') the feed message; without it, what a registrar before the feed did.
PUT = """
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('SADD', KEYS[2], KEYS[1])
if ARGV[2] == '1' then
  local rev = redis.call('INCR', KEYS[3])
  if ARGV[3] == '1' then
    redis.call('PUBLISH', KEYS[4], '{"rev":' .. rev .. ',"ch":[["set",'
      .. cjson.encode(KEYS[1]) .. ',' .. ARGV[1] .. ']]}')
  end
end
"""
DELETE = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
if ARGV[1] == '1' then
  local rev = redis.call('INCR', KEYS[3])
  if ARGV[2] == '1' then
    redis.call('PUBLISH', KEYS[4], '{"rev":' .. rev .. ',"ch":[["del",'
      .. cjson.encode(KEYS[1]) .. ']]}')
  end
end
"""


def record(name: str, sid: str, seq: int = 1) -> bytes:
    return model.encode(
        Instance(
            incarnation=1, seq=seq, registered_at_ms=0, service_name=name, service_id=sid,
            service_url=f"http://{sid}:80",
        )
    )  # fmt: skip


async def put(
    admin: aioredis.Redis,
    name: str,
    sid: str,
    seq: int = 1,
    rev: bool = True,
    feed: bool = False,
    px: int | None = None,
) -> str:
    key = K.inst(name, sid)
    await admin.eval(
        PUT, 4, key, K.index, K.rev, K.feed, record(name, sid, seq), "1" if rev else "0",
        "1" if feed else "0", "" if px is None else str(px),
    )  # fmt: skip
    return key


async def delete(admin: aioredis.Redis, key: str, rev: bool = True, feed: bool = False) -> None:
    await admin.eval(DELETE, 4, key, K.index, K.rev, K.feed, "1" if rev else "0",
                     "1" if feed else "0")  # fmt: skip


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_mirror_converges_after_a_short_notification_gap(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Issue 8: flags cleared and put back within a second by someone else; a change made
    in between reaches the mirror through the revision check, not never."""
    url = redis_server.url
    # The registrar would notice the flags only at its next config check: not in this test.
    async with (
        Registrar(url, rebuild_wait=0.1, config_check_interval=3600) as registrar,
        Mirror(url, rev_interval=0.2) as mirror,
    ):
        await put(admin, "before", "b-1")
        await mirror.wait_for("before", 5)
        checks = mirror.stats.rev_checks
        await eventually(lambda: mirror.stats.rev_checks >= checks + 2, 5, what="rev checks")
        flags = (await admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
        await admin.config_set("notify-keyspace-events", "")
        try:
            lost = await put(admin, "during", "d-1")
        finally:
            await admin.config_set("notify-keyspace-events", flags)
        assert registrar.stats.flags_reapplied == 0
        await mirror.wait_until(lambda m: lost in m.snapshot(), 10)
        assert mirror.stats.rev_resyncs >= 1
        await wait_mirror_matches(mirror, url)


async def test_churn_with_rev_and_redis_expiries_causes_no_false_resync(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Every feed change counted, in flight or not, and records that Redis expires by
    itself (an ``expired`` key event with no rev increment): the check never resyncs
    without cause."""
    url = redis_server.url
    async with (
        Registrar(url, rebuild_wait=0.1) as _,
        Mirror(url, rev_interval=0.05) as mirror,
    ):
        await eventually(lambda: (mirror.epoch or "").endswith(":ready"), 5, what="ready")
        resyncs = mirror.stats.resyncs
        keys = []
        for i in range(300):
            keys.append(await put(admin, f"s{i % 7}", f"i-{i}", feed=True))
            if i % 3 == 0:
                await put(admin, f"s{i % 7}", f"i-{i}", seq=2, feed=True)
            if i % 5 == 0:
                await delete(admin, keys.pop(0), feed=True)
        await put(admin, "short", "x", feed=True, px=50)
        await mirror.wait_until(lambda m: K.inst("short", "x") in m.snapshot(), 5)
        await mirror.wait_until(lambda m: K.inst("short", "x") not in m.snapshot(), 5)
        await admin.srem(K.index, K.inst("short", "x"))
        checks = mirror.stats.rev_checks
        await eventually(lambda: mirror.stats.rev_checks >= checks + 5, 10, what="rev checks")
        await wait_mirror_matches(mirror, url)
        assert mirror.stats.rev_resyncs == 0
        assert mirror.stats.resyncs == resyncs


async def test_without_a_rev_key_the_check_is_skipped(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """An older registrar keeps no rev: the mirror checks, finds none and never resyncs
    for it (its writes, with no feed message, show at the periodic resync)."""
    url = redis_server.url
    async with (
        Registrar(url, rebuild_wait=0.1) as _,
        Mirror(url, rev_interval=0.05, resync_interval=0.5) as mirror,
    ):
        for i in range(50):
            await put(admin, "old", f"o-{i}", rev=False)
        await admin.delete(K.rev)
        checks = mirror.stats.rev_checks
        await eventually(lambda: mirror.stats.rev_checks >= checks + 3, 10, what="rev checks")
        await wait_mirror_matches(mirror, url)
        assert mirror.stats.rev_resyncs == 0


async def test_a_registration_during_a_short_flags_gap_reaches_the_mirror_through_rev(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Real registrar: flags cleared and put back by a third party, an agent registered
    in between; the mirror converges.

    Before the change feed only the revision told the mirror (and before the exact
    RevCheck this waited forever). The feed does not depend on the notification
    flags: the registration arrives as a feed message, with no resync at all."""
    url = redis_server.url
    # The registrar would notice the reset at its next flag check and bump the
    # epoch; a third party's gap is shorter than that check's interval.
    async with Registrar(url, rebuild_wait=0.1, config_check_interval=3600):
        # Its first rebuild ends with an epoch change that resyncs every mirror:
        # let that pass first, so that only the revision can repair the gap.
        async def first_rebuild_done() -> bool:
            return (await admin.get(K.epoch) or b"").endswith(b":ready")

        await eventually(first_rebuild_done, 10, what="the first rebuild done")
        async with (
            Mirror(url, rev_interval=0.5, canary_timeout=60) as mirror,
            Agent(url, "before", "http://h:1", ttl=30),
        ):
            await mirror.wait_for("before", timeout=10)
            flags = (await admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
            await admin.config_set("notify-keyspace-events", "")
            async with Agent(url, "during", "http://h:2", ttl=30) as agent:
                key = K.inst("during", agent.service_id)
                await eventually(lambda: admin.exists(key), 10, what="the record")
                await admin.config_set("notify-keyspace-events", flags)
                await mirror.wait_for("during", timeout=20)
                assert mirror.stats.rev_resyncs == 0, mirror.stats
                assert mirror.stats.feed_changes >= 2, mirror.stats
