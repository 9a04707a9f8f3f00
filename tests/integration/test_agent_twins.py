"""Agent and SyncAgent are twins (issue 10): the same scenario passes on both.

register, update, a refused update, drain, leave, register again, exit; the
sync twin's calls run in a worker thread, as a Flask handler would make them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import anyio.to_thread
import pytest

from saga_events import Agent, InvalidEvent, Mirror, Registrar, SyncAgent

pytestmark = pytest.mark.anyio

T = TypeVar("T")


class Twin(Protocol):
    registered: bool
    last_error: str | None
    service_id: str

    async def update(self, **changes: Any) -> bool: ...
    async def drain(self) -> bool: ...
    async def leave(self) -> bool: ...
    async def announce(self, kind: str = "heartbeat") -> bool: ...


class AsyncTwin:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    registered = property(lambda self: self.agent.registered)
    last_error = property(lambda self: self.agent.last_error)
    service_id = property(lambda self: self.agent.service_id)

    async def update(self, **changes: Any) -> bool:
        return await self.agent.update(**changes)

    async def drain(self) -> bool:
        return await self.agent.drain()

    async def leave(self) -> bool:
        return await self.agent.leave()

    async def announce(self, kind: str = "heartbeat") -> bool:
        return await self.agent.announce(kind)


class SyncTwin:
    """Every call made from a worker thread (the loop of the test must keep running)."""

    def __init__(self, agent: SyncAgent) -> None:
        self.agent = agent

    registered = property(lambda self: self.agent.registered)
    last_error = property(lambda self: self.agent.last_error)
    service_id = property(lambda self: self.agent.service_id)

    async def _in_thread(self, func: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(func)

    async def update(self, **changes: Any) -> bool:
        return await self._in_thread(lambda: self.agent.update(**changes))

    async def drain(self) -> bool:
        return await self._in_thread(self.agent.drain)

    async def leave(self) -> bool:
        return await self._in_thread(self.agent.leave)

    async def announce(self, kind: str = "heartbeat") -> bool:
        return await self._in_thread(lambda: self.agent.announce(kind))


@asynccontextmanager
async def twin(kind: str, redis_url: str, **kwargs: Any) -> AsyncIterator[Twin]:
    args = (redis_url, "twin", "http://10.0.0.70:80")
    if kind == "async":
        async with Agent(*args, **kwargs) as agent:
            yield AsyncTwin(agent)
    else:
        sync = SyncAgent(*args, **kwargs)
        await anyio.to_thread.run_sync(sync.start)
        try:
            yield SyncTwin(sync)
        finally:
            await anyio.to_thread.run_sync(sync.close)


def only(mirror: Mirror) -> Mapping[str, Any] | None:
    insts = mirror.instances("twin")
    if len(insts) != 1:
        return None
    i = insts[0]
    return {"id": i.service_id, "url": i.service_url, "meta": i.metadata, "draining": i.draining}


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_twins_register_update_drain_leave(
    kind: str, redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    async with twin(kind, redis_url, capabilities=["rest"], ttl=3.0) as agent:
        await mirror.wait_until(lambda m: only(m) is not None, timeout=10)
        assert agent.registered and agent.last_error is None
        sid = agent.service_id

        assert await agent.update(service_url="http://10.0.0.71:80", metadata={"v": "2"})
        await mirror.wait_until(
            lambda m: (
                only(m)
                == {"id": sid, "url": "http://10.0.0.71:80", "meta": {"v": "2"}, "draining": False}
            ),
            timeout=10,
        )
        with pytest.raises(InvalidEvent):
            await agent.update(capabilities=["has space"])

        assert await agent.drain()
        await mirror.wait_until(lambda m: (only(m) or {}).get("draining") is True, timeout=10)

        assert await agent.leave()
        assert not agent.registered
        await mirror.wait_until(lambda m: not m.instances("twin"), timeout=10)

        assert await agent.announce("register")  # registers again after a leave
        await mirror.wait_until(lambda m: only(m) is not None, timeout=10)
    await mirror.wait_until(lambda m: not m.instances("twin"), timeout=10)
