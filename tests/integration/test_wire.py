"""The raw RESP paths (saga_events._wire) on a real server, fast and generic."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from redis.exceptions import NoScriptError, ResponseError

from saga_events import _wire
from saga_events._redis import connect

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["hiredis", "generic"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "generic":  # as on a redis-py whose connections look different
        monkeypatch.setattr(_wire, "_raw", lambda conn: None)
    yield request.param


async def test_pipe_returns_replies_in_order_with_errors_as_objects(
    redis_url: str, path: str
) -> None:
    client = connect(redis_url)
    try:
        pipe = _wire.Pipe(client)
        pack = _wire.pack_command
        big = b"x" * 300_000  # more than one socket read
        packed = b"".join(
            [
                pack(("SET", "a", big)),
                pack(("GET", "a")),
                pack(("EVALSHA", "0" * 40, 0)),
                pack(("INCR", "a")),
                pack(("GET", "missing")),
            ]
        )
        replies = await pipe.execute(packed, 5)
        assert replies[0] == b"OK"
        assert replies[1] == big
        assert isinstance(replies[2], NoScriptError)
        assert isinstance(replies[3], ResponseError)
        assert replies[4] is None
        # The connection is kept and still in step: the next call sees its own replies.
        assert await pipe.execute(pack(("ECHO", "next")), 1) == [b"next"]
        await pipe.release()
    finally:
        await client.aclose()


async def test_pipe_drops_its_connection_after_a_cancelled_call(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        pipe = _wire.Pipe(client)
        with anyio.move_on_after(0.2) as scope:
            # BLPOP blocks in Redis: the call is cancelled with its reply in flight.
            await pipe.execute(_wire.pack_command(("BLPOP", "nothing", 5)), 1)
        assert scope.cancelled_caught
        # A fresh connection answers this call, not the stale BLPOP reply.
        assert await pipe.execute(_wire.pack_command(("ECHO", "after")), 1) == [b"after"]
        await pipe.release()
    finally:
        await client.aclose()


async def test_subscription_reads_every_message_in_bulk(redis_url: str, path: str) -> None:
    client = connect(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.psubscribe("ch:*")
        sub = _wire.Subscription(pubsub)
        confirmation = await sub.read(5.0, 10)
        assert confirmation and confirmation[0][0] == b"psubscribe"
        assert await sub.read(0.05, 10) == []  # nothing published: a timeout, not an error
        for i in range(300):
            await client.publish(f"ch:{i % 3}", f"m{i}")
        got: list[bytes] = []
        with anyio.fail_after(10):
            while len(got) < 300:
                batch = await sub.read(1.0, 64)
                assert 1 <= len(batch) <= 64
                assert all(reply[0] == b"pmessage" for reply in batch)
                got.extend(reply[3] for reply in batch)
        assert got == [f"m{i}".encode() for i in range(300)]
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_pipe_drops_its_connection_when_the_node_became_a_replica(path: str) -> None:
    """A kept connection on a node that turned replica (a failover) is dropped on the
    first READONLY reply, so the next call resolves the node again: before, the
    registrar's apply pipeline kept writing to the demoted node for good."""
    from saga_events.embedded import RedisServer

    with RedisServer() as master, RedisServer() as replica:
        client = connect(replica.url)
        pipe = _wire.Pipe(client)
        try:
            packed = _wire.pack_command(("EVAL", "return redis.call('SET', KEYS[1], 'x')", 1, "k"))
            assert (await pipe.execute(packed, 1))[0] == b"OK"
            kept = pipe._conn
            assert kept is not None
            host, port = master.url.split("//")[1].split("/")[0].split(":")
            await client.execute_command("REPLICAOF", host, port)
            reply = (await pipe.execute(packed, 1))[0]
            assert isinstance(reply, ResponseError) and "READONLY" in str(reply)
            assert pipe._conn is None  # the next call takes a fresh connection
        finally:
            await client.execute_command("REPLICAOF", "NO", "ONE")
            await pipe.release()
            await client.aclose()


