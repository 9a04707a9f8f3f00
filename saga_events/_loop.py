"""The event loop a long-running saga-events process runs on (internal).

One job: ``run(func, *args)`` is ``anyio.run`` on asyncio's own loop, or on
uvloop when ``SAGA_EVENTS_LOOP=uvloop`` (``pip install 'saga-events[fast]'``;
an ImportError says so when it is missing). asyncio stays the default: for
the registrar, paired runs measured no gain from uvloop (docs/BENCHMARKS.md,
"Registrar": its time goes to the socket syscalls, which are the same on
both loops, and to decoding and packing, which are not the loop's).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

ENV: str = "SAGA_EVENTS_LOOP"


def backend_options() -> dict[str, Any]:
    """anyio's asyncio backend options for this process's loop."""
    choice = os.environ.get(ENV, "asyncio").strip().lower()
    if choice != "uvloop":
        return {}
    if importlib.util.find_spec("uvloop") is None:
        raise ImportError(
            f"{ENV}=uvloop but uvloop is not installed: pip install 'saga-events[fast]'"
        )
    return {"use_uvloop": True}


def run(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)`` on the loop :func:`backend_options` picks."""
    return anyio.run(func, *args, backend="asyncio", backend_options=backend_options())
