"""The apply script's batches: N events in one EVALSHA act as N calls in order."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from saga_events import Registrar, model, scripts
from saga_events.keys import Keys

pytestmark = pytest.mark.anyio
K = Keys()
INC = 1_700_000_000_000_000


def ev(kind: str, sid: str, seq: int, url: str = "http://10.9.0.1:80") -> Any:
    base: dict[str, Any] = dict(service_name="svc", service_id=sid, incarnation=INC, seq=seq)
    if kind == "leave":
        return model.Leave(**base)
    cls = model.Register if kind == "register" else model.Heartbeat
    return cls(**base, service_url=url)


async def test_one_batch_applies_events_in_order_as_separate_calls_would(
    redis_url: str,
) -> None:
    events = [
        ev("register", "a", 1),
        ev("heartbeat", "a", 2),  # unchanged: refreshed
        ev("heartbeat", "a", 2),  # duplicate: refreshed (same pair, same record)
        ev("heartbeat", "a", 3, "http://10.9.0.2:80"),  # changed: updated
        ev("heartbeat", "a", 2, "http://10.9.0.3:80"),  # older than the batch's own update
        ev("leave", "a", 4),
        ev("heartbeat", "a", 4),  # not newer than the leave in the same batch
        ev("register", "b", 1),
        ev("leave", "c", 1),  # never seen
    ]
    async with Registrar(redis_url, own_view=False, reap_interval=3600) as reg:
        results = await reg.apply_many(events)
        assert [r.status for r in results] == [
            "created", "refreshed", "refreshed", "updated", "stale", "removed", "stale",
            "created", "absent",
        ]  # fmt: skip
        assert [(r.incarnation, r.seq) for r in results][:2] == [(INC, 1), (INC, 2)]
        r = aioredis.Redis.from_url(redis_url)
        try:
            assert await r.get(K.inst("svc", "a")) is None
            assert await r.get(K.tomb("svc", "a")) == f"{INC}:4".encode()
            assert await r.smembers(K.index) == {K.inst("svc", "b").encode()}
            assert int(await r.get(K.rev) or 0) == 4  # created, updated, removed, created
        finally:
            await r.aclose()


async def test_batches_larger_than_one_script_call_are_split_and_kept_in_order(
    redis_url: str,
) -> None:
    n = 2 * scripts.BATCH_EVENTS + 7
    creates = [ev("register", f"i{i}", 1) for i in range(n)]
    beats = [ev("heartbeat", f"i{i}", 2) for i in range(n)]
    async with Registrar(redis_url, own_view=False, reap_interval=3600) as reg:
        first = await reg.apply_many(creates + beats)
        assert [r.status for r in first] == ["created"] * n + ["refreshed"] * n
        again = await reg.apply_many(beats)  # the same pairs again: duplicates
        assert {r.status for r in again} == {"refreshed"}
        r = aioredis.Redis.from_url(redis_url)
        try:
            assert await r.scard(K.index) == n
            assert await r.zcard(K.deadlines) == n
            assert await r.hget(K.order, K.inst("svc", f"i{n - 1}")) == f"{INC}:2".encode()
        finally:
            await r.aclose()
