"""Issue 11 on a real Redis Cluster: every promise holds through a primary kill and a slot
migration (leaves confirmed, registrations visible), and namespaces on different shards
work side by side."""

from __future__ import annotations

import anyio
import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded_topology import EmbeddedCluster, client
from saga_events.keys import Keys
from saga_events.testing import eventually
from saga_events.topology import slot_of

pytestmark = pytest.mark.anyio
NS = "default"


def away_from_default(cluster: EmbeddedCluster) -> str:
    home = cluster.owner(slot_of("default"))
    return next(f"team-{i}" for i in range(64) if cluster.owner(slot_of(f"team-{i}")) is not home)


async def leave_confirmed(agent: Agent) -> None:
    """Retry the leave (a registrar may be resubscribing) until one is confirmed (bounded)."""
    await eventually(agent.leave, 40, interval=0.1, what="leave confirmed")


async def test_leave_after_a_primary_kill_is_confirmed(cluster: EmbeddedCluster) -> None:
    """kill -9 of the registry slot's owner (its replica promoted), then the old primary
    back as a replica: a leave sent afterwards is confirmed by PUBLISH's receiver count and
    the instance goes from every mirror (one on the owner, one on a replica); a
    registration after the kill reaches both."""
    url = cluster.url
    async with (
        Registrar(url, rebuild_wait=0.2),
        Registrar(url, rebuild_wait=0.2),
        Mirror(url) as on_owner,
        Mirror(f"{url}?read_from=replica") as on_replica,
    ):
        mirrors = (on_owner, on_replica)
        agent = Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30)
        async with agent:
            for m in mirrors:
                await m.wait_until(lambda v: bool(v.instances("alpha")), timeout=30)
            assert agent.registered, agent.last_error
            owner = cluster.owner(slot_of(NS))
            owner.kill()
            async with Agent(url, "beta", "http://10.0.0.2:80", service_id="b1", ttl=30) as beta:
                for m in mirrors:
                    await m.wait_until(lambda v: bool(v.instances("beta")), timeout=60)
                await anyio.to_thread.run_sync(owner.start)  # back, then made a replica
                await anyio.to_thread.run_sync(cluster.wait_ok)
                await eventually(lambda: beta.registered, 30, what="beta's announce confirmed")
            await leave_confirmed(agent)
            for m in mirrors:
                await m.wait_until(lambda v: not v.instances("alpha"), timeout=30)


async def test_leave_after_a_graceful_failover_is_confirmed(cluster: EmbeddedCluster) -> None:
    """CLUSTER FAILOVER: the old primary lives on as a replica and still accepts PUBLISH and
    PSUBSCRIBE (it counts only its own subscribers), so nothing breaks a connection there.
    The registrar's subscription must move to the promoted node by itself (its MOVED writes
    refresh the topology, the subscription's check sees its node no longer serves the slot),
    an agent created after the failover is confirmed, and the earlier agent's leave too."""
    url = cluster.url
    async with Registrar(url, rebuild_wait=0.2), Mirror(url) as mirror:
        agent = Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30)
        async with agent:
            await mirror.wait_until(lambda v: bool(v.instances("alpha")), timeout=30)
            await anyio.to_thread.run_sync(cluster.failover, cluster.owner(slot_of(NS)))
            async with Agent(url, "beta", "http://10.0.0.2:80", service_id="b1", ttl=30) as beta:
                await eventually(lambda: beta.registered, 40, what="beta's announce confirmed")
                await mirror.wait_until(lambda v: bool(v.instances("beta")), timeout=30)
            await leave_confirmed(agent)
            await mirror.wait_until(lambda v: not v.instances("alpha"), timeout=30)


async def test_registration_after_a_slot_migration(cluster: EmbeddedCluster) -> None:
    """The registry's slot migrated to another primary while registrar, mirrors and an agent
    run: a registration made afterwards is confirmed and visible in both mirrors, and the
    earlier agent's leave is confirmed and seen."""
    url = cluster.url
    async with (
        Registrar(url, rebuild_wait=0.2),
        Mirror(url) as on_owner,
        Mirror(f"{url}?read_from=replica") as on_replica,
    ):
        mirrors = (on_owner, on_replica)
        agent = Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30)
        async with agent:
            for m in mirrors:
                await m.wait_until(lambda v: bool(v.instances("alpha")), timeout=30)
            slot = slot_of(NS)
            target = next(n for n in cluster.nodes[:3] if n is not cluster.owner(slot))
            await anyio.to_thread.run_sync(cluster.migrate_slot, slot, target)
            async with Agent(url, "beta", "http://10.0.0.2:80", service_id="b1", ttl=30) as beta:
                await eventually(lambda: beta.registered, 40, what="beta's announce confirmed")
                for m in mirrors:
                    await m.wait_until(lambda v: bool(v.instances("beta")), timeout=30)
            await leave_confirmed(agent)
            for m in mirrors:
                await m.wait_until(lambda v: not v.instances("alpha"), timeout=30)
            assert cluster.owner(slot) is target


async def test_namespaces_on_different_shards(cluster: EmbeddedCluster) -> None:
    """Two namespaces whose {ns} slots are on different primaries, each with its registrar,
    mirror and agent on the same Cluster URL: each registration is confirmed and seen in its
    own namespace only, and each leave is confirmed."""
    names = ["default", away_from_default(cluster)]
    assert cluster.owner(slot_of(names[0])) is not cluster.owner(slot_of(names[1]))
    url = cluster.url
    async with (
        Registrar(url, namespace=names[0], rebuild_wait=0.2),
        Registrar(url, namespace=names[1], rebuild_wait=0.2),
        Mirror(url, namespace=names[0]) as first,
        Mirror(f"{url}?read_from=replica", namespace=names[1]) as second,
    ):
        agents = [
            Agent(url, "alpha", f"http://10.0.0.{i}:80", service_id=f"a{i}", ttl=30, namespace=ns)
            for i, ns in enumerate(names)
        ]
        async with agents[0], agents[1]:
            for i, mirror in enumerate((first, second)):
                await mirror.wait_until(lambda v: bool(v.instances("alpha")), timeout=30)
                assert [x.service_id for x in mirror.instances("alpha")] == [f"a{i}"]
            for agent in agents:
                await eventually(lambda a=agent: a.registered, 30, what="announce confirmed")
                await leave_confirmed(agent)
            for mirror in (first, second):
                await mirror.wait_until(lambda v: not v.instances("alpha"), timeout=30)
        for ns in names:
            with client(cluster.owner(slot_of(ns))) as conn:
                assert conn.exists(Keys(ns).epoch), ns


async def test_the_registrar_sets_the_flags_on_the_owners_replicas(
    cluster: EmbeddedCluster,
) -> None:
    """CONFIG is not replicated: on a Cluster the registrar merges the notification flags
    into the registry slot owner's replicas too (a replica-reading mirror hears the canary
    and the epoch there), keeping the flags a replica already has. Failed before: only
    the owner got them."""
    owner = cluster.owner(slot_of(NS))
    (replica,) = cluster.replicas_of(owner)
    with client(replica) as conn:
        conn.config_set("notify-keyspace-events", "Kl")
    async with Registrar(cluster.url, rebuild_wait=0.2):

        def flags() -> str:
            with client(replica) as conn:
                return str(conn.config_get("notify-keyspace-events")["notify-keyspace-events"])

        await eventually(lambda: set("KEg$xel") <= set(flags()), 20, what="flags on the replica")
