"""Health-gated heartbeats: run the host's health check before each heartbeat.

One job: run a health check (a sync or async callable) with a timeout and say
whether the instance should be announced as serving. The agent announces a
failing instance as draining with ``metadata["health"] = "failing: <why>"``
and as serving again once the check passes.

Contract:

* A check passes when it returns anything but ``False`` without raising within
  ``timeout`` seconds; it fails on ``False``, an exception, or the timeout.
* An async check runs on the agent's event loop.
* A sync check runs on ``executor`` (the *host's* own thread pool, e.g. the
  pool that serves its requests) when one is given, else on one private
  thread. So a host whose worker threads are all stuck cannot run its check
  and stops looking healthy: the submitted check waits in the pool's queue
  until the timeout. A check still running from an earlier heartbeat is not
  started again: the new one is queued behind it and so fails by timeout too.
* The reason is made safe for a metadata value (control characters become
  spaces, at most :data:`MAX_REASON` characters).
"""

from __future__ import annotations

import concurrent.futures
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.to_thread

MAX_REASON: Final = 200
HEALTH_KEY: Final = "health"

HealthCheck = Callable[[], Any] | Callable[[], Awaitable[Any]]


def safe_reason(text: str) -> str:
    cleaned = "".join(" " if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text)
    return cleaned[:MAX_REASON]


class HealthGate:
    """Runs one instance's health check; ``failure`` is None while it passes."""

    def __init__(
        self,
        check: HealthCheck,
        timeout: float = 2.0,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("health_timeout must be > 0 seconds")
        self.check = check
        self.timeout = timeout
        self._executor = executor
        self._own: concurrent.futures.ThreadPoolExecutor | None = None
        self.failure: str | None = None
        self.runs = 0

    async def run(self) -> str | None:
        """Run the check once; return (and keep in ``failure``) why it failed, or None."""
        self.runs += 1
        try:
            if inspect.iscoroutinefunction(self.check):
                with anyio.fail_after(self.timeout):
                    result = await self.check()
            else:
                result = await self._run_sync()
            if inspect.isawaitable(result):  # a sync callable that returned a coroutine
                with anyio.fail_after(self.timeout):
                    result = await result
            why = "check returned False" if result is False else None
        except (TimeoutError, concurrent.futures.TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.failure = None if why is None else safe_reason(f"failing: {why}")
        return self.failure

    async def _run_sync(self) -> Any:
        executor = self._executor
        if executor is None:
            if self._own is None:
                self._own = concurrent.futures.ThreadPoolExecutor(1, "saga-health")
            executor = self._own
        future = executor.submit(self.check)
        try:
            return await anyio.to_thread.run_sync(
                future.result, self.timeout, abandon_on_cancel=True
            )
        finally:
            future.cancel()  # still queued (a stuck pool): never run it late

    def metadata(self, base: dict[str, str]) -> dict[str, str]:
        """The metadata to announce: ``base`` plus the failure, if any."""
        if self.failure is None:
            return base
        return {**base, HEALTH_KEY: self.failure}

    def close(self) -> None:
        if self._own is not None:
            self._own.shutdown(wait=False, cancel_futures=True)
            self._own = None
