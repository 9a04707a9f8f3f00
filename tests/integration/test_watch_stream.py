"""GET /api/v1/watch (Server-Sent Events) against a real redis-server, registrar and uvicorn."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from saga_events import Mirror, Registrar, model
from saga_events._wait import eventually
from saga_events.embedded import RedisServer
from saga_events.sse_client import SSEEvent, SSEParser
from tests.gateway_helpers import Served, serve_gateway

pytestmark = pytest.mark.anyio

REGISTER = "/api/v1/services/register"
INSTANCE_KEYS = {
    "service_id",
    "service_name",
    "service_url",
    "capabilities",
    "registered_at",
    "last_heartbeat",
    "metadata",
    "ttl_seconds",
    "draining",
}


class Reader:
    """Reads SSE events off a streaming httpx response, each read bounded."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.parser = SSEParser()
        self._chunks = response.aiter_text()
        self._ready: deque[SSEEvent] = deque()
        self.ended = False

    async def _more(self) -> None:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.ended = True
            raise
        self._ready.extend(self.parser.feed(chunk))

    async def next(self, timeout: float = 10.0) -> SSEEvent:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while not self._ready:
                await self._more()
        return self._ready.popleft()

    async def until(self, pred: Callable[[SSEEvent], bool], timeout: float = 10.0) -> SSEEvent:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while True:
                event = await self.next(timeout)
                if pred(event):
                    return event

    async def change(self, timeout: float = 10.0) -> SSEEvent:  # noqa: ASYNC109
        """The next event that is not stale/current (the view may lag under load)."""
        return await self.until(lambda e: e.event not in ("stale", "current"), timeout)

    async def comments(self, at_least: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        with anyio.fail_after(timeout):
            while self.parser.comments < at_least:
                await self._more()


@asynccontextmanager
async def watching(
    served: Served, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[Reader]:
    async with served.client.stream(
        "GET", "/api/v1/watch", params=params, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Reader(response)


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


async def register(served: Served, name: str, url: str, **extra: Any) -> dict[str, Any]:
    r = await served.client.post(REGISTER, json={"service_name": name, "service_url": url, **extra})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def data(event: SSEEvent) -> Any:
    return msgspec.json.decode(event.data)


async def test_watch_starts_with_snapshot_then_added_and_removed(served: Served) -> None:
    """The stream opens with every live instance, then shows a register and a DELETE."""
    first = await register(served, "orders", "http://10.0.0.1:80", capabilities=["rest"])
    async with watching(served) as reader:
        snap = await reader.change()
        assert snap.event == "snapshot"
        body = data(snap)
        assert body["count"] == 1 and body["stale"] is False
        [inst] = body["services"]["orders"]
        assert set(inst) == INSTANCE_KEYS
        assert inst["service_id"] == first["service_id"]
        assert reader.parser.retry == 1000

        second = await register(served, "billing", "http://10.0.0.2:80", metadata={"zone": "b"})
        added = await reader.change()
        assert added.event == "added"
        assert data(added)["service_id"] == second["service_id"]
        assert data(added)["metadata"] == {"zone": "b"}

        r = await served.client.delete("/api/v1/services/billing")
        assert r.status_code == 200, r.text
        removed = await reader.change()
        assert removed.event == "removed"
        assert data(removed)["service_id"] == second["service_id"]

        ids = [e.id for e in (snap, added, removed)]
        hub = served.gateway.watch_hub
        assert all(i is not None and i.startswith(hub.hub_id + "-") for i in ids), ids
        nums = [int(str(i).rsplit("-", 1)[1]) for i in ids]
        assert nums == sorted(nums) and len(set(nums)) == 3, ids
        assert hub.watchers == 1
    await eventually(lambda: served.gateway.watch_hub.watchers == 0, what="watcher gone")


async def test_watch_updated_when_a_record_changes(served: Served) -> None:
    """Re-registering with new metadata is an updated event carrying the new record."""
    await register(served, "orders", "http://10.0.0.1:80", service_id="o1", metadata={"v": "1"})
    async with watching(served) as reader:
        assert (await reader.change()).event == "snapshot"
        await register(served, "orders", "http://10.0.0.1:80", service_id="o1", metadata={"v": "2"})
        event = await reader.change()
        assert event.event == "updated"
        assert data(event)["metadata"] == {"v": "2"}


async def test_watch_narrowed_to_one_service(served: Served) -> None:
    """?service= leaves other services out of the snapshot and of the events."""
    await register(served, "orders", "http://10.0.0.1:80")
    await register(served, "billing", "http://10.0.0.2:80")
    async with watching(served, params={"service": "billing"}) as reader:
        snap = data(await reader.change())
        assert list(snap["services"]) == ["billing"] and snap["count"] == 1
        # Events keep their order: an orders event, were it sent, would come first.
        await register(served, "orders", "http://10.0.0.3:80")
        await register(served, "billing", "http://10.0.0.4:80")
        event = await reader.change()
        assert event.event == "added"
        assert data(event)["service_url"] == "http://10.0.0.4:80"


async def test_watch_rejects_a_bad_service_name(served: Served) -> None:
    """A service filter that is not a name is a 400 saying so, not an empty stream."""
    r = await served.client.get("/api/v1/watch", params={"service": "bad name!"})
    assert r.status_code == 400, r.text
    assert "service" in r.text


async def test_watch_resumes_after_last_event_id_without_a_snapshot(served: Served) -> None:
    """A reconnect with the last id gets exactly the events missed meanwhile."""
    await register(served, "orders", "http://10.0.0.1:80")
    async with watching(served) as reader:
        last = (await reader.change()).id
    assert last is not None
    await register(served, "billing", "http://10.0.0.2:80")
    await register(served, "orders", "http://10.0.0.3:80")
    r = await served.client.delete("/api/v1/services/billing")
    assert r.status_code == 200, r.text

    async with watching(served, headers={"Last-Event-ID": last}) as reader:
        got = [await reader.change() for _ in range(3)]
        assert [e.event for e in got] == ["added", "added", "removed"]
        assert [data(e)["service_url"] for e in got] == [
            "http://10.0.0.2:80",
            "http://10.0.0.3:80",
            "http://10.0.0.2:80",
        ]
        # And it goes on live from there.
        await register(served, "shipping", "http://10.0.0.5:80")
        assert data(await reader.change())["service_name"] == "shipping"


async def test_watch_unknown_last_event_id_starts_with_a_snapshot(served: Served) -> None:
    """An id from another gateway (or a restart, or too old) gets a fresh snapshot."""
    await register(served, "orders", "http://10.0.0.1:80")
    hub = served.gateway.watch_hub
    for stale_id in ("0123abcd-1", f"{hub.hub_id}-999999", "garbage"):
        async with watching(served, headers={"Last-Event-ID": stale_id}) as reader:
            snap = await reader.change()
            assert snap.event == "snapshot", stale_id
            assert data(snap)["count"] == 1


async def test_watch_resume_past_the_ring_starts_with_a_snapshot(served: Served) -> None:
    """When the events since the id fell out of the ring, the reconnect gets a snapshot."""
    hub = served.gateway.watch_hub
    hub._ring = type(hub._ring)(hub._ring, maxlen=2)  # a tiny ring for this test
    async with watching(served) as reader:
        last = (await reader.change()).id
    assert last is not None
    for i in range(4):
        await register(served, f"svc{i}", f"http://10.0.1.{i}:80")
    async with watching(served, headers={"Last-Event-ID": last}) as reader:
        snap = await reader.change()
        assert snap.event == "snapshot"
        assert data(snap)["count"] == 4


async def test_watch_keepalive_comment(served: Served) -> None:
    """A quiet stream carries keep-alive comments."""
    served.gateway.watch_hub.keepalive = 0.05
    async with watching(served) as reader:
        assert (await reader.change()).event == "snapshot"
        await reader.comments(2)


async def test_watch_needs_no_token_on_a_guarded_gateway(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """The stream is a read: no token, as for the other reads."""
    async with serve_gateway(registrar, mirror, redis_url, token="s3cret") as guarded:
        async with watching(guarded) as reader:
            assert (await reader.change()).event == "snapshot"


async def bulk_register(registrar: Registrar, count: int) -> None:
    """``count`` instances of ~12 KB each (a few hundred fill the socket buffers)."""
    big = "x" * 12_000
    now = time.time_ns() // 1000
    events: list[model.AnyEvent] = [
        model.Register(
            service_name="bulk",
            service_id=f"b{i}",
            incarnation=now,
            seq=1,
            service_url=f"http://10.1.{i // 250}.{i % 250}:80",
            metadata={"pad": big},
        )
        for i in range(count)
    ]
    for chunk in range(0, count, 50):
        await registrar.apply_many(events[chunk : chunk + 50])


async def test_watch_slow_reader_gets_overflow_and_the_stream_ends(
    served: Served, registrar: Registrar
) -> None:
    """A reader that stops reading is cut off with a final overflow event, not buffered."""
    hub = served.gateway.watch_hub
    hub.queue_size = 4
    count = 400
    async with watching(served) as reader:
        assert (await reader.change()).event == "snapshot"
        start = hub._n
        await bulk_register(registrar, count)
        # The hub has seen every change: the reader, which read nothing, overflowed.
        await eventually(lambda: hub._n - start >= count, timeout=30, what="hub saw all")
        await eventually(lambda: hub.overflows == 1, timeout=10, what="overflow")

        # (the mirror may turn stale meanwhile under this load: stale/current pass by)
        seen = await reader.until(
            lambda e: e.event not in ("added", "stale", "current"), timeout=60
        )
        assert seen.event == "overflow", seen
        assert "behind" in data(seen)["reason"]
        assert seen.id is not None and int(seen.id.rsplit("-", 1)[1]) < start + count
        with pytest.raises(StopAsyncIteration):
            with anyio.fail_after(10):
                while True:
                    await reader._more()
    await eventually(lambda: hub.watchers == 0, what="watcher gone")


async def test_watch_drops_a_reader_that_stops_reading(
    served: Served, registrar: Registrar
) -> None:
    """A reader that reads nothing more is dropped once a write waits send_timeout."""
    hub = served.gateway.watch_hub
    hub.queue_size = 4
    hub.send_timeout = 0.5
    async with watching(served) as reader:
        assert (await reader.change()).event == "snapshot"
        await bulk_register(registrar, 400)
        await eventually(lambda: hub.watchers == 0, timeout=30, what="stuck reader dropped")


async def test_watch_tells_stale_and_current(served: Served, redis_server: RedisServer) -> None:
    """When the gateway's view loses Redis the stream says stale, and current once back."""
    await register(served, "orders", "http://10.0.0.1:80")
    async with watching(served) as reader:
        assert data(await reader.change())["stale"] is False
        redis_server.kill()
        stale = await reader.until(lambda e: e.event in ("stale", "current"), timeout=30)
        assert stale.event == "stale" and data(stale) == {"stale": True}
        redis_server.start()
        current = await reader.until(lambda e: e.event in ("stale", "current"), timeout=60)
        assert current.event == "current" and data(current) == {"stale": False}
