"""The watch stream's frames and per-watcher queues (internal to :mod:`saga_events.web.watch`).

One job: an SSE frame's bytes, and a watcher's bounded queue that the hub
fills without blocking and the watcher's stream drains, waking once per
batch. Runs on the gateway's asyncio loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

KEEPALIVE_FRAME: Final = b": keep-alive\n\n"


def sse_frame(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One SSE frame; ``data`` must hold no newline (compact JSON holds none)."""
    head = b"id: " + event_id.encode() + b"\n" if event_id is not None else b""
    return head + b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


@dataclass(frozen=True, slots=True)
class Event:
    n: int
    service: str | None  # None: for every watcher
    frame: bytes


KEEPALIVE: Final = Event(0, None, KEEPALIVE_FRAME)


class Watcher:
    """One watcher's queue: a bounded deque and, while its stream waits, a future.

    Cheaper per event than a memory object stream (one ``call_soon`` to wake the
    stream's task, no objects per receive): the hub pushes every change to every
    watcher.
    """

    __slots__ = ("closed", "last", "overflow", "queue", "service", "size", "waiter")

    def __init__(self, service: str | None, size: int) -> None:
        self.service = service
        self.size = size
        self.queue: deque[Event] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.overflow: str | None = None
        self.last = time.monotonic()  # when something was last queued for it

    def wants(self, event: Event) -> bool:
        return event.service is None or self.service is None or event.service == self.service

    def put(self, event: Event) -> bool:
        """Queue ``event``; False when the queue is full (nothing queued)."""
        if len(self.queue) >= self.size:
            return False
        self.queue.append(event)
        self._wake()
        return True

    def close(self) -> None:
        """No more events: the stream sends what is queued, then ends."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def frames(self) -> bytes | None:
        """Every queued frame in one piece, waiting for one; None once closed and empty."""
        while not self.queue:
            if self.closed:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        queue = self.queue
        if len(queue) == 1:
            return queue.popleft().frame
        out = b"".join([e.frame for e in queue])
        queue.clear()
        return out