async def test_a_handler_gets_messages_as_they_arrive_and_may_wake_the_reader(
    redis_url: str,
) -> None:
    """The tap: while the task waits in read() with a handler set, messages go to the
    handler in order (read() does not return for them); a handler returning True wakes
    read(), and later messages wait for the task (the handler is unset)."""
    client = connect(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("ch")
        sub = _wire.Subscription(pubsub)
        assert (await sub.read(5.0, 10))[0][0] == b"subscribe"
        handled: list[bytes] = []

        def handler(batch: list[object]) -> bool:
            for reply in batch:
                assert isinstance(reply, list)
                handled.append(reply[2])
            return b"stop" in handled

        async def publish() -> None:
            await anyio.wait_all_tasks_blocked()
            for i in range(200):
                await client.publish("ch", f"m{i}")
            await client.publish("ch", "stop")
            await client.publish("ch", "after")

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                sub.set_handler(handler)
                assert await sub.read(30.0, 10) == []  # woken by the handler, not a timeout
        assert handled == [f"m{i}".encode() for i in range(200)] + [b"stop"]
        with anyio.fail_after(10):
            later = await sub.read(5.0, 10)
        assert [r[2] for r in later] == [b"after"]  # no handler now: the task reads it
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        with anyio.fail_after(10), pytest.raises(Exception, match="closed"):
            while True:
                await sub.read(5.0, 10)
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_a_backlog_read_unsets_the_handler(redis_url: str) -> None:
    """read() returning replies the tap held (the task was busy) unsets the handler: the
    task holds those replies until it applies them, and awaits meanwhile (the
    subscription's health check, a topology probe); a message arriving then went to the
    handler before the older ones were applied (the watcher saw a false feed gap, or
    applied an expiry before the change it follows)."""
    from saga_events.testing import eventually

    client = connect(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("ch")
        sub = _wire.Subscription(pubsub)
        assert (await sub.read(5.0, 10))[0][0] == b"subscribe"  # the tap is on
        tap = sub._tap
        assert tap is not None
        await client.publish("ch", "older")
        await eventually(lambda: bool(tap.replies), 10, what="the tap holds a reply")
        handled: list[object] = []

        def handler(batch: list[object]) -> bool:
            handled.extend(batch)
            return False

        sub.set_handler(handler)
        held = await sub.read(5.0, 10)  # the backlog, at once
        assert [r[2] for r in held] == [b"older"]
        await client.publish("ch", "newer")  # arrives while the task holds "older"
        await eventually(lambda: bool(handled or tap.replies), 10, what="newer received")
        assert handled == []
        with anyio.fail_after(10):
            assert [r[2] for r in await sub.read(5.0, 10)] == [b"newer"]
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_a_flood_buffered_before_the_first_read_is_read_in_full(redis_url: str) -> None:
    """Messages that arrive before the tap is on fill redis-py's stream, which pauses the
    socket; the tap takes them over and resumes it. Before, the socket stayed paused
    and the rest was never read (the registrar's intake stopped after ~1,500 events of
    a flood: test_a_flood_from_one_publisher_is_rate_limited)."""
    from saga_events.testing import eventually

    client = connect(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("ch")
        conn = pubsub.connection
        assert conn is not None
        stream = conn._reader
        body = b"x" * 200
        pipe = client.pipeline(transaction=False)
        for _ in range(2000):
            pipe.publish("ch", body)
        await pipe.execute()
        await eventually(lambda: not stream._transport.is_reading(), 10, what="socket paused")
        sub = _wire.Subscription(pubsub)
        got = 0
        with anyio.fail_after(10):
            while got < 2000:
                got += sum(1 for r in await sub.read(1.0, 1024) if r[0] == b"message")
        assert got == 2000
    finally:
        await pubsub.aclose()
        await client.aclose()
