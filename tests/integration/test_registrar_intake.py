"""The registrar's intake (``_intake.py``): heartbeats held a moment, everything else at once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from saga_events import Registrar, _intake, _wire, model
from saga_events.keys import Keys
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio
KEYS = Keys()
INC = 1_700_000_000_000_000


def event(**overrides: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "heartbeat",
        "service_name": "payment",
        "service_id": "p-1",
        "incarnation": INC,
        "seq": 1,
        "service_url": "http://10.0.0.5:8002",
        "ttl_ms": 30_000,
    }
    base.update(overrides)
    return json.dumps(base).encode()


def settled(reg: Registrar) -> bool:
    s = reg.stats
    return s.received == sum(s.applied.values()) + sum(s.rejected.values())


async def test_heartbeats_alone_are_applied_within_the_hold(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(client, own_view=False, heartbeat_hold=0.05) as reg:
            for seq in (1, 2, 3):
                await client.publish(KEYS.events("payment"), event(seq=seq))
            await eventually(lambda: reg.stats.received == 3 and settled(reg), 10)
            assert reg.stats.applied == {"created": 1, "refreshed": 2}
            assert await client.hget(KEYS.order, KEYS.inst("payment", "p-1")) == f"{INC}:3".encode()
    finally:
        await client.aclose()


async def test_a_register_is_applied_at_once_after_the_held_heartbeats(redis_url: str) -> None:
    """With a hold far longer than the test, a heartbeat waits; the next register
    (another instance) is applied at once, and the held heartbeat with it, first."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(client, own_view=False, heartbeat_hold=3600) as reg:
            await client.publish(KEYS.events("payment"), event(service_id="held"))
            await eventually(lambda: reg.stats.received == 1, 10)
            assert sum(reg.stats.applied.values()) == 0  # held (nothing else came)
            await client.publish(KEYS.events("payment"), event(type="register", service_id="r"))
            await eventually(lambda: reg.stats.received == 2 and settled(reg), 10)
            assert reg.stats.applied == {"created": 2}
            rev_held = await client.get(KEYS.inst("payment", "held"))
            assert rev_held is not None
            # Applied in the order received: the held heartbeat's creation came first.
            assert await client.get(KEYS.rev) == b"2"
            held = model.decode_instance(rev_held)
            reg_r = model.decode_instance(await client.get(KEYS.inst("payment", "r")) or b"")
            assert held.registered_at_ms <= reg_r.registered_at_ms
    finally:
        await client.aclose()


async def test_a_heartbeat_that_carries_a_change_is_not_held() -> None:
    """A heartbeat whose ``since`` is its own seq says its record changed (an agent's
    ``update``): it is due at once, not held with the unchanged ones (whose hold the
    session's quiet time would end only seconds later)."""

    def beat(seq: int, since: int) -> model.Heartbeat:
        return model.Heartbeat(
            service_name="payment",
            service_id="p-1",
            incarnation=INC,
            seq=seq,
            service_url="http://10.0.0.5:8002",
            since=since,
        )

    queue = [[beat(2, 1)], [beat(3, 3)]]
    intake = _intake._Intake(
        asyncio.Protocol(), _reader(), _Transport(), lambda r: queue.pop(0), 3600, 512
    )
    intake.data_received(_wire.pack_command((b"X",)))
    with anyio.move_on_after(0.2) as held:
        await intake.wait(60)
    assert held.cancelled_caught  # the unchanged heartbeat waits
    intake.data_received(_wire.pack_command((b"X",)))
    with anyio.fail_after(5):
        await intake.wait(60)  # the change is due at once, the held one with it
    assert [e.seq for e in intake.take_batch()] == [2, 3]


