"""Run async parts from synchronous code in a background event-loop thread (internal).

Contract: one :class:`PortalOwner` per blocking twin (SyncAgent, SyncMirror,
SagaServiceDiscovery). The twin builds its async object in the loop's thread
(:meth:`PortalOwner.build`), enters it there (:meth:`PortalOwner.enter`) and
forwards every call (:meth:`PortalOwner.call`): one implementation, the async
one. Not thread-safe on its own: a twin shared between threads guards
start and stop with its own lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeVar

import anyio.from_thread
from anyio.from_thread import BlockingPortal

T = TypeVar("T")


class PortalOwner:
    """Owns one blocking portal (a thread running an asyncio loop) and its lifetime."""

    def __init__(self) -> None:
        self._cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._entered: list[AbstractContextManager[Any]] = []

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            self._cm = anyio.from_thread.start_blocking_portal("asyncio")
            self._portal = self._cm.__enter__()
        return self._portal

    def call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run a coroutine function in the portal's loop and return its result."""
        return self.portal.call(func, *args)

    def build(self, factory: Callable[[], T]) -> T:
        """Call a plain function in the loop's thread (to build loop-bound objects)."""
        return self.portal.call(factory)

    def enter(self, acm: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager in one task of the loop, kept until :meth:`stop`.

        Task groups must be entered and exited by the same task, so the portal's
        context-manager wrapper is used rather than two separate calls.
        """
        wrapped = self.portal.wrap_async_context_manager(acm)
        value = wrapped.__enter__()
        self._entered.append(wrapped)
        return value

    def stop(self) -> None:
        """Exit what :meth:`enter` entered (newest first), then stop the loop's thread.

        The thread is stopped even when an exit raises (the error is re-raised).
        """
        try:
            while self._entered:
                self._entered.pop().__exit__(None, None, None)
        finally:
            if self._cm is not None:
                cm, self._cm, self._portal = self._cm, None, None
                cm.__exit__(None, None, None)
