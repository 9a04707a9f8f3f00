"""An injectable clock, so that TTL, backoff and reaping logic can be tested without waiting.

Contract: :class:`Clock` is what time-dependent code takes instead of calling
:mod:`time` directly: ``monotonic()`` for durations and deadlines, ``time()`` for
wall-clock stamps, ``sleep()`` to wait. :class:`SystemClock` is the real one.
:class:`FakeClock` never moves by itself: :meth:`FakeClock.advance` moves both
readings, and ``sleep(d)`` returns at once after advancing by ``d`` (so a loop that
sleeps runs at full speed and sees exactly the time it asked for). ``time()`` may be
stepped alone (:meth:`FakeClock.jump`), as NTP steps a wall clock; ``monotonic()`` never
goes back. A FakeClock is thread-safe.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

import anyio


@runtime_checkable
class Clock(Protocol):
    """What time-dependent code reads and waits on."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, durations)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (wall clock; may be stepped)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a cancellation point)."""
        ...


class SystemClock:
    """The real clock: :func:`time.monotonic`, :func:`time.time`, :func:`anyio.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told: ``advance``, ``jump``, or a ``sleep`` call."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = float(start)
        self._wall = float(wall)
        self.sleeps: list[float] = []  # every sleep asked for, in order (backoff tests)

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds`` (must not be negative)."""
        if seconds < 0:
            raise ValueError(f"a monotonic clock cannot go back: advance({seconds})")
        with self._lock:
            self._mono += seconds
            self._wall += seconds

    def jump(self, seconds: float) -> None:
        """Step the wall clock alone by ``seconds`` (either way), as NTP does."""
        with self._lock:
            self._wall += seconds

    async def sleep(self, seconds: float) -> None:
        """Record the request, advance by it, and yield to other tasks once."""
        if seconds < 0:
            raise ValueError(f"cannot sleep a negative time: sleep({seconds})")
        with self._lock:
            self.sleeps.append(seconds)
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()
