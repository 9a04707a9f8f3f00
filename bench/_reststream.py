"""The REST-stream client beside the Redis mirror: both timed on the same record changes.

``measure`` moves one instance ``rounds`` times (a heartbeat with a new URL,
sent as an Agent would) and records, per change, how long until (a) a push
:class:`Mirror` in this process and (b) each of ``clients`` REST-mode
:class:`AsyncSagaServiceDiscovery` clients (only ``saga_url``: they follow
the gateway's ``GET /api/v1/watch``) answer the new URL. For (b) the time is
when the client's stream view shows the new URL; ``discover_service`` then
answers it from that view without a request, which is checked (a GET would
show as a poll answer).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from saga_events import AsyncSagaServiceDiscovery, Mirror


async def measure(
    mirror: Mirror,
    base_url: str,
    name: str,
    send_move: Callable[[int, str], None],
    rounds: int,
    clients: int,
    bar: Any,
) -> dict[str, Any]:
    mirror_s: list[float] = []
    stream_s: list[float] = []
    polled = 0
    async with contextlib.AsyncExitStack() as stack:
        sagas = [
            await stack.enter_async_context(AsyncSagaServiceDiscovery(base_url, timeout=10))
            for _ in range(clients)
        ]
        followers = []
        for saga in sagas:
            await saga.discover_service(name)  # starts its follower
            backend: Any = saga._backend
            assert backend._follower is not None, "the gateway has no watch stream"
            followers.append(backend._follower)
        for i in range(rounds):
            url = f"http://10.9.1.{i % 250}:{8000 + i}"

            def has(f: Any, url: str = url) -> bool:
                return any(x["service_url"] == url for x in f.instances(name))

            def in_mirror(m: Mirror, url: str = url) -> bool:
                return any(x.service_url == url for x in m.instances(name))

            done: list[float] = []
            mirror_done: list[float] = []
            async with anyio.create_task_group() as tg:
                for f in followers:
                    tg.start_soon(_stamp, f.wait_until, has, done)
                tg.start_soon(_stamp, mirror.wait_until, in_mirror, mirror_done)
                await anyio.lowlevel.checkpoint()  # the waiters park before the change
                t0 = time.monotonic()
                send_move(i, url)
            mirror_s.extend(t - t0 for t in mirror_done)
            stream_s.extend(t - t0 for t in done)
            for saga in sagas:
                before = saga._backend.poll_answers  # type: ignore[attr-defined]
                got = await saga.discover_service(name)
                assert got.service_url == url, (got.service_url, url)
                polled += saga._backend.poll_answers - before  # type: ignore[attr-defined]
            bar.update(1)
    return {"mirror_s": mirror_s, "stream_s": stream_s, "polled": polled}


async def _stamp(wait: Callable[..., Any], predicate: Any, out: list[float]) -> None:
    await wait(predicate, 10)
    out.append(time.monotonic())
