"""saga_events.testing.clock: the fake clock moves only when told, and sleeps cost no time."""

from __future__ import annotations

import time

import anyio
import pytest

from saga_events.testing import Clock, FakeClock, SystemClock

pytestmark = pytest.mark.anyio


async def test_fake_clock_sleep_advances_without_waiting() -> None:
    clock = FakeClock(start=10.0, wall=100.0)
    began = time.monotonic()
    for delay in (0.5, 1.0, 2.0, 4.0):  # a backoff loop of 7.5 s
        await clock.sleep(delay)
    assert clock.monotonic() == 17.5 and clock.time() == 107.5
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0]
    assert time.monotonic() - began < 5  # not a timing assertion: it did not really wait 7.5 s


def test_fake_clock_jump_moves_the_wall_clock_only() -> None:
    clock = FakeClock(start=5.0, wall=1000.0)
    clock.jump(-3600)
    assert clock.time() == 1000.0 - 3600 and clock.monotonic() == 5.0
    clock.advance(2)
    assert clock.time() == 1000.0 - 3598 and clock.monotonic() == 7.0


def test_fake_clock_refuses_to_go_back() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="negative"):
        anyio.run(clock.sleep, -1.0)
    assert clock.sleeps == []


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(FakeClock(), Clock) and isinstance(SystemClock(), Clock)
    real = SystemClock()
    assert abs(real.time() - time.time()) < 60 and real.monotonic() <= time.monotonic()
