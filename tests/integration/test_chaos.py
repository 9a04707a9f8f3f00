"""The chaos suite, short and seeded: every fault kind, zero invariant violations.

Replay a failure with ``SAGA_CHAOS_SEED=<seed> pytest tests/integration/test_chaos.py``
or ``python -m saga_events.testing.chaos --seed <seed>``; soak with ``--soak MINUTES``.
"""

from __future__ import annotations

import contextlib
import os

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from saga_events import Agent, Mirror, Registrar, Removed, testing
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.testing import eventually
from saga_events.testing.chaos import FAULTS, ChaosConfig, run_chaos

pytestmark = pytest.mark.anyio

SEED = int(os.environ.get("SAGA_CHAOS_SEED", "20261127"))
DURATION = float(os.environ.get("SAGA_CHAOS_SECONDS", "60"))


@pytest.mark.timeout(DURATION + 90)
async def test_registry_stays_right_under_seeded_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """Redis killed and paused, connections cut, registrars killed and paused, flags reset
    and flipped, a slow mirror cut off, agents crashed and clock-jumped, workers recycled,
    CPU hogs at each fault and a hostile publisher beside them; REST clients, worker
    processes and pick() threads among the clients: after each fault heals, every mirror
    equals Redis and Redis equals the live clients; pick() never fails meanwhile."""
    config = ChaosConfig(seed=SEED, duration=DURATION)
    assert config.http_clients and config.workers and config.pick_threads and config.cpu_hogs
    assert config.hostile  # every client kind is on in CI
    report = await run_chaos(config)
    with capsys.disabled():
        print("\n" + report.summary())  # noqa: T201 - the note CI keeps: faults per kind
    assert report.ok, report.summary()
    assert set(report.injected) == set(FAULTS), f"not every fault kind ran: {report.injected}"
    assert set(report.convergence) == set(FAULTS)
    did = report.clients
    assert did["http register"] and did["http heartbeat"] and did["thread picks"], did
    assert did["cpu hogs started"] and did["hostile json bomb (list)"], did
    assert did["operator drains"], did  # the drain invariant (never picked, never lost) ran
    assert testing.run_chaos is run_chaos  # reusable from saga_events.testing


async def test_paused_redis_does_not_reap_live_instances(redis_server: RedisServer) -> None:
    """A Redis paused longer than the TTL comes back with its live instances kept (the
    reaper grants grace after a stall), and a crash is still detected afterwards."""
    url = redis_server.url
    async with (
        Registrar(url, rebuild_wait=0.2) as registrar,
        Mirror(url) as mirror,
        anyio.create_task_group() as tg,
    ):
        agent = Agent(url, "pay", "http://10.0.0.1:80", service_id="p-1", ttl=1.5)
        scope = anyio.CancelScope()

        async def run_agent(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await agent.run(task_status=task_status)

        await tg.start(run_agent)
        await mirror.wait_for("pay", 5)
        removed: list[Removed] = []

        async def watch() -> None:
            async with contextlib.aclosing(mirror.changes()) as changes:
                async for change in changes:
                    if isinstance(change, Removed):
                        removed.append(change)

        tg.start_soon(watch)
        redis_server.pause()
        await anyio.sleep(3.0)  # twice the TTL: every deadline passes meanwhile
        redis_server.resume()
        # Heartbeats flow again: several deadlines later, nothing was reaped.
        await eventually(lambda: not mirror.stale, 10, what="mirror fresh")
        seen = registrar.stats.applied["refreshed"]
        await eventually(lambda: registrar.stats.applied["refreshed"] >= seen + 4, 10)
        assert removed == [] and registrar.stats.reaped == 0
        assert mirror.pick("pay").service_id == "p-1"
        scope.cancel()  # now a crash: no leave
        await agent.aclose()
        await eventually(lambda: bool(removed), 20, what="crashed instance reaped")
        assert registrar.stats.reaped == 1
        tg.cancel_scope.cancel()


async def test_rebuild_survives_a_failed_reannounce_request(redis_url: str) -> None:
    """A rebuild whose first request to re-announce hits a broken connection asks again:
    agents still hear it, and the epoch turns ready without the abandoned-rebuild timeout."""
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(Keys("default").control)
    registrar = Registrar(redis_url)  # production rebuild_wait (2.5 s; abandoned after 10 s)
    real_publish = registrar._redis.publish
    failures = [RedisConnectionError("injected: connection reset")]

    async def flaky_publish(channel: str, message: bytes) -> int:
        if failures:
            raise failures.pop()
        return await real_publish(channel, message)

    registrar._redis.publish = flaky_publish  # type: ignore[method-assign]
    try:
        async with registrar:
            with anyio.fail_after(8):  # < 10 s: the abandoned-rebuild path is too late
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if msg is not None and msg["data"] == b"reannounce":
                        break
            await eventually(lambda: _epoch_ready(listener), 8, what="epoch ready")
            assert failures == []
    finally:
        await pubsub.aclose()
        await listener.aclose()


async def _epoch_ready(client: aioredis.Redis) -> bool:
    epoch = await client.get(Keys("default").epoch)
    return epoch is not None and epoch.endswith(b":ready")
