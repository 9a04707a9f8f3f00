"""The touch path (``_touch.py``, ``lua/touch.lua``): an unchanged heartbeat that says
``since`` moves only its deadline; everything else is applied in full.

The registrar here is given a view it does not update itself (a dict the test
fills from Redis), so a view that lags is made on purpose, not hoped for.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Registrar, model, override_ends, scripts
from saga_events.keys import Keys
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio
KEYS = Keys()
INC = 1_700_000_000_000_000
KEY = KEYS.inst("payment", "p-1")
URL_A, URL_B = "http://10.0.0.5:8002", "http://10.0.0.6:8002"


def event(seq: int, since: int | None, **overrides: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "heartbeat",
        "service_name": "payment",
        "service_id": "p-1",
        "incarnation": INC,
        "seq": seq,
        "service_url": URL_A,
        "ttl_ms": 30_000,
    }
    if since is not None:
        base["since"] = since
    base.update(overrides)
    return json.dumps(base).encode()


def leave(seq: int) -> bytes:
    return json.dumps(
        {"type": "leave", "service_name": "payment", "service_id": "p-1", "incarnation": INC}
        | {"seq": seq}
    ).encode()


async def mget_calls(client: aioredis.Redis) -> int:
    """apply.lua's MGET (record, tombstone, override), once per event; touch.lua has none."""
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


class Setup:
    def __init__(self, client: aioredis.Redis, reg: Registrar, view: dict[str, Any]) -> None:
        self.client, self.reg, self.view = client, reg, view
        self.sent = 0

    async def send(self, raw: bytes) -> None:
        """Publish one event and wait until the registrar has applied or rejected it."""
        s = self.reg.stats
        done = sum(s.applied.values()) + sum(s.rejected.values())  # also direct applies
        self.sent += 1
        await self.client.publish(KEYS.events("payment"), raw)
        await eventually(
            lambda: (
                s.received == self.sent
                and sum(s.applied.values()) + sum(s.rejected.values()) == done + 1
            ),
            10,
        )

    async def catch_up(self) -> model.Instance:
        """The view catches up with Redis (the record must be there)."""
        raw = await self.client.get(KEY)
        assert raw is not None
        self.view[KEY] = model.decode_instance(raw)
        return self.view[KEY]

    async def stored(self) -> model.Instance | None:
        raw = await self.client.get(KEY)
        return None if raw is None else model.decode_instance(raw)


@pytest.fixture
async def setup(redis_url: str) -> AsyncIterator[Setup]:
    client = aioredis.Redis.from_url(redis_url)
    view: dict[str, model.Instance] = {}
    try:
        async with Registrar(
            client, view=lambda: view.values(), lookup=view.get, heartbeat_hold=0
        ) as reg:
            yield Setup(client, reg, view)
    finally:
        await client.aclose()


async def test_unchanged_heartbeats_touch_and_others_apply_in_full(setup: Setup) -> None:
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()
    before = await s.client.zscore(KEYS.deadlines, KEY)
    mgets = await mget_calls(s.client)
    for seq in (2, 3):
        await s.send(event(seq, 1))
    assert stats.touched == 2
    assert stats.applied == {"created": 1, "refreshed": 2}
    # The deadline and the order entry moved; the record was not read (apply.lua's MGET).
    assert await mget_calls(s.client) == mgets
    assert await s.client.hget(KEYS.order, KEY) == f"{INC}:3".encode()
    assert (await s.client.zscore(KEYS.deadlines, KEY) or 0) >= (before or 0)
    await s.send(event(2, 1))  # a duplicate, late: the touch says stale
    assert stats.applied["stale"] == 1 and stats.touched == 2
    await s.send(event(4, None))  # no since (another agent): in full
    assert stats.touched == 2
    assert await mget_calls(s.client) == mgets + 1
    await s.send(event(5, 5, service_url=URL_B))  # a change: in full
    assert stats.touched == 2
    assert await mget_calls(s.client) == mgets + 2
    assert stats.applied["updated"] == 1
    stored = await s.stored()
    assert stored is not None and (stored.seq, stored.service_url) == (5, URL_B)


async def test_a_drained_record_is_not_touched(setup: Setup) -> None:
    """An operator's override is in the record: its heartbeats go in full (here an
    instance that drains itself too, so the content alone would match)."""
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="drain"))
    override = model.encode({"by": "operator", "reason": "maintenance"})
    await s.client.set(KEYS.override("payment", "p-1"), override)
    assert await override_ends.reapply(s.reg, s.client, "payment", "p-1")
    inst = await s.catch_up()
    assert inst.override is not None and inst.draining
    assert inst.seq == 2  # the reapply took the next seq
    await s.send(event(3, 1, type="drain"))
    assert stats.touched == 0
    assert await s.client.hget(KEYS.order, KEY) == f"{INC}:3".encode()  # in full
    stored = await s.stored()
    assert stored is not None and stored.override is not None


