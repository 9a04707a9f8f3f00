"""A subscription leaves a node that no longer serves it, found by a periodic probe on a
connection the client already holds (no short-lived connection, no CLUSTER NODES).

Sentinel: a master demoted by REPLICAOF keeps its subscribers (Sentinel's own
reconfiguration kills them; a demotion by hand or by an operator's tooling does not),
and nothing a subscribed part sends makes the node refuse it. Cluster: a node whose slot
migrated away answers MOVED to the probe's EXISTS.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from saga_events import connection
from saga_events._redis import connect
from saga_events._topology_pool import PROBE_INTERVAL
from saga_events.embedded_topology import EmbeddedCluster, SentinelGroup, client
from saga_events.topology import Topology, slot_of

pytestmark = pytest.mark.anyio

#: the probe runs every PROBE_INTERVAL +- 20 %; the rest is slack for a loaded machine
BOUND = PROBE_INTERVAL * 1.2 + 20


def subscribers_of(node: Any) -> list[str]:
    """The pub/sub clients of ``node`` that are not Sentinels' own."""
    with client(node) as c:
        text = c.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return [line for line in text.splitlines() if line and "name=sentinel-" not in line]


async def read_until_it_leaves(sub: connection.Subscription) -> str:
    with anyio.fail_after(BOUND):
        while True:
            try:
                await sub.read(0.5, 100)
            except RedisConnectionError as exc:
                return str(exc)


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    # Sentinels slow to react (down-after 60 s): the demotion is the node's own doing.
    with SentinelGroup(replicas=1, sentinels=3, down_after_ms=60_000) as g:
        yield g


async def test_a_subscription_leaves_a_demoted_master(group: SentinelGroup) -> None:
    """The master becomes a replica (REPLICAOF) while a part is subscribed on it through
    the Sentinel URL: Redis keeps the subscription open, and before the probe nothing
    ever made it leave (checked by hand: still subscribed 15 s later). The session ends
    with a ConnectionError within the probe's bound and the old master has no subscriber
    of ours left."""
    master, replica = group.nodes[0], group.nodes[1]
    redis = connect(group.url)
    try:
        async with connection.subscribe(redis, channels=("probe-test",)) as sub:
            assert sub.pubsub.connection is not None
            assert sub.pubsub.connection.port == master.port
            assert subscribers_of(master)
            with client(replica) as c:
                c.execute_command("REPLICAOF", "NO", "ONE")
            with client(master) as c:
                c.execute_command("REPLICAOF", replica.host, replica.port)
            reason = await read_until_it_leaves(sub)
        assert "not the master" in reason, reason
        assert not subscribers_of(master)
    finally:
        await redis.aclose()


async def test_a_cluster_subscription_follows_a_migration_without_cluster_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription on the registry slot's owner; the slot migrates to another primary.
    The periodic check is the probe's EXISTS on the client's own connection (answered
    MOVED): no fresh CLUSTER NODES is asked until that MOVED (Topology.verify, the old
    periodic check, fails the test if called)."""

    async def no_verify(self: Topology, slot: int) -> bool:
        raise AssertionError("the periodic check asked CLUSTER NODES")

    monkeypatch.setattr(Topology, "verify", no_verify)
    ns = "default"
    with EmbeddedCluster(primaries=3, replicas=0) as cluster:
        slot = slot_of(ns)
        owner = cluster.owner(slot)
        target = next(n for n in cluster.nodes if n is not owner)
        redis = connect(cluster.url, namespace=ns)
        try:
            async with connection.subscribe(redis, channels=("probe-test",)) as sub:
                assert sub.pubsub.connection is not None
                assert sub.pubsub.connection.port == owner.port
                await anyio.to_thread.run_sync(cluster.migrate_slot, slot, target)
                reason = await read_until_it_leaves(sub)
            assert "no longer serves" in reason, reason
            async with connection.subscribe(redis, channels=("probe-test",)) as sub:
                assert sub.pubsub.connection is not None
                assert sub.pubsub.connection.port == target.port
        finally:
            await redis.aclose()
