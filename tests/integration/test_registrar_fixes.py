"""The registrar's scripts and loops: issue 8 and 9 fixes, each on a real redis-server."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Mirror, Registrar, Removed, model, scripts
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio
K = Keys()
INC = 1_700_000_000_000_000


def reg(sid: str = "a", seq: int = 1, *, inc: int = INC, name: str = "svc", **kw: Any) -> Any:
    kw.setdefault("service_url", "http://10.9.0.1:80")
    return model.Register(service_name=name, service_id=sid, incarnation=inc, seq=seq, **kw)


def hb(sid: str = "a", seq: int = 2, *, inc: int = INC, name: str = "svc", **kw: Any) -> Any:
    kw.setdefault("service_url", "http://10.9.0.1:80")
    return model.Heartbeat(service_name=name, service_id=sid, incarnation=inc, seq=seq, **kw)


def leave(sid: str = "a", seq: int = 3, *, inc: int = INC, name: str = "svc") -> Any:
    return model.Leave(service_name=name, service_id=sid, incarnation=inc, seq=seq)


async def make_due(r: aioredis.Redis, *keys: str) -> None:
    for key in keys:
        await r.zadd(K.deadlines, {key: 1})


@pytest.fixture
async def quiet(redis_url: str) -> Any:
    """A registrar whose reaper does not run on its own (reaps are called by the test)."""
    async with Registrar(redis_url, reap_interval=3600, rebuild_wait=0.2, own_view=False) as r:
        yield r


@pytest.fixture
async def r(redis_url: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_reaped_instance_is_not_recreated_by_an_older_event(
    quiet: Registrar, r: aioredis.Redis
) -> None:
    assert (await quiet.apply(reg(seq=5))).status == "created"
    await make_due(r, K.inst("svc", "a"))
    assert await quiet.reap() == 1
    assert (await quiet.apply(hb(seq=4))).status == "stale"  # a late, older heartbeat
    assert (await quiet.apply(hb(seq=5))).status == "stale"  # a duplicate
    assert await r.get(K.inst("svc", "a")) is None
    # alive but late: its next heartbeat is newer and brings it back
    assert (await quiet.apply(hb(seq=6))).status == "created"


async def test_rev_counts_record_changes_only(quiet: Registrar, r: aioredis.Redis) -> None:
    async def rev() -> int:
        return int(await r.get(K.rev) or 0)

    await quiet.apply(reg(seq=1))
    assert await rev() == 1
    await quiet.apply(hb(seq=2))  # unchanged record
    assert await rev() == 1
    await quiet.apply(hb(seq=3, service_url="http://10.9.0.2:80"))
    assert await rev() == 2
    await quiet.apply(leave(seq=4))
    assert await rev() == 3
    await quiet.apply(reg("b", seq=1))
    await make_due(r, K.inst("svc", "b"))
    await quiet.reap()
    assert await rev() == 5
    inst = model.Instance(
        incarnation=INC, seq=1, registered_at_ms=1, service_name="svc", service_id="c",
        service_url="http://10.9.0.3:80",
    )  # fmt: skip
    assert await quiet.restore([inst]) == 1
    assert await quiet.restore([inst]) == 0
    assert await rev() == 6


async def test_backstop_is_long_and_unchanged_heartbeats_do_not_touch_it(
    quiet: Registrar, r: aioredis.Redis
) -> None:
    await quiet.apply(reg(seq=1, ttl_ms=60_000))
    key = K.inst("svc", "a")
    assert await r.pttl(key) > 3_600_000  # refreshed at most once an hour
    await r.pexpire(key, 3_700_000)  # as if an hour and a bit had passed
    await quiet.apply(hb(seq=2, ttl_ms=60_000))
    assert 3_600_000 < await r.pttl(key) <= 3_700_000  # more than half left: untouched
    await r.pexpire(key, 3_500_000)  # less than half of the 2 h backstop left
    # Checked on every 4th seq (one PTTL per 4 heartbeats): refreshed within 4.
    await quiet.apply(hb(seq=3, ttl_ms=60_000))
    assert await r.pttl(key) <= 3_500_000
    await quiet.apply(hb(seq=4, ttl_ms=60_000))
    assert await r.pttl(key) > 7_000_000  # refreshed, once: the next is an hour away


async def test_backstop_refreshed_by_a_duplicate_heartbeat(
    quiet: Registrar, r: aioredis.Redis
) -> None:
    # The HTTP gateway's heartbeats repeat the newest (incarnation, seq): such a
    # duplicate always checks the backstop, whatever its seq.
    await quiet.apply(reg(seq=1, ttl_ms=60_000))
    key = K.inst("svc", "a")
    await quiet.apply(hb(seq=5, ttl_ms=60_000))
    await r.pexpire(key, 3_500_000)
    assert (await quiet.apply(hb(seq=5, ttl_ms=60_000))).status == "refreshed"
    assert await r.pttl(key) > 7_000_000


async def test_leave_tombstone_lives_three_ttls(quiet: Registrar, r: aioredis.Redis) -> None:
    await quiet.apply(reg(seq=1, ttl_ms=600_000))
    await quiet.apply(leave(seq=2))
    assert await r.pttl(K.tomb("svc", "a")) > 1_700_000  # 3 x 600 s, not 10 min


async def test_unknown_leaves_cost_little(quiet: Registrar, r: aioredis.Redis) -> None:
    for i in range(50):
        assert (await quiet.apply(leave(f"u{i}", seq=1))).status == "absent"
    assert 0 < await r.pttl(K.tomb("svc", "u0")) <= scripts.UNKNOWN_LEAVE_MS


async def test_caps_refuse_creations_in_the_script(redis_url: str, r: aioredis.Redis) -> None:
    async with Registrar(
        redis_url, max_instances_per_service=2, max_instances=3, own_view=False
    ) as registrar:
        statuses = [(await registrar.apply(reg(f"i{n}"))).status for n in range(3)]
        assert statuses == ["created", "created", "capped"]
        assert (await registrar.apply(reg("o1", name="other"))).status == "created"
        assert (await registrar.apply(reg("o2", name="other"))).status == "capped"  # global
        assert registrar.stats.rejected["cap_refused"] == 2
        assert await r.scard(K.index) == 3
        # an update of a stored instance is never capped; a removal frees a place
        assert (await registrar.apply(hb("i0", seq=2, service_url="http://x:1"))).status == (
            "updated"
        )
        await registrar.apply(leave("i1", seq=2))
        assert (await registrar.apply(reg("i2"))).status == "created"


async def test_removal_and_reaping_work_out_of_memory(quiet: Registrar, r: aioredis.Redis) -> None:
    for sid in ("a", "b"):
        await quiet.apply(reg(sid, seq=1))
    await make_due(r, K.inst("svc", "b"))
    await r.config_set("maxmemory-policy", "noeviction")
    await r.config_set("maxmemory", "1")
    try:
        assert (await quiet.apply(leave("a", seq=2))).status == "removed"
        assert await quiet.reap() == 1
        assert await r.exists(K.inst("svc", "a"), K.inst("svc", "b")) == 0
        assert await r.scard(K.index) == 0
    finally:
        await r.config_set("maxmemory", "0")


@pytest.mark.parametrize("interval", [1.5])
async def test_reaper_with_a_slow_cadence_still_reaps(
    redis_url: str, r: aioredis.Redis, interval: float
) -> None:
    async with Registrar(redis_url, reap_interval=interval, own_view=False) as registrar:
        await registrar.apply(reg(ttl_ms=1000))
        await eventually(lambda: registrar.stats.reaped == 1, 20)
        assert await r.get(K.inst("svc", "a")) is None


async def test_reaper_reaps_while_the_registrar_loop_stalls(
    redis_url: str, r: aioredis.Redis
) -> None:
    """A loop blocked for 1.3 s again and again: each block is a stall, but a dead
    instance gets its grace once, not at every stall."""
    async with Registrar(redis_url, own_view=False) as registrar, anyio.create_task_group() as tg:

        async def stall() -> None:
            while True:
                await anyio.sleep(0.05)
                time.sleep(1.3)  # noqa: ASYNC251 - blocks the loop: the registrar stalls

        tg.start_soon(stall)
        await registrar.apply(reg(ttl_ms=1000))
        await eventually(lambda: registrar.stats.reaped == 1, 40)
        tg.cancel_scope.cancel()


async def test_abandoned_rebuild_takeover_uses_redis_time_and_cas(
    quiet: Registrar, r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds, micros = await r.time()
    redis_ms = seconds * 1000 + micros // 1000
    fresh = f"{redis_ms}-aaaa:rebuilding"
    await r.set(K.epoch, fresh)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 20)  # this host is 20 s ahead
    await quiet._finish_abandoned_rebuild(fresh.encode())
    assert await r.get(K.epoch) == fresh.encode()  # another's fresh rebuild: left alone
    old = f"{redis_ms - 60_000}-bbbb:rebuilding"
    newer = f"{redis_ms}-cccc:rebuilding"
    await r.set(K.epoch, newer)
    await quiet._finish_abandoned_rebuild(old.encode())  # read before the newer one
    assert await r.get(K.epoch) == newer.encode()
    await r.set(K.epoch, old)
    await quiet._finish_abandoned_rebuild(old.encode())
    assert await r.get(K.epoch) == f"{redis_ms - 60_000}-bbbb:ready".encode()


async def test_http_only_instance_survives_an_empty_restart(redis_server: RedisServer) -> None:
    """An instance written through the HTTP path (after_newest, no agent) is restored
    from the registrar's last view: no mirror ever sees it removed."""
    url = redis_server.url
    removals: list[Removed] = []

    async def watch(mirror: Mirror) -> None:
        async with mirror.changes() as stream:
            async for change in stream:
                if isinstance(change, Removed):
                    removals.append(change)

    async with (
        Registrar(url, rebuild_wait=0.5) as registrar,
        Mirror(url) as mirror,
        anyio.create_task_group() as tg,
    ):
        await registrar.apply(reg("h1", inc=0, seq=0, ttl_ms=30_000), after_newest=True)
        await mirror.wait_for("svc", 5)
        await eventually(lambda: registrar.view is not None and len(list(registrar.view())), 5)
        tg.start_soon(watch, mirror)
        redis_server.kill()
        await mirror.wait_until(lambda m: m.stale, 5)
        redis_server.start()
        await mirror.wait_until(lambda m: not m.stale, 15)
        await eventually(lambda: registrar.stats.restored == 1, 10)
        assert [i.service_id for i in mirror.instances("svc")] == ["h1"]
        client = aioredis.Redis.from_url(url)
        try:
            assert await client.exists(K.inst("svc", "h1")) == 1
        finally:
            await client.aclose()
        assert removals == []
        tg.cancel_scope.cancel()


