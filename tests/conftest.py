"""Fixtures: every integration test gets its own real redis-server on a free port."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import warnings
import weakref
from collections.abc import AsyncIterator, Iterator

import pytest

from saga_events import Mirror, Registrar
from saga_events.embedded import RedisServer

#: writers already named (one still referenced is named by the test that left it only)
_reported: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()


def _leaked_writers() -> list[str]:
    """Each asyncio StreamWriter still open whose event loop has closed: a connection
    a test dropped without closing (where it was opened, with PYTHONTRACEMALLOC=25)."""
    found: list[str] = []
    for obj in gc.get_objects():
        if not isinstance(obj, asyncio.StreamWriter):
            continue
        if not obj._loop.is_closed() or obj.transport.is_closing():
            continue
        if obj in _reported:
            continue
        _reported.add(obj)
        peer = obj.get_extra_info("peername")
        # The socket's allocation (3.11 cannot trace an object with a managed __dict__).
        where = tracemalloc.get_object_traceback(obj.get_extra_info("socket")._sock)
        opened = (
            "\n".join(where.format(limit=16, most_recent_first=True))
            if where is not None
            else "(run with PYTHONTRACEMALLOC=25 to see where)"
        )
        found.append(f"a connection to {peer} left open, opened at:\n{opened}")
    return found


@pytest.fixture(autouse=True)
def no_leaked_connections() -> Iterator[None]:
    """Fail the test that drops a connection without closing it (asyncio's "loop is
    closed" ResourceWarning would otherwise fire at a random later test's gc)."""
    yield
    leaks = _leaked_writers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # named below, once
        gc.collect()
    if leaks:
        pytest.fail("\n\n".join(leaks), pytrace=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio runs on asyncio only


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private, empty redis-server (temp dir, no persistence), stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def registrar(redis_url: str) -> AsyncIterator[Registrar]:
    async with Registrar(redis_url, rebuild_wait=0.2) as reg:
        yield reg


@pytest.fixture
async def mirror(redis_url: str, registrar: Registrar) -> AsyncIterator[Mirror]:
    async with Mirror(redis_url) as m:
        yield m
