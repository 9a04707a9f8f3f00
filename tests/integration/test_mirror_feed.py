"""The change feed: gaps resync, the snapshot/feed race, and a replica's subscribers.

Real redis-server processes; changes are made by the registrar's own scripts
(``Registrar.apply``) or, to inject a gap, by a script that writes like them
and publishes (or not) the feed message they publish.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar, feed, model
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import client, info, wait_for
from saga_events.identity import parse_epoch
from saga_events.keys import Keys
from saga_events.model import Instance
from saga_events.notify import REQUIRED_FLAGS
from saga_events.testing import eventually, wait_mirror_matches
from saga_events.view import Added, Change, Removed, Updated

pytestmark = pytest.mark.anyio
K = Keys("default")

# What apply.lua does for a create, and its feed message unless ARGV[2] is '0' (lost).
FEED_PUT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], KEYS[1])
local rev = redis.call('INCR', KEYS[3])
if ARGV[2] == '1' then
  redis.call('PUBLISH', KEYS[4], '{"rev":' .. string.format('%.0f', rev)
    .. ',"ch":[["set",' .. cjson.encode(KEYS[1]) .. ',' .. ARGV[1] .. ']]}')
end
return rev
"""


def record(name: str, sid: str, seq: int = 1) -> bytes:
    return model.encode(
        Instance(
            incarnation=1, seq=seq, registered_at_ms=0, service_name=name, service_id=sid,
            service_url=f"http://{sid}:80",
        )
    )  # fmt: skip


async def feed_put(admin: aioredis.Redis, name: str, sid: str, *, published: bool = True) -> str:
    key = K.inst(name, sid)
    args = (key, K.index, K.rev, K.feed, record(name, sid), "1" if published else "0")
    await admin.eval(FEED_PUT, 4, *args)
    return key


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.url)
    yield c
    await c.aclose()


async def ready_registrar_epoch(admin: aioredis.Redis) -> None:
    async def done() -> bool:
        return (await admin.get(K.epoch) or b"").endswith(b":ready")

    await eventually(done, 10, what="the first rebuild done")


def test_the_scripts_message_format_round_trips() -> None:
    """feed.encode builds what the scripts publish; decode reads it back with its range."""
    rec = record("a", "1")
    msg = feed.decode(feed.encode(12, [(K.inst("a", "1"), rec), (K.inst("a", "2"), None)]))
    assert (msg.first, msg.rev) == (11, 12)
    assert isinstance(msg.ch[0], feed.Set) and msg.ch[0].record == model.decode_instance(rec)
    assert msg.ch[1] == feed.Del(K.inst("a", "2"))
    revs = feed.Revisions()
    revs.start(10)
    assert revs.check(msg) is feed.Verdict.APPLY and revs.last == 12
    assert revs.check(feed.decode(feed.encode(14, [(K.inst("a", "3"), None)]))) is feed.Verdict.GAP


