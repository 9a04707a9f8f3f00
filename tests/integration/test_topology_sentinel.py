"""Sentinel topology on real processes: resolve, fail over, follow (Topology and connect())."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events._redis import TRANSIENT, connect
from saga_events.embedded import free_port
from saga_events.embedded_topology import SentinelGroup, info
from saga_events.errors import TopologyUnavailable
from saga_events.testing import eventually
from saga_events.topology import Topology

pytestmark = pytest.mark.anyio


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """A master, 2 replicas, 3 Sentinels (down-after 1 s), stopped after the test."""
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as g:
        yield g


async def port_of(client: aioredis.Redis) -> int:
    return int((await client.info("server"))["tcp_port"])


async def first_write_after_failover(topology: Topology, value: str) -> aioredis.Redis:
    """What a session does after an error: refresh, resolve, write; retried until accepted."""

    async def write() -> aioredis.Redis | None:
        topology.refresh()
        try:
            master = await topology.master()
            await master.set("k", value)
        except (*TRANSIENT, TopologyUnavailable):
            return None
        return master

    result: aioredis.Redis = await eventually(write, 30, what="a write accepted after failover")
    return result


async def failover_once(group: SentinelGroup, topology: Topology, value: str) -> float:
    """kill -9 the master, then refresh until a write is accepted; return the seconds taken."""
    old = group.kill_master()
    killed = time.monotonic()
    master = await first_write_after_failover(topology, value)
    took = time.monotonic() - killed
    assert await port_of(master) != old.port
    assert (await master.role())[0] == b"master"
    return took


async def test_sentinel_url_writes_to_the_master(group: SentinelGroup) -> None:
    """master() is the node the Sentinels name; replica() a replica linked to it."""
    async with Topology(group.url) as topology:
        master = await topology.master()
        assert await master.set("k", "v")
        assert await port_of(master) == group.master().port
        replica = await topology.replica()
        role = await replica.role()
        assert role[0] == b"slave" and int(role[2]) == group.master().port
        assert await eventually(lambda: replica.get("k"), 10, what="replicated") == b"v"


async def test_refresh_follows_a_promoted_replica_after_kill_9(group: SentinelGroup) -> None:
    """kill -9 the master: after the promotion, refresh() + master() give the new master,
    a write succeeds there, and replica() follows the new master too."""
    async with Topology(group.url) as topology:
        before = await topology.master()
        await before.set("k", "before")
        await failover_once(group, topology, "after")
        new_master = group.wait_settled()
        assert await port_of(await topology.master()) == new_master.port

        async def linked_replica() -> aioredis.Redis | None:
            # Until the Sentinels see a replica linked to the new master (their INFO
            # refresh), replica() falls back to the master: readers keep working.
            topology.refresh()
            replica = await topology.replica()
            role = await replica.role()
            return replica if role[0] == b"slave" and int(role[2]) == new_master.port else None

        replica = await eventually(linked_replica, 30, what="a replica of the new master")
        assert await eventually(lambda: replica.get("k"), 10, what="replicated") == b"after"


async def test_connect_client_follows_failover_by_itself(group: SentinelGroup) -> None:
    """_redis.connect(sentinel URL): one client; after kill -9 of the master, the caller's
    retry loop (retrying connection errors only) lands on the new master."""
    client = connect(group.url)
    try:
        await client.set("k", "1")
        old = group.kill_master()

        async def write() -> bool:
            try:
                return bool(await client.set("k", "2"))
            except TRANSIENT:
                return False

        await eventually(write, 30, what="a write through the same client")
        assert await port_of(client) != old.port
    finally:
        await client.aclose()


async def test_connect_client_turns_readonly_into_a_reconnect(group: SentinelGroup) -> None:
    """A connection made to the cached address of a master that was since demoted gets
    READONLY: it becomes a ConnectionError (after a refresh) and the retry lands on the new
    master. (Redis closes the open connections of a demoted master; a new connection made
    from a stale cache, as after an idle disconnect, is the case READONLY catches.)"""
    client = connect(group.url)
    try:
        await client.set("k", "1")
        old = group.master()
        sentinel = aioredis.Redis(port=group.sentinels[0].port)
        async with sentinel:
            await sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        await anyio.to_thread.run_sync(group.wait_promoted, old)
        # Until the Sentinels reconfigure it, the old master still takes writes (they
        # are lost): that window is Redis's, so wait for the demotion to test READONLY.
        await eventually(lambda: info(old, "replication")["role"] == "slave", 30,
                         what="old master demoted")  # fmt: skip
        await client.connection_pool.disconnect()  # as an idle timeout would; no refresh
        errors: list[BaseException] = []

        async def write() -> bool:
            try:
                return bool(await client.set("k", "2"))
            except TRANSIENT as exc:
                errors.append(exc)
                return False

        await eventually(write, 30, what="a write after the graceful failover")
        assert await port_of(client) != old.port
        assert any("node changed" in str(e) for e in errors), errors  # READONLY -> retry
    finally:
        await client.aclose()


async def test_unresolvable_sentinel_urls_name_the_part() -> None:
    """No Sentinel answers → 'sentinels'; they answer but monitor no such master → its name."""
    dead = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster"
    async with Topology(dead) as topology:
        with pytest.raises(TopologyUnavailable) as info:
            await topology.master()
    assert info.value.part == "sentinels" and isinstance(info.value, ConnectionError)
    assert "\n" not in str(info.value)


async def test_unknown_master_name_is_named(group: SentinelGroup) -> None:
    """Sentinels that answer but do not monitor the name: the error names the master name."""
    url = group.url.replace("/mymaster", "/nosuchmaster")
    async with Topology(url) as topology:
        with pytest.raises(TopologyUnavailable) as info:
            await topology.master()
    assert info.value.part == "master name 'nosuchmaster'"
