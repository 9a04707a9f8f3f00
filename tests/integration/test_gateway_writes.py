"""The writer's register path: no read before the apply script, and read-your-writes
from the script's own reply (the view shows the change before its feed message)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar
from saga_events._wait import eventually
from saga_events.keys import Keys
from saga_events.mirror import ChangeStream
from saga_events.model import Instance
from saga_events.view import Change
from saga_events.writer import Registration, Writer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def writer(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Writer]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield Writer(registrar, mirror, client, write_timeout=10.0)
    finally:
        await client.aclose()


class HeldFeed:
    """Holds the mirror's watcher before it handles the next batch it reads (the feed
    message of a write), until ``release``; ``held`` is set once a batch waits. The
    watcher must be watching (its subscription up)."""

    def __init__(self, mirror: Mirror) -> None:
        watcher: Any = mirror._watcher
        self.real: Callable[[list[Any]], Awaitable[None]] = watcher._handle
        self.held = anyio.Event()
        self.go = anyio.Event()
        self.on = True

        async def handle(batch: list[Any]) -> None:
            if self.on:
                self.held.set()
                await self.go.wait()
            await self.real(batch)

        watcher._handle = handle
        # Feed messages are applied in the subscription's socket callback while the
        # watcher waits (its handler): turn that off, so every batch reaches the task
        # and the hook above.
        sub = watcher._sub
        real_set = sub.set_handler
        real_set(None)
        sub.set_handler = lambda handler: real_set(None)

    def release(self) -> None:
        self.on = False
        self.go.set()


async def test_register_reads_nothing_before_the_script(
    writer: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A register of a new instance and a re-register of a known one send no MGET: the
    script decides the ordering (after_newest) itself. Failed before: one MGET each."""
    reads: list[Any] = []
    real_mget = writer.redis.mget

    async def mget(*args: Any) -> Any:
        reads.append(args)
        return await real_mget(*args)

    monkeypatch.setattr(writer.redis, "mget", mget)
    first, _ = await writer.register(Registration("pay", "http://10.0.0.1:80"))
    again, _ = await writer.register(
        Registration("pay", "http://10.0.0.1:80", capabilities=("rest",))
    )
    assert reads == []
    assert (again.incarnation, again.seq) == (first.incarnation, first.seq + 1)
    assert again.capabilities == ("rest",)


async def test_register_above_a_tombstone_ahead_of_the_clock(
    writer: Writer, mirror: Mirror, redis_url: str
) -> None:
    """A tombstone newer than the writer's clock (another writer's clock ahead, an
    agent's incarnation) makes the first attempt stale; the writer then reads it and
    registers above it."""
    sid = "t1"
    ahead = writer.clock.tick() + 10**12
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(Keys("default").tomb("ledger", sid), f"{ahead}:3", px=600_000)
    finally:
        await client.aclose()
    inst, _ = await writer.register(Registration("ledger", "http://10.0.0.2:80", service_id=sid))
    assert (inst.incarnation, inst.seq) == (ahead + 1, 1)
    assert [i.service_id for i in mirror.instances("ledger")] == [sid]


def _drain(stream: ChangeStream) -> list[Change]:
    """The changes the stream holds now (the mirror emits them synchronously)."""
    out: list[Change] = list(stream._buffer)
    stream._buffer.clear()
    return out


async def _until(ok: Callable[[], bool]) -> None:
    await eventually(ok, 10)


async def test_register_is_answered_from_the_scripts_reply_before_the_feed(
    writer: Writer, mirror: Mirror
) -> None:
    """With the mirror's feed held, a register still returns, and the view already shows
    it (read-your-writes from the script's reply); the feed message that follows is a
    no-op. Failed before: the writer waited for the feed (a view timeout)."""
    seen = mirror.stats.feed_changes
    first, _ = await writer.register(Registration("pay", "http://10.0.0.1:80"))
    await _until(lambda: mirror.stats.feed_changes > seen)  # the view is up to date
    await mirror.wait_until(lambda m: not m.stale)  # a stale view waits for the feed
    held = HeldFeed(mirror)
    async with mirror.changes() as stream:
        with anyio.fail_after(10):
            inst, _ = await writer.register(
                Registration("pay", "http://10.0.0.1:80", metadata={"zone": "z1"})
            )
        assert writer.view_timeouts == 0
        assert mirror.instances("pay") == [inst]
        assert inst.metadata == {"zone": "z1"} and inst.seq == first.seq + 1
        assert [type(c).__name__ for c in _drain(stream)] == ["Updated"]
        applied = mirror.stats.feed_changes
        held.release()
        await _until(lambda: mirror.stats.feed_changes > applied)
        assert mirror.instances("pay") == [inst]
        assert _drain(stream) == []  # the feed message changed nothing


async def test_deregister_is_shown_from_the_scripts_reply_before_the_feed(
    writer: Writer, mirror: Mirror
) -> None:
    """A DELETE with the feed held returns with the instance already gone from the view."""
    seen = mirror.stats.feed_changes
    inst, _ = await writer.register(Registration("pay", "http://10.0.0.1:80"))
    await _until(lambda: mirror.stats.feed_changes > seen)
    await mirror.wait_until(lambda m: not m.stale)
    held = HeldFeed(mirror)
    with anyio.fail_after(10):
        assert await writer.deregister("pay", None) == [inst.service_id]
    assert mirror.instances("pay") == [] and writer.view_timeouts == 0
    held.release()


async def test_a_change_the_view_has_not_seen_yet_is_never_undone(
    writer: Writer, mirror: Mirror, registrar: Registrar, redis_url: str
) -> None:
    """When another writer's change is still in the feed ahead of the register's, the
    writer waits for the feed instead of showing its record first: the view never goes
    from the register's record back to the older one."""
    applied = registrar.stats.applied
    async with Agent(redis_url, "ledger", "http://10.3.3.3:80", ttl=30) as agent:
        await mirror.wait_for("ledger", timeout=10)
        before = mirror.instances("ledger")
        held = HeldFeed(mirror)
        async with mirror.changes() as stream:
            updated = applied["updated"]
            await agent.update(capabilities=["rest", "v2"])  # applied; its feed message held
            await _until(lambda: applied["updated"] == updated + 1)
            answer: list[Instance] = []
            async with anyio.create_task_group() as tg:

                async def register() -> None:
                    inst, _ = await writer.register(
                        Registration(
                            "ledger",
                            "http://10.3.3.3:80",
                            service_id=agent.service_id,
                            capabilities=("rest", "v3"),
                        )
                    )
                    answer.append(inst)

                tg.start_soon(register)
                # The script applied it; the writer then waits, the view unchanged.
                await _until(lambda: applied["updated"] == updated + 2)
                assert not answer
                assert mirror.instances("ledger") == before
                held.release()
            assert mirror.instances("ledger") == answer
            caps = [c.instance.capabilities for c in _drain(stream)]
            assert caps == [("rest", "v2"), ("rest", "v3")]