async def test_a_leave_after_a_held_heartbeat_of_the_same_instance_wins(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(client, own_view=False, heartbeat_hold=3600) as reg:
            channel = KEYS.events("payment")
            await client.publish(channel, event(type="register", seq=1))
            await eventually(lambda: reg.stats.applied["created"] == 1, 10)
            await client.publish(channel, event(seq=2))
            await client.publish(channel, json.dumps(_leave(3)).encode())
            await eventually(lambda: reg.stats.received == 3 and settled(reg), 10)
            assert reg.stats.applied == {"created": 1, "refreshed": 1, "removed": 1}
            assert await client.get(KEYS.inst("payment", "p-1")) is None
            assert await client.get(KEYS.tomb("payment", "p-1")) == f"{INC}:3".encode()
    finally:
        await client.aclose()


def _leave(seq: int) -> dict[str, Any]:
    return {
        "type": "leave",
        "service_name": "payment",
        "service_id": "p-1",
        "incarnation": INC,
        "seq": seq,
    }


def _reader() -> hiredis.Reader:
    return hiredis.Reader(notEnoughData=_wire.NOT_ENOUGH)  # as redis-py makes it


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.paused = 0
        self.resumed = 0

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1


async def test_a_backlog_stops_reading_until_it_is_applied() -> None:
    """Memory stays bounded: at 8 x batch waiting events the socket is not read."""
    transport = _Transport()
    intake = _intake._Intake(
        asyncio.Protocol(), _reader(), transport, lambda replies: replies, 0.01, 4
    )
    message = _wire.pack_command((b"X",))  # any reply: the decode here keeps them all
    intake.data_received(message * 31)
    assert transport.paused == 0
    intake.data_received(message)
    assert (len(intake.pending), transport.paused) == (32, 1)
    taken = intake.take_batch()
    assert (len(taken), len(intake.pending), transport.resumed) == (4, 28, 1)
    await intake.wait(1)  # the rest is due at once: a backlog
    assert len(intake.take_batch()) == 4


async def test_a_decode_failure_ends_the_session_with_it() -> None:
    def broken(replies: list[Any]) -> list[Any]:
        raise RuntimeError("a bug")

    intake = _intake._Intake(asyncio.Protocol(), _reader(), _Transport(), broken, 0.01, 4)
    intake.data_received(_wire.pack_command((b"X",)))
    with pytest.raises(RuntimeError, match="a bug"):
        await intake.wait(1)


async def test_the_intake_resubscribes_when_redis_closes_its_connection(redis_url: str) -> None:
    """Redis cuts the subscriber (CLIENT KILL, or the pub/sub output-buffer limit):
    the end of the stream ends the session, and the registrar subscribes again."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(client, own_view=False, heartbeat_hold=0.01) as reg:
            assert await client.client_kill_filter(_type="pubsub") >= 1
            await eventually(lambda: reg.stats.reconnects >= 1 and reg.subscribed, 10)
            channel = KEYS.events("payment")
            await eventually(lambda: client.publish(channel, event(type="register")), 10)
            await eventually(lambda: reg.stats.applied["created"] == 1, 10)
    finally:
        await client.aclose()


async def test_the_end_of_the_stream_ends_the_session_at_once() -> None:
    """Found by the chaos suite: EOF passed on to the stream alone left the transport
    half-open and the registrar subscribed in name for two PING intervals."""
    inner = _Inner()
    intake = _intake._Intake(inner, _reader(), _Transport(), lambda r: r, 0.01, 4)
    intake.eof_received()
    assert inner.eofs == 1
    with pytest.raises(RedisConnectionError):
        await intake.wait(60)


async def test_events_received_before_the_end_are_taken_first() -> None:
    """Review finding: a register that came just before Redis closed the connection was
    dropped (wait raised the failure before the events it had were taken)."""
    intake = _intake._Intake(_Inner(), _reader(), _Transport(), lambda r: r, 0.01, 4)
    intake.data_received(_wire.pack_command((b"X",)))
    intake.eof_received()
    await intake.wait(1)
    assert len(intake.take_batch()) == 1
    with pytest.raises(RedisConnectionError), anyio.fail_after(30):
        await intake.wait(60)  # at once, not after the quiet time


async def test_a_flood_buffered_before_the_take_over_is_read(redis_url: str) -> None:
    """Review finding: a flood that filled redis-py's buffer before the intake took the
    socket over left the socket paused, and nothing more was read until the session's
    ping timed out."""
    from saga_events import connection
    from saga_events._redis import connect

    client = connect(redis_url)
    try:
        async with connection.subscribe(client, patterns=("ev:*",)) as sub:
            assert sub.pubsub.connection is not None
            stream = sub.pubsub.connection._reader
            pipe = client.pipeline(transaction=False)
            for _ in range(2000):
                pipe.publish("ev:x", b"x" * 200)
            await pipe.execute()
            await eventually(lambda: not stream._transport.is_reading(), 10, what="paused")
            intake = _intake._take_over(sub, lambda replies: replies, 0, 512)
            assert intake is not None
            got = 0
            with anyio.fail_after(10):
                while got < 2000:
                    await intake.wait(1.0)
                    got += sum(1 for r in intake.take_batch() if r[0] == b"pmessage")
    finally:
        await client.aclose()


class _Inner(asyncio.Protocol):
    def __init__(self) -> None:
        self.eofs = 0

    def eof_received(self) -> bool:
        self.eofs += 1
        return True
