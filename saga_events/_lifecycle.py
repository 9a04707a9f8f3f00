"""One ``async with`` lifecycle for the parts that run in the background (internal).

Contract: a class that mixes in :class:`RunsInBackground` and defines
``run(*, task_status)`` gets ``__aenter__``/``__aexit__`` that

* start ``run`` in a task group of their own and return once ``run`` has
  called ``task_status.started()`` (bounded by :meth:`_start_timeout`);
* if starting fails or times out, cancel ``run``, call :meth:`aclose` and
  re-raise, leaving nothing running;
* on exit, cancel ``run``, wait for it to end, then call :meth:`_after_run`
  (for example the agent's ``leave``) and always :meth:`aclose`.

Agent, Mirror and Registrar share it, so the task-group handling (entered and
exited by the same task, cleanup on every path) is written once.
"""

from __future__ import annotations

from typing import Any, Self

import anyio
from anyio.abc import TaskGroup, TaskStatus


class RunsInBackground:
    """Mixin: ``async with obj`` runs ``obj.run`` in the background until the block ends."""

    _lifecycle_tg: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    def _start_timeout(self) -> float | None:
        """Seconds ``__aenter__`` waits for ``run`` to signal started; None waits forever."""
        return None

    async def _after_run(self) -> None:
        """Called on a clean exit once ``run`` has ended, before :meth:`aclose`."""

    async def aclose(self) -> None:
        """Release what the object owns (connections); called on every exit path."""

    async def __aenter__(self) -> Self:
        if self._lifecycle_tg is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            with anyio.fail_after(self._start_timeout()):
                await tg.start(self.run)
        except BaseException:
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(None, None, None)
            finally:
                await self.aclose()
            raise
        self._lifecycle_tg = tg
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._lifecycle_tg = self._lifecycle_tg, None
        if tg is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        tg.cancel_scope.cancel()
        try:
            await tg.__aexit__(None, None, None)
            await self._after_run()
        finally:
            await self.aclose()
