"""End to end on a real redis-server: agent → registrar → Redis → mirror."""

from __future__ import annotations

import signal

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio as aioredis

from saga_events import (
    Added,
    Agent,
    Mirror,
    Registrar,
    Removed,
    ServiceNotFound,
    SyncAgent,
    SyncMirror,
    Updated,
)
from saga_events.keys import Keys
from saga_events.testing import eventually, registry_truth, wait_mirror_matches
from tests.helpers import agent_process, read_line_until

pytestmark = pytest.mark.anyio
K = Keys()


async def test_registered_instance_is_visible_in_mirror(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """A registration reaches a running mirror well under a second, and leave removes it."""
    async with Agent(redis_url, "payment", "http://10.0.0.5:8002", capabilities=["rest"]) as agent:
        assert agent.registered
        with anyio.fail_after(1):
            inst = await mirror.wait_for("payment")
        assert inst.service_url == "http://10.0.0.5:8002"
        assert inst.capabilities == ("rest",)
        assert mirror.pick("payment").service_id == agent.service_id
        await wait_mirror_matches(mirror, redis_url, expected={K.inst("payment", agent.service_id)})
    await mirror.wait_until(lambda m: not m.instances("payment"), 1)
    with pytest.raises(ServiceNotFound):
        mirror.pick("payment")
    await wait_mirror_matches(mirror, redis_url, expected=set())


async def test_changes_stream_reports_added_updated_removed(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """changes() yields Added, then Updated on a record change, then Removed on leave."""
    seen: list[object] = []

    stream = mirror.changes()  # subscribed from here on

    async def consume() -> None:
        async with stream:
            async for change in stream:
                seen.append(change)
                if isinstance(change, Removed):
                    return

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            async with Agent(redis_url, "search", "http://10.0.0.9:9000", service_id="s1") as agent:
                await mirror.wait_for("search", 2)
                await agent.update(service_url="http://10.0.0.9:9001")
                await mirror.wait_until(
                    lambda m: m.pick("search").service_url == "http://10.0.0.9:9001", 2
                )
    kinds = [type(c) for c in seen]
    assert kinds == [Added, Updated, Removed]
    assert isinstance(seen[1], Updated)
    assert seen[1].previous.service_url == "http://10.0.0.9:9000"
    assert seen[1].instance.service_url == "http://10.0.0.9:9001"


async def test_pick_round_robins_and_skips_draining(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """pick() rotates over live instances, filters by capability and skips draining ones."""
    async with (
        Agent(redis_url, "auth", "http://10.0.0.1:80", service_id="a", capabilities=["rest"]),
        Agent(redis_url, "auth", "http://10.0.0.2:80", service_id="b", capabilities=["grpc"]) as b,
    ):
        await mirror.wait_until(lambda m: len(m.instances("auth")) == 2, 2)
        assert {mirror.pick("auth").service_id for _ in range(4)} == {"a", "b"}
        assert mirror.pick("auth", capability="grpc").service_id == "b"
        with pytest.raises(ServiceNotFound):
            mirror.pick("auth", capability="graphql")
        await b.drain()
        await mirror.wait_until(lambda m: m.instances("auth")[1].draining, 2)
        assert {mirror.pick("auth").service_id for _ in range(4)} == {"a"}
        assert len(mirror.instances("auth")) == 2
        await wait_mirror_matches(mirror, redis_url)


async def test_fallbacks_answer_when_no_instance(redis_url: str, registrar: Registrar) -> None:
    """A static fallback answers pick() for a name with no live instance."""
    async with Mirror(redis_url, fallbacks={"payment": "http://localhost:8002"}) as mirror:
        assert mirror.pick("payment").service_url == "http://localhost:8002"
        with pytest.raises(ServiceNotFound):
            mirror.pick("unknown")


async def test_crashed_agent_disappears_within_ttl_plus_one_second(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """An agent killed without leave is reaped and leaves every mirror within ttl + 1 s."""
    ttl = 2.0
    async with Mirror(redis_url) as second:
        with agent_process(redis_url, "worker", "http://10.0.0.7:80", "w1", ttl) as proc:
            await read_line_until(proc, "registered")
            await mirror.wait_for("worker", 2)
            await second.wait_for("worker", 2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            with anyio.fail_after(ttl + 1.0):
                await mirror.wait_until(lambda m: not m.instances("worker"))
                await second.wait_until(lambda m: not m.instances("worker"))
        assert registrar.stats.reaped == 1
        await wait_mirror_matches(mirror, redis_url, expected=set())
        await wait_mirror_matches(second, redis_url, expected=set())


async def test_heartbeats_of_unchanged_record_cost_mirrors_nothing(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """Heartbeats move the deadline only: the mirror gets no record message and sends no GET."""
    async with Agent(redis_url, "quiet", "http://10.0.0.3:80", service_id="q") as agent:
        await mirror.wait_for("quiet", 2)
        await wait_mirror_matches(mirror, redis_url)
        client = aioredis.Redis.from_url(redis_url)
        try:
            score_before = await client.zscore(K.deadlines, K.inst("quiet", "q"))
            gets, notes = mirror.stats.gets, mirror.stats.record_notifications
            refreshed = registrar.stats.applied["refreshed"]
            for _ in range(5):
                assert await agent.announce("heartbeat")
            await eventually(lambda: registrar.stats.applied["refreshed"] >= refreshed + 5, 2)
            # The canary proves the subscription still delivers while we look.
            canary = mirror.stats.canary_notifications
            await eventually(lambda: mirror.stats.canary_notifications > canary, 3)
            assert mirror.stats.gets == gets
            assert mirror.stats.record_notifications == notes
            score_after = await client.zscore(K.deadlines, K.inst("quiet", "q"))
            assert score_before is not None and score_after is not None
            assert score_after > score_before
        finally:
            await client.aclose()


async def test_agent_without_redis_does_not_fail_its_host() -> None:
    """With Redis unreachable, entering and leaving an Agent never raises."""
    from saga_events.embedded import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with anyio.fail_after(10):
        async with Agent(url, "lonely", "http://10.0.0.4:80", first_announce_timeout=3) as agent:
            assert agent.registered is False


async def test_agent_without_registrar_reports_unregistered_then_heals(redis_url: str) -> None:
    """PUBLISH reaching no registrar leaves registered False; a registrar arriving heals it."""
    async with Agent(redis_url, "early", "http://10.0.0.6:80", service_id="e", ttl=3) as agent:
        assert agent.registered is False
        async with Registrar(redis_url, rebuild_wait=0.2), Mirror(redis_url) as mirror:
            await mirror.wait_for("early", 5)
            assert agent.registered
            await wait_mirror_matches(mirror, redis_url, expected={K.inst("early", "e")})


def test_sync_twins_register_and_discover(redis_server: object) -> None:
    """SyncAgent and SyncMirror work from plain synchronous code."""
    from saga_events.embedded import RedisServer

    assert isinstance(redis_server, RedisServer)
    url = redis_server.url

    async def start_registrar(task_status: anyio.abc.TaskStatus[None]) -> None:
        registrar = Registrar(url, rebuild_wait=0.2)
        try:
            await registrar.run(task_status=task_status)
        finally:
            with anyio.CancelScope(shield=True):
                await registrar.aclose()

    from anyio.from_thread import start_blocking_portal

    with start_blocking_portal() as portal:
        future, _ = portal.start_task(start_registrar)
        try:
            with SyncMirror(url) as mirror, SyncAgent(url, "flaskapp", "http://10.0.0.8:80") as ag:
                assert ag.registered
                inst = mirror.wait_for("flaskapp", 5)
                assert inst.service_url == "http://10.0.0.8:80"
                assert mirror.pick("flaskapp").service_id == ag.agent.service_id
                assert not mirror.stale
        finally:
            future.cancel()


async def test_registry_truth_sees_records_the_mirror_sees(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """The truth helper reads records by SCAN; it agrees with the mirror after many changes."""
    stops = [anyio.Event() for _ in range(12)]
    keys = [K.inst(f"svc{i % 3}", f"i{i}") for i in range(12)]

    async def run_agent(i: int) -> None:
        async with Agent(redis_url, f"svc{i % 3}", f"http://10.0.1.{i}:80", service_id=f"i{i}"):
            await stops[i].wait()

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(run_agent, i)
        truth = await wait_mirror_matches(mirror, redis_url, expected=set(keys))
        assert len(truth) == 12
        for i in range(0, 12, 2):
            stops[i].set()
        await wait_mirror_matches(mirror, redis_url, expected=set(keys[1::2]))
        for i in range(1, 12, 2):
            stops[i].set()
    await wait_mirror_matches(mirror, redis_url, expected=set())
    assert await registry_truth(redis_url) == {}