async def test_a_feed_gap_resyncs_and_the_mirror_converges(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A change whose feed message is lost, then one whose message arrives: the second
    message's revision skips one, and that alone (no keyspace notification: flags off;
    no rev check; no canary loss) makes the mirror resync and see the lost change."""
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1, config_check_interval=3600):
        await ready_registrar_epoch(admin)
        async with Mirror(url, rev_interval=3600, canary_timeout=60) as mirror:
            await feed_put(admin, "seen", "s-1")
            await mirror.wait_for("seen", 5)
            assert mirror.stats.feed_gaps == 0 and mirror.stats.orphans == 0
            flags = (await admin.config_get("notify-keyspace-events"))["notify-keyspace-events"]
            await admin.config_set("notify-keyspace-events", "")
            try:
                lost = await feed_put(admin, "lost", "l-1", published=False)
                await feed_put(admin, "after", "a-1")
                await mirror.wait_until(lambda m: lost in m.snapshot(), 10)
            finally:
                await admin.config_set("notify-keyspace-events", flags)
            assert mirror.stats.feed_gaps >= 1
            assert mirror.stats.rev_resyncs == 0
            await wait_mirror_matches(mirror, url)


async def test_an_unreadable_feed_message_is_counted_and_dropped(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """A stray PUBLISH on the feed changes nothing and costs no resync."""
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1):
        await ready_registrar_epoch(admin)
        # No canary timeout under a loaded machine: only the feed may cause a resync.
        async with Mirror(url, rev_interval=3600, canary_timeout=60) as mirror:
            resyncs = mirror.stats.resyncs
            before = mirror.snapshot()
            await admin.publish(K.feed, b'{"rev":"x"}')
            await admin.publish(K.feed, b"\xff not json")
            await eventually(lambda: mirror.stats.feed_rejected == 2, 5, what="rejections")
            await feed_put(admin, "next", "n-1")
            await mirror.wait_for("next", 5)
            assert mirror.stats.resyncs == resyncs and mirror.stats.feed_gaps == 0
            assert set(mirror.snapshot()) == set(before) | {K.inst("next", "n-1")}


def register(name: str, sid: str, seq: int, url: str = "http://h:1") -> model.Register:
    return model.Register(
        service_name=name, service_id=sid, incarnation=7, seq=seq, service_url=url, ttl_ms=60_000
    )


async def test_changes_during_the_snapshot_are_neither_lost_nor_applied_twice(
    redis_server: RedisServer,
) -> None:
    """Changes made between the snapshot's rev read and its MGET, and between the MGET
    and the read of the feed after it: each key's first change is its final record (no
    older version first, no repeat), the deleted key never shows, and nothing follows
    for them once the mirror watches."""
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1) as registrar:
        for sid in ("x", "z"):
            await registrar.apply(register("race", sid, 1))
        mirror = Mirror(url, rev_interval=3600)
        watcher = mirror._watcher
        original = watcher._pipe.execute
        injected: list[str] = []

        async def execute(packed: bytes, replies: int) -> list[Any]:
            if injected or b"\r\nMGET\r\n" not in packed[:40]:
                return await original(packed, replies)
            injected.append("before MGET")
            await registrar.apply(register("race", "x", 2, "http://h:2"))
            await registrar.apply(register("race", "x", 3, "http://h:3"))
            await registrar.apply(register("race", "y", 1))
            await registrar.apply(model.Leave(service_name="race", service_id="z",
                                              incarnation=7, seq=2))  # fmt: skip
            out = await original(packed, replies)
            injected.append("after MGET")
            await registrar.apply(register("race", "x", 4, "http://h:4"))
            return out

        watcher._pipe.execute = execute  # type: ignore[method-assign]
        stream = mirror.changes()
        seen: list[Change] = []
        async with mirror:
            assert injected == ["before MGET", "after MGET"]
            await registrar.apply(register("race", "w", 1))  # a change after the sync
            with anyio.fail_after(10):
                async for change in stream:
                    seen.append(change)
                    if isinstance(change, Added) and change.instance.service_id == "w":
                        break
            await wait_mirror_matches(mirror, url)
            await stream.aclose()
    by_id: dict[str, list[Change]] = {}
    for change in seen:
        by_id.setdefault(change.instance.service_id, []).append(change)
    assert set(by_id) == {"x", "y", "w"}, seen  # z was deleted before the MGET
    (x,) = by_id["x"]
    assert isinstance(x, Added) and x.instance.service_url == "http://h:4", by_id["x"]
    assert [type(c) for c in by_id["y"]] == [Added]
    assert not any(isinstance(c, Updated | Removed) for c in seen)
    assert mirror.stats.feed_gaps == 0 and mirror.stats.feed_changes >= 1


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and one linked replica."""
    with RedisServer() as master, RedisServer() as replica:
        with client(replica) as c:
            c.replicaof(master.host, master.port)
            c.config_set("notify-keyspace-events", REQUIRED_FLAGS)  # CONFIG is not replicated
        wait_for(lambda: info(replica, "replication")["master_link_status"] == "up", 20,
                 "replica linked")  # fmt: skip
        yield master, replica


def _settled(m: Mirror) -> bool:
    epoch = parse_epoch(m.epoch)
    return epoch is not None and not epoch.rebuilding and not m.stale


