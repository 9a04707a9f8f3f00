"""A per-key token bucket for the registrar's hot path (internal).

One dict lookup and a little arithmetic per event, no Redis round trip. Each
registrar limits on its own: with N registrars a flood is applied at most N
times the rate, and every copy is idempotent anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable


class TokenBuckets:
    """Allow ``burst`` events at once and ``rate`` a second after that, per key.

    Buckets that have been full for a while are forgotten (swept at most once
    every ``sweep_every`` seconds), so memory follows the active keys only; and
    the table never holds more than ``max_keys`` buckets (the least recently
    used goes first), so a flood of fresh keys cannot grow it without bound.
    Not thread-safe: the registrar calls it from its one consumer task.
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
        self._clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}
        self._sweep_every = sweep_every
        self.max_keys = max_keys
        self._next_sweep = clock() + sweep_every

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        buckets = self._buckets
        state = buckets.pop(key, None)  # re-inserted below: the dict's order is LRU
        if state is None:
            tokens = self.burst
            if len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]
        else:
            tokens, last = state
            tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_every
        refill = self.burst / self.rate
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= refill]
        for k in stale:
            del self._buckets[k]
