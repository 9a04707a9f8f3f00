"""A per-key token bucket for the registrar's hot path (internal).

One dict lookup and a little arithmetic per event, no Redis round trip. Each
registrar limits on its own: with N registrars a flood is applied at most N
times the rate, and every copy is idempotent anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any


class TokenBuckets:
    """Allow ``burst`` events at once and ``rate`` a second after that, per key.

    Buckets idle for ``sweep_every`` seconds (and full again by then) are
    forgotten (swept at most once every ``sweep_every`` seconds), so memory
    follows the active keys only; and
    the table never holds more than ``max_keys`` buckets (the least recently
    used goes first), so a flood of fresh keys cannot grow it without bound.
    Not thread-safe: the registrar calls it from its one consumer task.

    The table is kept in order of last use (a bucket is moved to the end when
    taken from), so the sweep reads only the idle buckets at its front; a
    bucket is one list updated in place (the hot path makes no new object that
    outlives it: nothing for the garbage collector to promote).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sweep_every: float = 30.0,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        # key -> [tokens, last take (clock), the key]: the stored key is put back
        # as it was, so a lookup's equal-but-new key object is never kept.
        self._buckets: dict[Hashable, list[Any]] = {}
        self._sweep_every = sweep_every
        self.max_keys = max_keys
        self._next_sweep = clock() + sweep_every

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        return self.take(key, self.clock())

    def take(self, key: Hashable, now: float) -> bool:
        """:meth:`allow` at ``now`` (this table's clock, read by the caller: once for a
        batch of events that arrived together; never earlier than a previous ``now``)."""
        if now >= self._next_sweep:
            self._sweep(now)
        buckets = self._buckets
        state = buckets.pop(key, None)  # put back at the end below: the dict's order is LRU
        if state is None:
            if len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]
            state = [self.burst, now, key]
        else:
            tokens = state[0] + (now - state[1]) * self.rate
            state[0] = tokens if tokens < self.burst else self.burst
            state[1] = now
        buckets[state[2]] = state
        if state[0] < 1.0:
            return False
        state[0] -= 1.0
        return True

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        # A bucket idle for its refill time is full: forgetting it or keeping it gives
        # the same answers. Idle less than a sweep interval, it is kept: a key used
        # every few seconds (an agent's heartbeats) is not forgotten and re-created.
        idle = max(self.burst / self.rate, self._sweep_every)
        stale = []
        for key, state in self._buckets.items():  # oldest use first
            if now - state[1] < idle:
                break
            stale.append(key)
        for key in stale:
            del self._buckets[key]
