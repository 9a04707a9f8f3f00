"""The gateway serves once the registry has settled: a registrar's first start on an
empty Redis rebuilds (its epoch is "rebuilding" for ``rebuild_wait``), and the
rebuild's end makes every mirror resync; a gateway that served before it would answer
its first clients from a view about to go stale (a REST client following its watch
stream then answers from its cache right after a register)."""

from __future__ import annotations

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from saga_events import Registrar
from saga_events._wait import eventually
from saga_events.identity import parse_epoch
from saga_events.web import run_gateway

pytestmark = pytest.mark.anyio


async def test_the_gateway_serves_after_the_first_rebuild(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(redis_url, rebuild_wait=1.5) as registrar:
            # The rebuild is running: the registrar is up, its epoch is "rebuilding".
            async def rebuilding() -> bool:
                epoch = parse_epoch(await client.get(registrar.keys.epoch))
                return epoch is not None and epoch.rebuilding

            await eventually(rebuilding, 10, what="the first rebuild")
            async with anyio.create_task_group() as tg:
                with anyio.fail_after(30):
                    host, port = await tg.start(
                        run_gateway, registrar, redis_url, "127.0.0.1", 0, None
                    )
                epoch = parse_epoch(await client.get(registrar.keys.epoch))
                assert epoch is not None and not epoch.rebuilding
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
                    answer = (await http.get("/api/v1/services")).json()
                assert answer["stale"] is False
                tg.cancel_scope.cancel()
    finally:
        await client.aclose()