async def test_start_waits_for_redis_however_long(redis_server: RedisServer) -> None:
    redis_server.stop()
    registrar = Registrar(redis_server.url, own_view=False)
    started = anyio.Event()

    async def run() -> None:
        await tg.start(registrar.run)
        started.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.sleep(1.0)  # the outage at start lasts a while, not a sync
            assert not started.is_set()
            redis_server.start()
            with anyio.fail_after(30):
                await started.wait()
            assert registrar.subscribed
            tg.cancel_scope.cancel()
    finally:
        await registrar.aclose()


async def test_consume_loop_restarts_after_an_escaped_bug(
    redis_url: str, r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Registrar(redis_url, own_view=False) as registrar:
        real = registrar._admission.validate
        calls = {"n": 0}

        def buggy(channel: bytes, data: bytes) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a future bug")
            return real(channel, data)

        monkeypatch.setattr(registrar._admission, "validate", buggy)
        await r.publish(K.events("svc"), model.encode(reg("x1")))
        await eventually(lambda: registrar.stats.loop_restarts == 1, 5)
        await eventually(lambda: registrar.subscribed, 10)
        await r.publish(K.events("svc"), model.encode(reg("x2")))
        await eventually(lambda: registrar.stats.applied["created"] >= 1, 10)
        assert await r.exists(K.inst("svc", "x2")) == 1


async def test_hostile_messages_never_end_the_consume_loop(
    registrar: Registrar, r: aioredis.Redis
) -> None:
    bombs = [
        b'{"type":"leave","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"type":"register","service_name":"svc","service_id":"s","incarnation":1,"seq":1,'
        b'"service_url":"http://h\\ud800:1"}',
        '{"type":"leave","service_name":"svc"}'.encode("utf-16"),
        b'{"type":"leave","service_name":"svc","service_id":"s","incarnation":1e400,"seq":1}',
    ]
    for bomb in bombs:
        await r.publish(K.events("svc"), bomb)
    await eventually(lambda: sum(registrar.stats.rejected.values()) == len(bombs), 5)
    assert registrar.stats.loop_restarts == 0
    await r.publish(K.events("svc"), model.encode(reg("ok")))
    await eventually(lambda: registrar.stats.applied["created"] == 1, 5)


async def test_http_register_over_the_cap_is_refused(redis_url: str) -> None:
    """The gateway's write path goes through the same apply script and its caps."""
    import httpx

    from saga_events.web import run_gateway

    async with (
        Registrar(redis_url, max_instances_per_service=1, own_view=False) as registrar,
        anyio.create_task_group() as tg,
    ):
        host, port = await tg.start(run_gateway, registrar, redis_url, "127.0.0.1", 0, None)
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            body = {"service_name": "svc", "service_url": "http://10.9.0.1:80"}
            first = await http.post("/api/v1/services/register", json=body)
            assert first.status_code == 200, first.text
            body["service_url"] = "http://10.9.0.2:80"
            second = await http.post("/api/v1/services/register", json=body)
            assert second.status_code == 503, second.text
            assert "cap" in second.text
        assert registrar.stats.rejected["cap_refused"] == 1
        tg.cancel_scope.cancel()


async def test_caps_count_a_registry_written_before_them(redis_url: str, r: aioredis.Redis) -> None:
    async with Registrar(redis_url, own_view=False) as registrar:
        for n in range(2):
            await registrar.apply(reg(f"i{n}"))
    await r.delete(scripts.counts_key(K))  # as written by a registrar without caps
    async with Registrar(redis_url, max_instances_per_service=2, own_view=False) as registrar:
        assert (await registrar.apply(reg("i2"))).status == "capped"
