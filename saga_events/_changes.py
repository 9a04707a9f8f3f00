"""The mirror's change streams: what ``Mirror.changes()`` returns (internal).

One job: hand every change applied to the view to each consumer, in order,
through a bounded buffer. Contract:

* :meth:`ChangeStream.push` is synchronous (the watcher calls it once per
  batch applied) and wakes a waiting consumer with one future per batch.
* A consumer takes buffered changes without a loop turn (an anyio memory
  stream takes a checkpoint, an ``Event`` and a wakeup per item: two loop
  turns per change), and yields to the loop every :data:`_YIELD_EVERY`
  changes so a consumer with a long backlog cannot starve other tasks.
* A consumer that falls :data:`CHANGE_BUFFER` changes behind gets the
  changes buffered so far, then :class:`ChangesOverflow`; the stream ends
  (``StopAsyncIteration``) when the mirror closes or the consumer calls
  ``aclose()``.

asyncio only, as the mirror's wire path (:mod:`saga_events._wire`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from .view import Change

__all__ = ["CHANGE_BUFFER", "ChangeStream", "ChangesOverflow"]

CHANGE_BUFFER: Final = 10_000
#: buffered changes taken in a row before a consumer yields to the loop once
_YIELD_EVERY: Final = 64


class ChangesOverflow(Exception):
    """Raised in a ``changes()`` consumer that fell more than the buffer behind."""


class ChangeStream:
    """The async iterator returned by :meth:`Mirror.changes`; close it with ``aclose()``
    or use it as an async context manager."""

    __slots__ = ("_buffer", "_ended", "_forget", "_overflowed", "_run", "_waiter")

    def __init__(self, forget: Callable[[ChangeStream], None]) -> None:
        self._buffer: deque[Change] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._overflowed = False
        self._run = 0
        self._forget = forget

    # -- the mirror's side ---------------------------------------------------------

    def push(self, changes: list[Change]) -> bool:
        """Buffer ``changes`` and wake the consumer; False once the stream has ended
        (closed, or overflowed by this very call: the mirror then forgets it)."""
        if self._ended:
            return False
        buffer = self._buffer
        room = CHANGE_BUFFER - len(buffer)
        if len(changes) > room:
            buffer.extend(changes[:room])
            self._overflowed = True
            self.end()
            return False
        buffer.extend(changes)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def end(self) -> None:
        """No more changes: the consumer takes what is buffered, then stops."""
        self._ended = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the consumer's side -------------------------------------------------------

    def __aiter__(self) -> ChangeStream:
        return self

    async def __anext__(self) -> Change:
        buffer = self._buffer
        if buffer:
            self._run += 1
            if self._run < _YIELD_EVERY:
                return buffer.popleft()
            self._run = 0
            await asyncio.sleep(0)
            if buffer:
                return buffer.popleft()
        self._run = 0
        while not buffer:
            if self._ended:
                if self._overflowed:
                    raise ChangesOverflow(f"consumer fell {CHANGE_BUFFER} changes behind")
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        return buffer.popleft()

    async def aclose(self) -> None:
        self._forget(self)
        self._buffer.clear()
        self._overflowed = False
        self.end()

    async def __aenter__(self) -> ChangeStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
