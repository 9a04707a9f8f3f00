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
from redis.exceptions import ConnectionError as RedisConnectionError

from saga_events import Agent, Mirror, Registrar, connection, scripts
from saga_events._redis import connect
from saga_events._topology_pool import topology_of
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import SentinelGroup, client, info
from saga_events.keys import Keys
from saga_events.mirror import Removed
from saga_events.notify import flags_cover
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio

FLAGS = "KEg$xe"
TTLS = (1.5, 2.0, 2.5, 2.5, 3.0, 3.0, 3.5, 3.5, 4.0, 4.0, 5.0, 6.0)


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
    """Agents with ttls from 1.5 to 5 s (heartbeats every ttl/3) through a kill -9 of the
    master, whose failover (down-after 1 s, election, the parts' reconnects) outlasts
    some of them and ends within the ttl of others: once every agent's heartbeats land on
    the promoted node again, no mirror has seen a single Removed. Before the fix, the
    instances whose deadline fell between the reaper's first run on the promoted node
    and the intake's resubscription there were reaped (their heartbeats could not land)."""
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
                Agent(url, "live", f"http://10.0.3.{i}:80", service_id=f"l{i}", ttl=ttl)
            )
            for i, ttl in enumerate(TTLS)
        ]
        for mirror in mirrors:
            await mirror.wait_until(lambda m: len(m.instances("live")) == len(TTLS), timeout=25)
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
            assert len(mirror.instances("live")) == len(TTLS)


async def _collect_removed(mirror: Mirror, removed: list[str]) -> None:
    async with mirror.changes() as changes:
        async for change in changes:
            if isinstance(change, Removed):
                removed.append(change.instance.service_id)


async def test_a_stall_grants_grace_to_instances_due_within_it(redis_url: str) -> None:
    """The reaper's stall rule on its own (one node): after a gap since the last reap (a
    failover: the intake was down, heartbeats could not land), an instance due in 0.5 s,
    not yet overdue, gets the grace too; before the fix only the overdue ones did, and
    this one was reaped half a second later although its agent was alive."""
    k = Keys("default")
    redis = connect(redis_url)
    try:
        runner = scripts.Scripts(redis)
        sec, usec = await redis.time()
        now = sec * 1000 + usec // 1000
        soon, overdue = k.inst("svc", "soon"), k.inst("svc", "overdue")
        await redis.zadd(k.deadlines, {soon: now + 500, overdue: now - 100})
        await redis.set(scripts.reaper_mark_key(k), now - 5_000)  # the last reap: 5 s ago
        keys, args = scripts.reap_call(k, 1000, 1_000, 10_000, 600_000)
        assert await runner.call(scripts.REAP, keys, args) == []
        for key in (soon, overdue):
            score = await redis.zscore(k.deadlines, key)
            assert score is not None and score >= now + 10_000, (key, score, now)
    finally:
        await redis.aclose()


def _flags_of(node: RedisServer) -> str:
    with client(node) as c:
        return str(c.config_get("notify-keyspace-events")["notify-keyspace-events"])


@pytest.mark.timeout(180)
async def test_the_registrar_sets_the_flags_on_every_node(group: SentinelGroup) -> None:
    """CONFIG is not replicated: the registrar sets the notification flags on the master
    and on every replica at start, on the promoted node as soon as it follows a failover,
    and on the old master once it is back as a replica (it comes back without them)."""
    for node in group.nodes:
        with client(node) as c:
            c.config_set("notify-keyspace-events", "")
    url = group.url
    async with Registrar(url, rebuild_wait=0.2, own_view=False, config_check_interval=0.5):
        for node in group.nodes:
            await eventually(lambda n=node: flags_cover(_flags_of(n)), 20,
                             what=f"flags on {node.port}")  # fmt: skip
        old = await anyio.to_thread.run_sync(group.kill_master)
        new = await anyio.to_thread.run_sync(group.wait_promoted, old)
        await eventually(lambda: flags_cover(_flags_of(new)), 30, what="flags on the promoted")
        await anyio.to_thread.run_sync(old.start)
        assert not flags_cover(_flags_of(old))
        await anyio.to_thread.run_sync(group.wait_settled)
        for node in group.nodes:
            await eventually(lambda n=node: flags_cover(_flags_of(n)), 30,
                             what=f"flags on {node.port} after the failover")  # fmt: skip


async def test_a_subscription_refuses_a_node_that_is_no_longer_the_master(
    group: SentinelGroup,
) -> None:
    """A session resolved to a node that is a replica now (a stale cached answer: the
    node was demoted after it was resolved) does not stay subscribed there, where
    PUBLISH to the master never reaches it: subscribing fails with a ConnectionError that
    says so, after a refresh, and the next attempt lands on the master."""
    redis = connect(group.url)
    try:
        topology = topology_of(redis)
        assert topology is not None
        # Settled, and a node that answers ROLE slave now (a loaded machine may have
        # failed over at start: the old master answers master until it is demoted).
        await anyio.to_thread.run_sync(group.wait_settled)
        master = await topology.address()
        replica = next(
            n for n in group.nodes
            if n.port != master[1] and info(n, "replication")["role"] == "slave"
        )  # fmt: skip
        topology._cache[("", "master")] = (replica.host, replica.port)  # the stale answer
        generation = topology.generation
        with pytest.raises(RedisConnectionError, match="not the master"):
            async with connection.subscribe(redis, channels=("c",)):
                pass
        assert topology.generation > generation
        async with connection.subscribe(redis, channels=("c",)) as sub:
            assert sub.pubsub.connection is not None
            assert sub.pubsub.connection.port == master[1]
            assert await redis.publish("c", b"x") == 1
    finally:
        await redis.aclose()
