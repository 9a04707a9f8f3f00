"""Bounded polling for conditions that have no event to await (internal)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

Check = Callable[[], Awaitable[Any] | Any]


async def eventually(
    check: Check,
    timeout: float = 10.0,  # noqa: ASYNC109 - the bound is the point of this helper
    *,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that.

    For state that has no event to await (Redis keys, another process's
    counters); for a mirror's view use :meth:`Mirror.wait_until`, which wakes
    on each change. Raises TimeoutError naming ``what`` after ``timeout`` s.
    """
    with anyio.move_on_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await anyio.sleep(interval)
    raise TimeoutError(f"{what} not reached in {timeout} s")
