"""A migration of the registry's slot, held half-done, on a real Redis Cluster.

While the slot is MIGRATING its keys are on two nodes: the owner answers ASK (or
TRYAGAIN) for a moved key, but the owner's replica knows nothing of the migration: it
replays the DEL that MIGRATE makes on the owner and answers nil. A mirror must keep its
last view through that (stale, never empty or partial), whichever node it reads from, and
list the registry once the migration ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import EmbeddedCluster
from saga_events.testing import eventually
from saga_events.topology import slot_of
from saga_events.view import Removed

pytestmark = pytest.mark.anyio
NS = "default"
SLOT = slot_of(NS)
SERVICES = ("alpha", "beta", "gamma")


def tries(mirror: Mirror) -> int:
    """Sessions the mirror saw end (refused by Redis, or a connection error)."""
    return mirror.stats.reconnects + mirror.stats.refusals


def other_primary(cluster: EmbeddedCluster) -> RedisServer:
    return next(n for n in cluster.nodes[:3] if n is not cluster.owner(SLOT))


@pytest.fixture
async def agents(cluster: EmbeddedCluster) -> AsyncIterator[list[Agent]]:
    """A registrar and one agent per service (ttl 30 s: no reap during the test)."""
    url = cluster.url
    async with Registrar(url, rebuild_wait=0.2):
        group = [
            Agent(url, name, f"http://10.0.0.{i}:80", service_id=f"{name}-1", ttl=30)
            for i, name in enumerate(SERVICES)
        ]
        async with group[0], group[1], group[2]:
            yield group


async def test_mirrors_keep_their_view_through_a_half_done_migration(
    cluster: EmbeddedCluster, agents: list[Agent]
) -> None:
    """Mirrors on the owner and on its replica hold three instances; the slot goes
    MIGRATING and every key moves (the replica replays the DELs, with no change-feed
    message). While it stays half-done, each mirror retries again and again: none removes
    an instance; after the migration ends both list the registry from the new owner,
    a registration made then included."""
    url = cluster.url
    removed: list[str] = []

    async def watch(mirror: Mirror) -> None:
        async with mirror.changes() as stream:
            async for change in stream:
                if isinstance(change, Removed):
                    removed.append(str(change))

    async with (
        Mirror(url) as on_owner,
        Mirror(url, read_from="replica") as on_replica,
        anyio.create_task_group() as tg,
    ):
        mirrors = (on_owner, on_replica)
        for m in mirrors:
            await m.wait_until(lambda v: all(v.instances(s) for s in SERVICES), timeout=30)
            # Current, not waiting for a registrar's rebuild (a mirror waiting for the epoch
            # reads nothing else, so it would not retry during the migration).
            await eventually(lambda m=m: not m.stale, 30, what="mirror current")
            tg.start_soon(watch, m)
        before = [tries(m) for m in mirrors]
        target = other_primary(cluster)
        await anyio.to_thread.run_sync(cluster.begin_migration, SLOT, target)

        def retried_or_dropped() -> bool:
            retried = all(tries(m) >= b + 2 for m, b in zip(mirrors, before, strict=True))
            return bool(removed) or retried

        await eventually(retried_or_dropped, 30, interval=0.05,
                         what="both mirrors retried twice during the migration")  # fmt: skip
        assert not removed, removed
        for m in mirrors:
            assert m.stale
            assert all(m.instances(s) for s in SERVICES), m.snapshot()

        await anyio.to_thread.run_sync(cluster.finish_migration, SLOT, target)
        async with Agent(url, "delta", "http://10.0.0.9:80", service_id="delta-1", ttl=30):
            for m in mirrors:
                await m.wait_until(
                    lambda v: all(v.instances(s) for s in (*SERVICES, "delta")), timeout=30
                )
                await eventually(lambda m=m: not m.stale, 30, what="mirror current")
            assert not removed, removed
        tg.cancel_scope.cancel()


async def test_a_mirror_started_during_a_migration_lists_nothing_partial(
    cluster: EmbeddedCluster, agents: list[Agent]
) -> None:
    """A mirror on the owner's replica starts while the slot is MIGRATING with every key
    moved (its replica answers nil for all of them): it does not report a synced view
    (an empty one) while the migration lasts, and lists all three instances after."""
    url = cluster.url
    async with Mirror(url) as first:
        await first.wait_until(lambda v: all(v.instances(s) for s in SERVICES), timeout=30)
        await eventually(lambda: not first.stale, 30, what="registry current")
    target = other_primary(cluster)
    await anyio.to_thread.run_sync(cluster.begin_migration, SLOT, target)
    mirror = Mirror(url, read_from="replica")
    async with anyio.create_task_group() as tg:
        tg.start_soon(mirror.run)
        await eventually(lambda: tries(mirror) >= 2 or mirror.has_synced, 30, interval=0.05,
                         what="the mirror tried to list twice during the migration")  # fmt: skip
        assert not mirror.has_synced and len(mirror) == 0 and mirror.stale
        await anyio.to_thread.run_sync(cluster.finish_migration, SLOT, target)
        await mirror.wait_until(lambda v: all(v.instances(s) for s in SERVICES), timeout=30)
        assert len(mirror) == len(SERVICES)
        await eventually(lambda: not mirror.stale, 30, what="mirror current")
        tg.cancel_scope.cancel()
    await mirror.aclose()
