"""``doctor`` on topology URLs: one finding per node it discovers, flags checked per node."""

from __future__ import annotations

import pytest

from saga_events.doctor import Finding, diagnose, healthy
from saga_events.embedded_topology import EmbeddedCluster, SentinelGroup, client
from saga_events.topology import slot_of

pytestmark = pytest.mark.anyio


def nodes(findings: list[Finding], prefix: str) -> dict[str, Finding]:
    return {f.check: f for f in findings if f.check.startswith(prefix)}


async def test_doctor_checks_every_sentinel_and_data_node() -> None:
    """Three Sentinels, the master and both replicas each get a finding; a replica without
    the notification flags is named with the fix, and is ok once they are set on it."""
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as group:
        master = group.master()
        with client(master) as c:
            c.config_set("notify-keyspace-events", "KEg$xe")
        findings = await diagnose(group.url, canary_wait=0.2)
        sentinels = nodes(findings, "sentinel ")
        assert len(sentinels) == 3 and all(f.status == "ok" for f in sentinels.values())
        data = nodes(findings, "node ")
        assert data[f"node {master.host}:{master.port} (master)"].status == "ok", data
        replicas = [f for name, f in data.items() if name.endswith("(replica)")]
        assert len(replicas) == 2
        assert all(f.status == "warn" and "lacks" in f.detail for f in replicas), replicas
        assert all("CONFIG SET notify-keyspace-events" in f.fix for f in replicas)
        for node in group.nodes[1:]:
            with client(node) as c:
                c.config_set("notify-keyspace-events", "KEg$xe")
        data = nodes(await diagnose(group.url, canary_wait=0.2), "node ")
        assert [f.status for f in data.values()] == ["ok"] * 3, data


async def test_doctor_names_a_dead_node_and_fails() -> None:
    """A killed replica the Sentinels still list is a failed finding of its own."""
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as group:
        for node in group.nodes:
            with client(node) as c:
                c.config_set("notify-keyspace-events", "KEg$xe")
        victim = group.nodes[2] if group.master() is not group.nodes[2] else group.nodes[1]
        victim.kill()
        findings = await diagnose(group.url, canary_wait=0.2)
        dead = nodes(findings, f"node {victim.host}:{victim.port}")
        assert [f.status for f in dead.values()] == ["fail"], findings
        assert "unreachable" in next(iter(dead.values())).detail
        assert not healthy(findings)


async def test_doctor_checks_the_registry_slot_owner_and_its_replica() -> None:
    """On a Cluster: a finding for the registry's slot, its owner and the owner's replica."""
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        owner = cluster.owner(slot_of("default"))
        for node in [owner, *cluster.replicas_of(owner)]:
            with client(node) as c:
                c.config_set("notify-keyspace-events", "KEg$xe")
        findings = await diagnose(cluster.url, canary_wait=0.2)
        data = nodes(findings, "node ")
        assert data[f"node {owner.host}:{owner.port} (master)"].status == "ok", findings
        assert [f.status for n, f in data.items() if n.endswith("(replica)")] == ["ok"], data
        assert nodes(findings, "cluster slot ")
