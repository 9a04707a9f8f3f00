"""Reads from other threads while the mirror applies thousands of changes."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
import redis.asyncio as aioredis

from saga_events import Mirror, Registrar, ServiceNotFound, model
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.model import Instance
from saga_events.testing import wait_mirror_matches

pytestmark = pytest.mark.anyio
K = Keys("default")
# Record changes the way the registrar's scripts make them: write, index, rev, feed.
PUT = """redis.call('SET', KEYS[1], ARGV[1]); redis.call('SADD', KEYS[2], KEYS[1])
local rev = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', KEYS[4], '{"rev":' .. rev .. ',"ch":[["set",' .. cjson.encode(KEYS[1])
  .. ',' .. ARGV[1] .. ']]}')"""
DEL = """redis.call('DEL', KEYS[1]); redis.call('SREM', KEYS[2], KEYS[1])
local rev = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', KEYS[4], '{"rev":' .. rev .. ',"ch":[["del",' .. cjson.encode(KEYS[1])
  .. ']]}')"""
FEED = (K.rev, K.feed)


def record(name: str, sid: str, *, draining: bool = False, seq: int = 1) -> bytes:
    return model.encode(
        Instance(
            incarnation=1, seq=seq, registered_at_ms=0, service_name=name, service_id=sid,
            service_url=f"http://{sid}:80", capabilities=("rw",) if seq % 2 else (),
            draining=draining,
        )
    )  # fmt: skip


@pytest.fixture
def fast_thread_switches() -> Iterator[None]:
    """Switch threads as often as CPython allows, so races get their chance."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


async def test_picks_from_threads_during_thousands_of_changes_never_fail(
    redis_server: RedisServer, fast_thread_switches: None
) -> None:
    """Issue 8: pick/instances/services from 4 threads while services appear, drain, change
    and vanish: no exception, and every pick is a live instance of the service asked for."""
    url = redis_server.url
    admin = aioredis.Redis.from_url(url)
    stop = threading.Event()
    newest = [-1]  # the newest "fresh-N" service written (one per change batch)
    failures: list[BaseException] = []
    picks = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                inst = mirror.pick("stable")
                assert inst.service_name == "stable" and not inst.draining, inst
                n = newest[0]
                for name in (f"fresh-{n}", f"fresh-{n - 1}", "churn"):
                    try:
                        got = mirror.pick(name)
                    except ServiceNotFound:
                        continue
                    assert got.service_name == name and not got.draining, got
                    try:
                        rw = mirror.pick(name, "rw")
                    except ServiceNotFound:
                        continue
                    assert "rw" in rw.capabilities and rw.service_name == name, rw
                for group in mirror.services().values():
                    assert len({i.service_name for i in group}) == 1
                assert all(i.service_name == "churn" for i in mirror.instances("churn"))
                picks[0] += 1
        except BaseException as exc:
            failures.append(exc)

    try:
        async with Registrar(url, rebuild_wait=0.1), Mirror(url) as mirror:
            stable = record("stable", "s-0")
            await admin.eval(PUT, 4, K.inst("stable", "s-0"), K.index, *FEED, stable)
            await mirror.wait_for("stable", 5)
            threads = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            try:
                for n in range(600):
                    pipe = admin.pipeline(transaction=False)
                    fresh = f"fresh-{n}"
                    pipe.eval(PUT, 4, K.inst(fresh, "f"), K.index, *FEED, record(fresh, "f"))
                    sid = f"c-{n % 40}"
                    pipe.eval(PUT, 4, K.inst("churn", sid), K.index, *FEED,
                              record("churn", sid, draining=n % 3 == 0, seq=n))  # fmt: skip
                    if n % 4 == 0:
                        pipe.eval(DEL, 4, K.inst("churn", f"c-{(n + 20) % 40}"), K.index, *FEED)
                    if n >= 2:
                        pipe.eval(DEL, 4, K.inst(f"fresh-{n - 2}", "f"), K.index, *FEED)
                    await pipe.execute()
                    newest[0] = n
                    if n % 50 == 0:
                        await anyio.lowlevel.checkpoint()  # let the mirror apply as it goes
                await wait_mirror_matches(mirror, url, timeout=30)
            finally:
                stop.set()
                for t in threads:
                    await anyio.to_thread.run_sync(t.join, 10)
            assert not failures, failures[0]
            assert picks[0] > 0
            assert mirror.stats.feed_changes > 1500
    finally:
        await admin.aclose()
