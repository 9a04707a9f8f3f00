"""The watcher's rules that need no network: the clock, the counters, the canary
and the revision check.

One job: decide, from counts and times the watcher feeds in, when the view may
have missed something. Nothing here does I/O; tests drive it with numbers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import anyio


class Clock(Protocol):
    """Where the watcher's timing rules get the time."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class AnyioClock:
    """The event loop's clock (read from asyncio's loop directly where it runs: the
    watcher reads it a few times per batch, and anyio's lookup costs ~20x more)."""

    def monotonic(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # another anyio backend
            return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


@dataclass
class MirrorStats:
    """Counters of what the mirror received and sent; for metrics and tests."""

    #: ``expired``/``evicted`` key events naming a record (Redis's own removals)
    record_notifications: int = 0
    canary_notifications: int = 0
    epoch_notifications: int = 0
    gets: int = 0
    snapshots: int = 0
    snapshot_records: int = 0
    reconnects: int = 0
    resyncs: int = 0
    rev_checks: int = 0
    rev_resyncs: int = 0
    refusals: int = 0
    #: feed messages read, their record changes applied, the ones dropped as
    #: unreadable, and the gaps (a revision skipped: each resyncs)
    feed_messages: int = 0
    feed_changes: int = 0
    feed_rejected: int = 0
    feed_gaps: int = 0
    #: records Redis removed on its own while a snapshot was taken: read by GET
    orphans: int = 0


class RevCheck:
    """Decides whether a record change was lost, from the registry revision.

    The registrar increments ``rev`` in the same script as each record change
    it makes, and publishes the change on the feed. ``applied`` counts the
    feed's changes applied; Redis's own ``expired``/``evicted`` removals change
    no rev, and a writer that bumps rev without the feed (a registrar from
    before it) shows as a loss: a resync reads what it wrote. So, with nothing lost,
    ``rev - applied`` is a constant: the offset. After a snapshot that read
    rev the watcher sets :attr:`bounds` to that exact offset (:meth:`pin`).

    Each check reads rev (``before``), then reads the subscription past a
    PING sent after that read (every notification of a change up to
    ``before`` has then been counted, and perhaps some of later changes), then
    reads rev again (``after``). With nothing lost the offset therefore lies
    in ``[before - applied, after - applied]``; the check keeps the
    intersection of these intervals since the last snapshot. A loss shifts
    every later interval up by the number lost: when one no longer meets the
    intersection, a notification was lost. A quiet check (``before ==
    after``) pins the offset exactly, so one lost notification is found at
    the next check; under constant churn the intersection narrows as checks
    add up. Fewer notifications than possible is the only conclusion drawn:
    more (records deleted behind the registrar's back) starts over.
    """

    def __init__(self) -> None:
        self.bounds: tuple[int, int] | None = None

    def forget(self) -> None:
        """After a snapshot: the old bounds say nothing about the new count."""
        self.bounds = None

    def pin(self, offset: int) -> None:
        """The offset is known exactly (a snapshot read rev, then every change after it)."""
        self.bounds = (offset, offset)

    def lost(self, before: int | None, applied: int, after: int | None) -> bool:
        """One check: True when a notification has been lost."""
        if before is None or after is None:
            self.bounds = None  # no rev (an older registrar, or none yet): nothing to check
            return False
        low, high = before - applied, after - applied
        if self.bounds is None or high < self.bounds[0]:
            self.bounds = (low, high)
            return False
        if low > self.bounds[1]:
            return True
        self.bounds = (max(low, self.bounds[0]), min(high, self.bounds[1]))
        return False


class Canary:
    """The registrars' liveness as seen on the subscription.

    ``beat`` on each liveness notification; ``lost`` is True once, when no
    beat came for ``timeout`` s, and ``beat`` returns True once, when one
    comes back after a loss.
    """

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.last = now
        self.is_lost = False

    def restart(self, now: float) -> None:
        self.last = now
        self.is_lost = False

    def beat(self, now: float) -> bool:
        self.last = now
        back, self.is_lost = self.is_lost, False
        return back

    def lost(self, now: float) -> bool:
        if self.is_lost or now - self.last <= self.timeout:
            return False
        self.is_lost = True
        return True