async def test_a_mirror_on_a_replica_follows_the_feed(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """The scripts' PUBLISH is replicated: a mirror reading a REPLICAOF replica gets every
    change from the feed (no orphan GET) and converges, leave included."""
    master, replica = pair
    async with Registrar(master.url, rebuild_wait=0.1):
        async with Mirror(replica.url, rev_interval=3600, canary_timeout=60) as mirror:
            # The registrar's first rebuild over and resynced first: a registration made
            # during it reaches the mirror by the rebuild's resync, not the feed.
            await mirror.wait_until(_settled, 10)
            async with Agent(master.url, "payment", "http://10.0.0.5:80", ttl=30) as agent:
                await mirror.wait_for("payment", 10)
            key = K.inst("payment", agent.service_id)
            await mirror.wait_until(lambda m: key not in m.snapshot(), 10)
            assert mirror.stats.feed_changes >= 2, mirror.stats
            assert mirror.stats.orphans == 0 and mirror.stats.gets == 0, mirror.stats
            await wait_mirror_matches(mirror, replica.url)


async def test_a_canary_back_during_the_canary_lost_resync_ends_the_staleness(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """No registrar: the canary is lost and the mirror resyncs as stale. A liveness write
    lands while that snapshot runs, so its beat is read with the snapshot's buffer and
    no later one comes: the mirror must not stay stale for good (it did, once the feed
    read the buffer inside the snapshot; test_chaos found it after a Redis pause)."""
    url = redis_server.url
    await admin.config_set("notify-keyspace-events", REQUIRED_FLAGS)  # what a registrar sets
    mirror = Mirror(url, canary_timeout=0.5, rev_interval=3600)
    watcher = mirror._watcher
    original = watcher._pipe.execute
    beats: list[str] = []

    async def execute(packed: bytes, replies: int) -> list[Any]:
        if watcher.canary.is_lost and not beats:
            beats.append("liveness written during the canary-lost resync")
            await admin.set(K.registrar("r-1"), b"1", px=60_000)
        return await original(packed, replies)

    watcher._pipe.execute = execute  # type: ignore[method-assign]
    async with mirror:
        await eventually(lambda: beats, 10, what="the canary-lost resync")
        await mirror.wait_until(lambda m: not m.stale, 10)
        assert mirror.stats.canary_notifications >= 1


async def test_a_del_outside_the_scripts_does_not_remove_a_live_instance(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """Issue 11: a Cluster slot migration's MIGRATE deletes the keys on the source node,
    which the mirror heard as a record ``del`` with no feed message, read by GET on the
    source's replica (nil): a live instance dropped. A ``del`` from outside the scripts
    now changes nothing by itself; the feed and the resyncs decide."""
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1):
        await ready_registrar_epoch(admin)
        async with Mirror(url, rev_interval=3600, canary_timeout=60) as mirror:
            gone = await feed_put(admin, "pay", "moved")
            await mirror.wait_until(lambda m: gone in m.snapshot(), 5)
            await admin.delete(gone)  # what MIGRATE does on the source node
            marker = await feed_put(admin, "pay", "after")  # read after the del
            await mirror.wait_until(lambda m: marker in m.snapshot(), 5)
            assert gone in mirror.snapshot()
            assert mirror.stats.gets == 0, mirror.stats


async def test_a_backstop_refresh_wakes_no_mirror(
    redis_server: RedisServer, admin: aioredis.Redis
) -> None:
    """The registrar refreshes a record's backstop TTL (PEXPIRE) on heartbeats: an
    ``expire`` that changes nothing. The mirror hears no record notification for it
    (one message per change: the feed's), and Redis's own expiry still removes."""
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1):
        await ready_registrar_epoch(admin)
        async with Mirror(url, rev_interval=3600, canary_timeout=60) as mirror:
            key = await feed_put(admin, "pay", "p-1")
            await mirror.wait_until(lambda m: key in m.snapshot(), 5)
            for _ in range(20):
                await admin.pexpire(key, 60_000)
            marker = await feed_put(admin, "pay", "marker")
            await mirror.wait_until(lambda m: marker in m.snapshot(), 5)
            assert mirror.stats.record_notifications == 0, mirror.stats
            await admin.pexpire(key, 1)  # Redis's own removal: the backstop fired
            await mirror.wait_until(lambda m: key not in m.snapshot(), 5)
            assert mirror.stats.record_notifications == 1, mirror.stats


async def test_changes_after_the_mirror_closed_ends_at_once(redis_url: str) -> None:
    """A stream asked of a closed mirror ends instead of waiting for changes that never
    come (review finding: it waited forever)."""
    async with Mirror(redis_url) as mirror:
        pass
    got: list[Change] = []
    with anyio.fail_after(5):
        async for change in mirror.changes():
            got.append(change)
    assert got == []
