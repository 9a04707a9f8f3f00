"""A poll-and-cache discovery client: the pattern the seed document recommends.

It asks the registry over HTTP (``GET /api/v1/services/{name}``) and keeps
the answer for ``cache_ttl`` seconds (30 by default, as in the seed). A hit
is a dictionary lookup; a miss is one round trip; an answer can be up to
``cache_ttl`` old. Written for these benchmarks; unlike the seed's snippet it
keeps one HTTP connection open instead of opening a session per miss, which
only makes its misses cheaper.

When the gateway is not available, ``redis_fetch`` reads the record straight
from Redis instead, so the cache's behaviour can still be measured.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

Fetch = Callable[[str], Awaitable[dict[str, Any]]]


class PollCacheClient:
    """Discover a service, caching each answer for ``cache_ttl`` seconds."""

    def __init__(self, fetch: Fetch, cache_ttl: float = 30.0) -> None:
        self._fetch = fetch
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self.hits = 0
        self.misses = 0

    async def discover(self, name: str) -> dict[str, Any]:
        now = time.monotonic()
        entry = self._cache.get(name)
        if entry is not None and now - entry[0] < self.cache_ttl:
            self.hits += 1
            return entry[1]
        self.misses += 1
        service = await self._fetch(name)
        self._cache[name] = (now, service)
        return service


def http_fetch(client: Any) -> Fetch:
    """Fetch from the HTTP gateway with an ``httpx.AsyncClient`` (base_url set)."""

    async def fetch(name: str) -> dict[str, Any]:
        response = await client.get(f"/api/v1/services/{name}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    return fetch


def redis_fetch(redis: Any, key_of: Callable[[str], str]) -> Fetch:
    """Fetch one instance record straight from Redis (when there is no gateway)."""
    import msgspec

    async def fetch(name: str) -> dict[str, Any]:
        raw = await redis.get(key_of(name))
        if raw is None:
            raise LookupError(name)
        result: dict[str, Any] = msgspec.json.decode(raw)
        return result

    return fetch
