"""The event loop a long-running saga-events process runs on (internal).

One job: ``run(func, *args)`` is ``anyio.run`` on uvloop when uvloop is
installed (the ``fast`` extra, also in ``server``), on asyncio's own loop
otherwise. Measured for the registrar (docs/BENCHMARKS.md, "Registrar"): a
busy registrar spends much of its time in the loop's select and socket
writes, which uvloop does in C.

``SAGA_EVENTS_LOOP=asyncio`` forces asyncio's loop; ``=uvloop`` requires
uvloop (an ImportError says so when it is missing).
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
    choice = os.environ.get(ENV, "auto").strip().lower()
    if choice == "asyncio":
        return {}
    if importlib.util.find_spec("uvloop") is None:
        if choice == "uvloop":
            raise ImportError(f"{ENV}=uvloop but uvloop is not installed: pip install uvloop")
        return {}
    return {"use_uvloop": True}


def run(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)`` on the loop :func:`backend_options` picks."""
    return anyio.run(func, *args, backend="asyncio", backend_options=backend_options())
