"""The mirror's change streams (``Mirror.changes()``), without a server."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from saga_events._changes import CHANGE_BUFFER, ChangesOverflow, ChangeStream
from saga_events.model import Instance
from saga_events.view import Added, Change, Removed

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def added(i: int) -> Change:
    return Added(
        Instance(
            incarnation=1, seq=1, registered_at_ms=0, service_name="s", service_id=f"i{i}",
            service_url="http://h:1",
        ),
    )  # fmt: skip


def stream() -> tuple[ChangeStream, list[ChangeStream]]:
    forgotten: list[ChangeStream] = []
    return ChangeStream(forgotten.append), forgotten


async def test_changes_come_in_order_and_a_waiting_consumer_wakes() -> None:
    s, _ = stream()
    got: list[Change] = []

    async def consume() -> None:
        async for change in s:
            got.append(change)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        batches = [[added(i) for i in range(n, n + 100)] for n in range(0, 300, 100)]
        for batch in batches:
            assert s.push(batch)
            await anyio.wait_all_tasks_blocked()
        s.end()
    assert got == [c for batch in batches for c in batch]


async def test_a_consumer_with_a_backlog_still_lets_other_tasks_run() -> None:
    s, _ = stream()
    s.push([added(i) for i in range(1000)])
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        for _ in range(1000):
            await s.__anext__()
        tg.cancel_scope.cancel()
    assert ticks >= 10


async def test_a_consumer_that_falls_behind_gets_what_was_buffered_then_overflow() -> None:
    s, _ = stream()
    assert s.push([added(i) for i in range(CHANGE_BUFFER - 1)])
    assert not s.push([added(-1), added(-2)])  # one fits, one does not
    assert not s.push([added(-3)])  # ended: nothing more
    seen = 0
    with pytest.raises(ChangesOverflow):
        async for _ in s:
            seen += 1
    assert seen == CHANGE_BUFFER


async def test_aclose_and_end_stop_the_iteration() -> None:
    s, forgotten = stream()
    s.push([added(1)])
    async with s:
        assert await s.__anext__() == added(1)
    assert forgotten == [s]
    with pytest.raises(StopAsyncIteration):
        await s.__anext__()
    other, _ = stream()

    async def wait_then_end() -> None:
        await anyio.wait_all_tasks_blocked()
        other.push([Removed(added(1).instance)])
        other.end()

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_then_end)
        assert [c async for c in other] == [Removed(added(1).instance)]
