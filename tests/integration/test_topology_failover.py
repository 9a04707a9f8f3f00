"""Whole parts through repeated Sentinel failovers (issue 11): nothing is lost on the way.

Registrar, mirrors (on the master and on a replica) and agents on one Sentinel URL; the
master is killed (kill -9) and brought back as a replica, more than once in a row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded_topology import SentinelGroup, client
from saga_events.mirror import Removed
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio

FLAGS = "Kg$xe"


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as g:
        yield g


def _flags_everywhere(group: SentinelGroup) -> None:
    for node in group.nodes:
        if node.process is not None:
            with client(node) as c:
                c.config_set("notify-keyspace-events", FLAGS)


@pytest.mark.timeout(240)
async def test_a_registration_after_each_of_two_failovers_reaches_every_mirror(
    group: SentinelGroup,
) -> None:
    """Two failovers in a row; right after each kill a new agent registers (its one
    announcement is all it sends within the test: ttl 120 s) and must reach every mirror.
    Before the fix the registrar's apply connection still pointed at the killed master:
    the first batch after the failover failed on that dead socket and was dropped, while
    the agent had been told that a registrar received it. No other agent runs across a
    kill, so the new agent's announcement is that first batch."""
    # A replica-reading mirror needs the flags on the replica (the registrar sets them on
    # the master only, and the restarted node comes back without them).
    _flags_everywhere(group)
    url = group.url
    async with (
        Registrar(url, rebuild_wait=0.2, own_view=False),
        Mirror(url) as on_master,
        Mirror(f"{url}?read_from=replica") as on_replica,
    ):
        mirrors = (on_master, on_replica)
        for round_ in (0, 1, 2):
            if round_:
                old = await anyio.to_thread.run_sync(group.kill_master)
            async with Agent(url, "svc", f"http://10.0.1.{round_}:80",
                             service_id=f"a{round_}", ttl=120):  # fmt: skip
                for mirror in mirrors:
                    await mirror.wait_until(
                        lambda m, sid=f"a{round_}": (
                            sid in {i.service_id for i in m.instances("svc")}
                        ),
                        timeout=25,  # < the heartbeat interval (40 s): no retry heals it
                    )
            if round_:
                await anyio.to_thread.run_sync(old.start)
                await anyio.to_thread.run_sync(group.wait_settled)
                _flags_everywhere(group)


@pytest.mark.timeout(180)
async def test_sessions_leave_a_master_demoted_under_them(group: SentinelGroup) -> None:
    """A graceful failover (SENTINEL FAILOVER: the old master stays up and becomes a
    replica): the registrar's intake and the mirror's watcher were subscribed on the old
    master; they must move to the promoted one, so that a registration made after it
    reaches the mirror (PUBLISH on the new master counts only its own subscribers)."""
    _flags_everywhere(group)
    url = group.url
    async with (
        Registrar(url, rebuild_wait=0.2, own_view=False),
        Mirror(url) as mirror,
    ):
        async with Agent(url, "svc", "http://10.0.2.0:80", service_id="g0", ttl=120):
            await mirror.wait_until(lambda m: bool(m.instances("svc")), timeout=25)
        old = group.master()
        with client(group.sentinels[0]) as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
        await anyio.to_thread.run_sync(group.wait_promoted, old)
        await anyio.to_thread.run_sync(group.wait_settled)
        _flags_everywhere(group)
        async with Agent(url, "svc", "http://10.0.2.1:80", service_id="g1", ttl=120):
            await mirror.wait_until(
                lambda m: "g1" in {i.service_id for i in m.instances("svc")}, timeout=25
            )


@pytest.mark.timeout(180)
async def test_a_failover_longer_than_the_ttl_drops_no_live_instance(
    group: SentinelGroup,
) -> None:
    """Agents with a 1.5 s ttl (heartbeats every 0.5 s) through a kill -9 of the master
    whose failover takes longer than that ttl: once every agent's heartbeats land on the
    promoted node again, no mirror has seen a single Removed."""
    _flags_everywhere(group)
    url = group.url
    removed: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(Registrar(url, rebuild_wait=0.2, own_view=False))
        mirrors = [
            await stack.enter_async_context(Mirror(u)) for u in (url, f"{url}?read_from=replica")
        ]
        agents = [
            await stack.enter_async_context(
                Agent(url, "live", f"http://10.0.3.{i}:80", service_id=f"l{i}", ttl=1.5)
            )
            for i in range(6)
        ]
        for mirror in mirrors:
            await mirror.wait_until(lambda m: len(m.instances("live")) == 6, timeout=25)
        async with anyio.create_task_group() as tg:
            for mirror in mirrors:
                tg.start_soon(_collect_removed, mirror, removed)
            old = await anyio.to_thread.run_sync(group.kill_master)
            before = [a.announcements for a in agents]
            await anyio.to_thread.run_sync(group.wait_promoted, old)
            # Heartbeats land again: two announcements received after the promotion.
            after = [a.announcements for a in agents]
            await eventually(
                lambda: all(a.announcements >= n + 2 for a, n in zip(agents, after, strict=True)),
                30, what="every agent heartbeating on the promoted node",
            )  # fmt: skip
            assert all(n >= b for n, b in zip(after, before, strict=True))
            for mirror in mirrors:
                await mirror.wait_until(lambda m: not m.stale, timeout=30)
            tg.cancel_scope.cancel()
        assert removed == [], removed
        for mirror in mirrors:
            assert len(mirror.instances("live")) == 6


async def _collect_removed(mirror: Mirror, removed: list[str]) -> None:
    async with mirror.changes() as changes:
        async for change in changes:
            if isinstance(change, Removed):
                removed.append(change.instance.service_id)
