"""Fixtures: every integration test gets its own real redis-server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from saga_events import Mirror, Registrar
from saga_events.embedded import RedisServer


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
