"""Selectors and weights through a real registrar, Redis and mirror."""

from __future__ import annotations

import math
import random
from collections import Counter
from contextlib import AsyncExitStack

import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded import RedisServer

pytestmark = pytest.mark.anyio

AGENTS = {
    "w1": {"zone": "eu-1", "weight": "1"},
    "w3": {"zone": "eu-1", "weight": "3"},
    "z0": {"zone": "eu-1", "weight": "0"},
    "us": {"zone": "us-1"},
}


async def test_where_prefer_and_weights_on_a_real_registry(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(Registrar(url, rebuild_wait=0.1))
        for sid, meta in AGENTS.items():
            await stack.enter_async_context(
                Agent(url, "api", f"http://{sid}:80", service_id=sid, metadata=meta)
            )
        rr = await stack.enter_async_context(Mirror(url))
        rnd = await stack.enter_async_context(Mirror(url, strategy="random"))
        for m in (rr, rnd):
            await m.wait_until(lambda m: len(m.instances("api")) == len(AGENTS), timeout=10)

        eu = {"zone": "eu-1"}
        n = 4000
        # Smooth weighted round-robin: exact 1:3 per period, weight 0 never.
        got = Counter(rr.pick("api", where=eu).service_id for _ in range(n))
        assert got == {"w1": n // 4, "w3": 3 * n // 4}
        # Weighted random: within a 5-sigma binomial bound of 1/4 (seeded: reproducible).
        random.seed(1402)
        got = Counter(rnd.pick("api", where=eu).service_id for _ in range(n))
        sd = math.sqrt(n * 0.25 * 0.75)
        assert abs(got["w1"] - n / 4) <= 5 * sd and set(got) == {"w1", "w3"}, got
        # prefer: the preferred zone while it has instances, else the rest.
        assert {rr.pick("api", prefer={"zone": "us-1"}).service_id for _ in range(8)} == {"us"}
        assert {rr.pick("api", prefer={"zone": "ap-1"}).service_id for _ in range(8)} == {
            "w1",
            "w3",
            "us",
        }
        assert [i.service_id for i in rr.instances("api", where=eu)] == ["w1", "w3", "z0"]
