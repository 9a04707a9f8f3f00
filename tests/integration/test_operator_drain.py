"""An operator's drain: an override the instance's heartbeats do not undo, through the
HTTP API and the CLI, on a real registrar and Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner

from saga_events import Agent, Mirror, Registrar, ServiceNotFound
from saga_events.cli import main
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.testing import eventually
from tests.gateway_helpers import serve_gateway

pytestmark = pytest.mark.anyio

KEYS = Keys("default")
REC = KEYS.inst("pay", "p1")


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def heartbeats_applied(r: aioredis.Redis, n: int) -> None:
    """Wait (bounded) until the registrar has applied ``n`` more heartbeats of p1:
    each moves its deadline."""
    seen = [await r.zscore(KEYS.deadlines, REC)]

    async def moved() -> float | None:
        now = await r.zscore(KEYS.deadlines, REC)
        return now if now is not None and now != seen[-1] else None

    for _ in range(n):
        seen.append(await eventually(moved, 10, what="a heartbeat applied"))


async def test_drain_survives_heartbeats_and_a_registrar_restart_then_undrain(
    redis_server: RedisServer, r: aioredis.Redis
) -> None:
    url = redis_server.url
    stop_first, first_done = anyio.Event(), anyio.Event()

    async def run_first(*, task_status: anyio.abc.TaskStatus[Registrar]) -> None:
        async with Registrar(url, rebuild_wait=0.1) as reg:
            task_status.started(reg)
            await stop_first.wait()
        first_done.set()

    async with anyio.create_task_group() as tg:
        first = await tg.start(run_first)
        async with (
            Agent(url, "pay", "http://p1:80", service_id="p1", ttl=1.5),
            Mirror(url) as mirror,
        ):
            await mirror.wait_for("pay", 10)
            async with serve_gateway(first, mirror, url) as s:
                resp = await s.client.post(
                    "/api/v1/services/pay/drain",
                    json={"by": "alice", "reason": "disk full"},
                )
                assert resp.status_code == 200, resp.text
                (info,) = resp.json()["instances"]
                assert info["draining"] and info["drained_by"] == "alice"
                assert info["drain_reason"] == "disk full" and "drained_until" not in info
                inst = mirror.instances("pay")[0]
                assert inst.draining and inst.override is not None and inst.override.by == "alice"
                with pytest.raises(ServiceNotFound):
                    mirror.pick("pay")
                await heartbeats_applied(r, 2)
                assert mirror.instances("pay")[0].draining  # the agent's heartbeats do not undo it
            # The registrar stops and another one starts: the override is in Redis.
            stop_first.set()
            await first_done.wait()
            async with (
                Registrar(url, rebuild_wait=0.1) as reg,
                serve_gateway(reg, mirror, url) as s,
            ):
                await heartbeats_applied(r, 2)
                inst = mirror.instances("pay")[0]
                assert inst.draining and inst.override is not None and inst.override.by == "alice"
                got = (await s.client.get("/api/v1/services/pay")).json()  # only a draining one
                assert got["drained_by"] == "alice" and got["drain_reason"] == "disk full"
                resp = await s.client.post("/api/v1/services/pay/undrain?service_id=p1")
                assert resp.status_code == 200, resp.text
                assert resp.json()["instances"][0]["draining"] is False
                assert mirror.pick("pay").service_id == "p1"
                assert not await r.exists(KEYS.override("pay", "p1"))
                await heartbeats_applied(r, 1)
                assert not mirror.instances("pay")[0].draining


async def test_duration_ends_the_drain_and_a_leave_drops_the_override(
    redis_server: RedisServer, r: aioredis.Redis
) -> None:
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1) as reg, Mirror(url) as mirror:
        async with serve_gateway(reg, mirror, url) as s:
            async with Agent(url, "pay", "http://p1:80", service_id="p1", ttl=1.5):
                await mirror.wait_for("pay", 10)
                resp = await s.client.post(
                    "/api/v1/services/pay/drain?duration=0.5",
                    headers={"X-Saga-By": "bob", "X-Saga-Reason": "deploy"},
                )
                assert resp.status_code == 200, resp.text
                assert resp.json()["instances"][0]["drained_until"] is not None
                assert mirror.instances("pay")[0].override.by == "bob"  # type: ignore[union-attr]
                await mirror.wait_until(
                    lambda m: bool(m.instances("pay")) and not m.instances("pay")[0].draining, 10
                )
                assert mirror.instances("pay")[0].override is None
                # drained again without a duration; the agent leaves: the override goes too
                resp = await s.client.post("/api/v1/services/pay/drain", json={"by": "carol"})
                assert resp.status_code == 200, resp.text
                assert await r.exists(KEYS.override("pay", "p1"))
            await mirror.wait_until(lambda m: not m.instances("pay"), 10)
            assert not await r.exists(KEYS.override("pay", "p1"))


async def test_bad_drains_are_refused_and_change_nothing(
    redis_server: RedisServer, r: aioredis.Redis
) -> None:
    url = redis_server.url
    async with Registrar(url, rebuild_wait=0.1) as reg, Mirror(url) as mirror:
        async with serve_gateway(reg, mirror, url, token="tok") as s:
            async with Agent(url, "pay", "http://p1:80", service_id="p1"):
                await mirror.wait_for("pay", 10)
                auth = {"Authorization": "Bearer tok"}
                cases = [
                    ("/api/v1/services/pay/drain", {}, None, 401),
                    ("/api/v1/services/pay/drain?duration=-1", auth, None, 400),
                    ("/api/v1/services/pay/drain", auth, b"{not json", 400),
                    ("/api/v1/services/pay/drain", auth, b'{"by": 3}', 400),
                    ("/api/v1/services/pay/drain?service_id=zz", auth, None, 404),
                    ("/api/v1/services/nope/drain", auth, None, 404),
                ]
                for path, headers, body, status in cases:
                    hdrs = dict(headers)
                    if body is not None:
                        hdrs["Content-Type"] = "application/json"
                    resp = await s.client.post(path, headers=hdrs, content=body)
                    assert resp.status_code == status, (path, resp.text)
                assert not await r.exists(KEYS.override("pay", "p1"))
                assert not mirror.instances("pay")[0].draining


async def test_cli_drain_ls_and_undrain(redis_server: RedisServer) -> None:
    url = redis_server.url
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    async with Registrar(url, rebuild_wait=0.1) as reg, Mirror(url) as mirror:
        async with serve_gateway(reg, mirror, url) as s:
            async with Agent(url, "pay", "http://p1:80", service_id="p1"):
                await mirror.wait_for("pay", 10)
                base = ["--saga-url", s.base_url]
                out = await anyio.to_thread.run_sync(
                    lambda: cli("drain", "pay", "p1", "--reason", "tls renew", "--by", "dan", *base)
                )
                assert "drained pay: 1 instance (p1)" in out
                table = await anyio.to_thread.run_sync(lambda: cli("ls", "--redis", url))
                assert "draining (by dan: tls renew)" in table
                rows = json.loads(
                    await anyio.to_thread.run_sync(lambda: cli("ls", "--redis", url, "--json"))
                )
                assert rows["pay"][0]["drained_by"] == "dan"
                out = await anyio.to_thread.run_sync(lambda: cli("undrain", "pay", *base))
                assert "undrained pay: 1 instance (p1)" in out
                assert not mirror.instances("pay")[0].draining


async def test_a_reaped_instance_drops_its_override(
    registrar: Registrar, mirror: Mirror, r: aioredis.Redis
) -> None:
    """An instance that dies without a leave is reaped, and its override with it."""
    from saga_events import model

    await registrar.apply(
        model.Register(
            service_name="pay",
            service_id="p9",
            incarnation=1,
            seq=1,
            service_url="http://p9:80",
            ttl_ms=1000,
        )
    )
    await mirror.wait_for("pay", 10)
    await r.set(KEYS.override("pay", "p9"), b'{"by":"x","reason":"","at_ms":0,"until_ms":null}')
    await mirror.wait_until(lambda m: not m.instances("pay"), 20)

    async def dropped() -> bool:
        return not await r.exists(KEYS.override("pay", "p9"))

    await eventually(dropped, 10, what="the override deleted with the reaped record")


async def test_a_timed_drain_ends_on_time_without_any_heartbeat(
    redis_server: RedisServer, r: aioredis.Redis
) -> None:
    """The end of ``--for`` shows in the record (so in ls, REST and pick) within a
    bounded wait while the agent sends no heartbeat at all (ttl 60 s: every 20 s)."""
    from saga_events.override_ends import ends_key

    url = redis_server.url
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    async with (
        Registrar(url, rebuild_wait=0.1, liveness_interval=0.2) as reg,
        Mirror(url) as mirror,
        serve_gateway(reg, mirror, url) as s,
        Agent(url, "pay", "http://p1:80", service_id="p1", ttl=60) as agent,
    ):
        await mirror.wait_for("pay", 10)
        resp = await s.client.post(
            "/api/v1/services/pay/drain?duration=0.5", json={"by": "erin", "reason": "deploy"}
        )
        assert resp.status_code == 200, resp.text
        assert await r.zscore(ends_key(KEYS), b'["pay","p1"]') is not None
        announced = agent.announcements
        with pytest.raises(ServiceNotFound):
            mirror.pick("pay")

        async def rest_serving() -> bool:
            got = await s.client.get("/api/v1/services/pay")
            return got.status_code == 200 and got.json()["draining"] is False

        await eventually(rest_serving, 10, what="the REST API shows the drain ended")
        assert mirror.pick("pay").service_id == "p1"
        assert mirror.instances("pay")[0].override is None
        rows = json.loads(
            await anyio.to_thread.run_sync(lambda: cli("ls", "--redis", url, "--json"))
        )
        assert rows["pay"][0]["draining"] is False and rows["pay"][0]["drained_by"] is None
        assert agent.announcements == announced  # no heartbeat did it
        assert await r.zcard(ends_key(KEYS)) == 0  # the schedule is emptied


async def test_a_drain_survives_an_empty_redis_restart(redis_server: RedisServer) -> None:
    """Redis restarts empty: the rebuild restores the override key from the registrar's
    last view with the records, so the instance comes back drained, not serving."""
    url = redis_server.url
    async with (
        Registrar(url, rebuild_wait=0.1, liveness_interval=0.2) as reg,
        Mirror(url) as mirror,
        serve_gateway(reg, mirror, url) as s,
        Agent(url, "pay", "http://p1:80", service_id="p1", ttl=1.5),
        Agent(url, "pay", "http://p2:80", service_id="p2", ttl=1.5),
    ):
        await mirror.wait_until(lambda m: len(m.instances("pay")) == 2, 10)
        resp = await s.client.post(
            "/api/v1/services/pay/drain?service_id=p1&duration=3600",
            json={"by": "alice", "reason": "disk full"},
        )
        assert resp.status_code == 200, resp.text

        async def in_registrars_view() -> bool:
            # The rebuild restores the registrar's own last view: it must have seen it.
            view = reg.view() if reg.view is not None else []
            return any(i.service_id == "p1" and i.override is not None for i in view)

        await eventually(in_registrars_view, 10, what="the drain in the registrar's view")
        await anyio.to_thread.run_sync(redis_server.kill)
        await anyio.to_thread.run_sync(redis_server.restart)
        await mirror.wait_until(lambda m: not m.stale and len(m.instances("pay")) == 2, 20)

        def drained_again(m: Mirror) -> bool:
            insts = {i.service_id: i for i in m.instances("pay")}
            p1 = insts.get("p1")
            return (
                not m.stale
                and p1 is not None
                and p1.override is not None
                and p1.override.by == "alice"
            )

        await mirror.wait_until(drained_again, 20)
        r = aioredis.Redis.from_url(url)
        try:
            assert 0 < await r.pttl(KEYS.override("pay", "p1")) <= 3_600_000
            await heartbeats_applied_of(r, "p1", 2)  # its own heartbeats keep the drain
        finally:
            await r.aclose()
        assert {mirror.pick("pay").service_id for _ in range(6)} == {"p2"}
        assert mirror.instances("pay")[0].override is not None


async def heartbeats_applied_of(r: aioredis.Redis, sid: str, n: int) -> None:
    rec = KEYS.inst("pay", sid)
    seen = [await r.zscore(KEYS.deadlines, rec)]

    async def moved() -> float | None:
        now = await r.zscore(KEYS.deadlines, rec)
        return now if now is not None and now != seen[-1] else None

    for _ in range(n):
        seen.append(await eventually(moved, 10, what="a heartbeat applied"))
