"""Outages: Redis restarted empty, registrar killed and restarted."""

from __future__ import annotations

import signal

import anyio
import pytest

from saga_events import Agent, Mirror, Registrar, Removed
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.registrar import REAP_GRACE_MS
from saga_events.testing import eventually, registry_truth, wait_mirror_matches
from tests.helpers import read_line_until, registrar_process

pytestmark = pytest.mark.anyio
K = Keys()


async def test_mirrors_survive_redis_restarted_empty(redis_server: RedisServer) -> None:
    """kill -9 Redis and start it empty on the same port: mirrors keep answering from
    their last view and report stale; agents re-announce, the registrar rebuilds, and
    every mirror ends equal to the live agents without ever reporting a removal."""
    url = redis_server.url
    names = [("alpha", "a1"), ("alpha", "a2"), ("beta", "b1")]
    expected = {K.inst(n, i) for n, i in names}
    removals: list[Removed] = []
    stop = anyio.Event()

    async def run_agent(name: str, sid: str) -> None:
        async with Agent(url, name, f"http://10.1.0.{len(sid)}:80", service_id=sid, ttl=30):
            await stop.wait()

    async def watch_removals(mirror: Mirror) -> None:
        async with mirror.changes() as stream:
            async for change in stream:
                if isinstance(change, Removed):
                    removals.append(change)

    async with (
        Registrar(url) as registrar,
        Mirror(url) as m1,
        Mirror(url) as m2,
        anyio.create_task_group() as tg,
    ):
        for name, sid in names:
            tg.start_soon(run_agent, name, sid)
        for m in (m1, m2):
            await wait_mirror_matches(m, url, expected=expected)
            tg.start_soon(watch_removals, m)
        await m1.wait_until(lambda m: m.epoch is not None and m.epoch.endswith(":ready"), 5)

        redis_server.kill()
        await m1.wait_until(lambda m: m.stale, 5)
        await m2.wait_until(lambda m: m.stale, 5)
        # During the outage the last view is served as it was.
        assert {m1.pick("alpha").service_id for _ in range(2)} == {"a1", "a2"}
        assert m2.pick("beta").service_id == "b1"

        redis_server.start()
        for m in (m1, m2):
            await m.wait_until(lambda m: not m.stale, 15)
            await wait_mirror_matches(m, url, expected=expected, timeout=10)
        assert registrar.stats.rebuilds == 2  # first start, then the empty restart
        assert removals == []
        stop.set()  # the agents leave: now, and only now, removals are reported
        await eventually(lambda: len(removals) == 2 * len(names), 5)
        tg.cancel_scope.cancel()


async def test_registrar_killed_and_restarted_loses_nothing(redis_server: RedisServer) -> None:
    """Kill -9 the registrar: registrations published meanwhile are healed by the next
    heartbeats, and a leave published meanwhile is healed by the reaper after a restart."""
    url = redis_server.url
    ttl = 3.0
    async with Mirror(url) as mirror, anyio.create_task_group() as tg:
        with registrar_process(url) as first:
            await read_line_until(first, "registrar:")
            stays_stop, leaver_stop = anyio.Event(), anyio.Event()

            async def run(name: str, stop: anyio.Event) -> None:
                async with Agent(url, name, "http://10.2.0.1:80", service_id="x", ttl=ttl):
                    await stop.wait()

            tg.start_soon(run, "stays", stays_stop)
            tg.start_soon(run, "leaver", leaver_stop)
            await wait_mirror_matches(
                mirror, url, expected={K.inst("stays", "x"), K.inst("leaver", "x")}
            )
            first.send_signal(signal.SIGKILL)
            first.wait(5)

        # While no registrar runs: one agent leaves (lost), one arrives (not yet applied).
        leaver_stop.set()
        late = Agent(url, "late", "http://10.2.0.2:80", service_id="y", ttl=ttl)
        async with late:
            assert late.registered is False
            assert {k for k in await registry_truth(url)} == {
                K.inst("stays", "x"),
                K.inst("leaver", "x"),
            }
            with registrar_process(url) as second:
                await read_line_until(second, "registrar:")
                # The leaver is reaped one ttl after its last heartbeat, or, when the
                # restart came more than REAP_STALL_MS after the last reap (a loaded
                # machine starts a process slower than that), after the grace every
                # overdue instance gets when no registrar ran: heartbeats sent
                # meanwhile were lost. So the bound is ttl + grace, not ttl.
                await wait_mirror_matches(
                    mirror,
                    url,
                    expected={K.inst("stays", "x"), K.inst("late", "y")},
                    timeout=ttl + REAP_GRACE_MS / 1000 + 3,
                )
                await eventually(lambda: late.registered, 5)
                second.send_signal(signal.SIGTERM)
                second.wait(10)
                assert second.returncode == 0
        stays_stop.set()
        tg.cancel_scope.cancel()