async def test_aba_a_delayed_older_change_stays_stale(setup: Setup) -> None:
    """A@3 stored and in the view; B@4 is delayed; A@5 (since 5) comes first, then B@4."""
    s, stats = setup, setup.reg.stats
    await s.send(event(3, 3, type="register"))
    await s.catch_up()  # the view: A@3 (and stays so: it lags from here)
    await s.send(event(5, 5))  # since 5 > the view's seq 3: in full (refreshed)
    assert stats.touched == 0
    await s.send(event(4, 4, service_url=URL_B))  # the delayed change
    assert stats.applied["stale"] == 1
    stored = await s.stored()
    assert stored is not None and stored.service_url == URL_A
    await s.send(event(6, 5))  # the view still shows A@3 < since 5: in full, A stays
    stored = await s.stored()
    assert stats.touched == 0 and stored is not None and stored.service_url == URL_A


async def test_a_late_heartbeat_after_a_leave_does_not_resurrect(setup: Setup) -> None:
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()  # the view keeps the record after the leave (it lags)
    await s.send(leave(3))
    await s.send(event(2, 1))  # late: a touch finds no deadline, apply.lua says stale
    assert stats.touched == 0
    assert stats.applied["stale"] == 1
    assert await s.client.get(KEY) is None
    assert await s.client.zscore(KEYS.deadlines, KEY) is None  # not re-added
    assert not await s.client.sismember(KEYS.index, KEY)


async def test_a_delayed_leave_stays_behind_a_touched_re_announce(setup: Setup) -> None:
    """Leave@2 is delayed past the re-announce@3 (same content, since 1): the touch
    moves the order entry to 3, so the leave is stale and the live instance stays."""
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()
    await s.send(event(3, 1))
    assert stats.touched == 1
    await s.send(leave(2))
    assert stats.applied["stale"] == 1
    assert await s.stored() is not None


async def test_a_heartbeat_after_the_reaper_re_creates_the_instance(setup: Setup) -> None:
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()
    await s.client.zadd(KEYS.deadlines, {KEY: 1})  # due
    await eventually(lambda: stats.reaped == 1, 10)
    assert await s.client.get(KEY) is None
    await s.send(event(2, 1))  # the view still holds it: touched, absent, applied in full
    assert stats.touched == 0
    assert stats.applied["created"] == 2
    stored = await s.stored()
    assert stored is not None and stored.seq == 2
    assert await s.client.zscore(KEYS.deadlines, KEY) is not None


async def test_a_heartbeat_delayed_past_a_reap_stays_stale(setup: Setup) -> None:
    """The reaper's tombstone is the order entry: touches must move it (chaos found a
    paused registrar's backlog bringing reaped instances back when they did not)."""
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()
    for seq in (2, 3):
        await s.send(event(seq, 1))
    assert stats.touched == 2
    await s.client.zadd(KEYS.deadlines, {KEY: 1})  # the agent crashed: due
    await eventually(lambda: stats.reaped == 1, 10)
    assert await s.client.get(KEYS.tomb("payment", "p-1")) == f"{INC}:3".encode()
    await s.send(event(2, 1))  # from a backlog
    assert stats.applied["stale"] == 1
    assert await s.client.get(KEY) is None


async def test_touches_refresh_the_backstop(setup: Setup) -> None:
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.catch_up()
    await s.client.pexpire(KEY, 60_000)  # far less than half the backstop is left
    await s.send(event(2, 1))  # seq 2: not checked
    assert stats.touched == 1
    assert await s.client.pttl(KEY) <= 60_000
    await s.send(event(4, 1))  # every 4th seq: checked and refreshed
    assert stats.touched == 2
    assert await s.client.pttl(KEY) > scripts.BACKSTOP_MIN_MS // 2


@pytest.mark.parametrize("since", [4, -1, "1"])
async def test_a_bad_since_is_rejected_and_counted(setup: Setup, since: Any) -> None:
    s, stats = setup, setup.reg.stats
    await s.send(event(1, 1, type="register"))
    await s.send(event(3, since, service_url=URL_B))
    assert stats.rejected["bad_since"] == 1
    stored = await s.stored()
    assert stored is not None and stored.service_url == URL_A  # nothing changed


async def test_the_agent_says_since_its_last_change(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client.pubsub() as sub:  # stands in for a registrar (a receiver)
            await sub.psubscribe(KEYS.events_pattern)
            agent = Agent(client, "payment", URL_A, service_id="p-1", ttl=3)
            sent = []

            async def announce(step: Any) -> None:
                assert await step()
                with anyio.fail_after(10):
                    while True:  # None: a subscription reply, skipped
                        msg = await sub.get_message(ignore_subscribe_messages=True, timeout=5)
                        if msg is not None and json.loads(msg["data"])["seq"] == agent.seq:
                            got = json.loads(msg["data"])
                            sent.append((got["type"], got["seq"], got.get("since")))
                            return

            await announce(lambda: agent.announce("register"))
            await announce(agent.announce)
            await announce(lambda: agent.announce("register"))  # a re-register: no change
            await announce(lambda: agent.update(metadata={"zone": "b"}))
            await announce(agent.announce)
            await announce(agent.drain)
            await announce(agent.leave)
            await announce(agent.announce)  # after a leave
            assert sent == [
                ("register", 1, 1),
                ("heartbeat", 2, 1),
                ("register", 3, 1),
                ("heartbeat", 4, 4),
                ("heartbeat", 5, 4),
                ("drain", 6, 6),
                ("leave", 7, None),
                ("drain", 8, 6),  # the same content as before the leave: no change
            ]
    finally:
        await client.aclose()
