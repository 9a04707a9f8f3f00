"""Routing selections: metadata filters, weights and the pick strategies.

One job: turn one service snapshot's live instances, a capability and a
``where`` filter into an immutable :class:`Selection` that picks in O(1)
(round-robin, least-recently-picked) or O(log n) (random).

Contract:

* ``where`` matches an instance when every (key, value) pair equals its
  metadata. :func:`where_key` freezes a filter into the cache key (a
  frozenset of items, None for no filter).
* Weight: metadata ``weight``, a decimal integer >= 0 (capped at
  :data:`MAX_WEIGHT`); 1 when absent or invalid. An instance of weight 0 is
  never picked while one of positive weight is a candidate; when all are 0
  they share the traffic equally.
* ``round_robin`` is nginx's smooth weighted round-robin: the schedule of one
  period (weights divided by their gcd) is computed once per selection and
  each pick indexes it with the selection's counter; with equal weights it is
  plain round-robin over the candidates. When a period would cost more than
  :data:`MAX_SCHEDULE_WORK` steps to compute (about 100 candidates of
  unequal weights), picks stride through the cumulative weights instead
  (exact shares per period, less smooth; O(n) to build, O(log n) a pick).
* ``random``: weighted random. ``least_recently_picked``: the candidate
  picked longest ago (never-picked ones first), weights ignored but 0 kept out.
* State that must outlive a snapshot (counters, recency order) lives in a
  per-service :class:`SelectionState` dict shared by its versions, bounded by
  :data:`MAX_SELECTIONS`.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Final, Literal

from .model import Instance

Strategy = Literal["round_robin", "random", "least_recently_picked"]
STRATEGIES: Final[tuple[str, ...]] = ("round_robin", "random", "least_recently_picked")
MAX_WEIGHT: Final = 1_000_000
#: The work (period x candidates) of a smooth schedule computed up front: each
#: snapshot computes it again at its first pick, in the reader's thread, so it is
#: kept to a few ms (2M steps took ~0.4 s: 1,000 instances of weights 1-3).
MAX_SCHEDULE_WORK: Final = 20_000
MAX_SELECTIONS: Final = 1024  # cached selections (and carried states) per service
_STRIDE: Final = 2_654_435_761  # Knuth's multiplicative constant: spreads the stride picks

WhereKey = frozenset[tuple[str, str]] | None


def where_key(where: Mapping[str, str] | None) -> WhereKey:
    """The cache key of a metadata filter (None for no filter)."""
    if not where:
        return None
    return frozenset(where.items())


def merged_key(where: Mapping[str, str] | None, prefer: Mapping[str, str]) -> WhereKey:
    """The key of ``where`` and ``prefer`` together (conflicting values match nothing)."""
    items: Iterable[tuple[str, str]] = prefer.items()
    if where:
        items = itertools.chain(where.items(), items)
    return frozenset(items)


def weight_of(inst: Instance) -> int:
    """The instance's weight: metadata ``weight`` if a valid integer >= 0, else 1."""
    raw = inst.metadata.get("weight")
    if raw is None or not (raw.isascii() and raw.isdigit()):
        return 1
    return min(int(raw), MAX_WEIGHT)


def matches(inst: Instance, key: WhereKey) -> bool:
    if key is None:
        return True
    meta = inst.metadata
    return all(meta.get(k) == v for k, v in key)


class SelectionState:
    """What outlives one snapshot for one selection: its counter and recency order."""

    __slots__ = ("counter", "lock", "order")

    def __init__(self) -> None:
        self.counter = itertools.count()
        self.lock = threading.Lock()
        self.order: OrderedDict[str, None] = OrderedDict()


def smooth_schedule(pool: tuple[Instance, ...], weights: list[int]) -> tuple[Instance, ...]:
    """One period of nginx's smooth weighted round-robin over ``pool``."""
    total = sum(weights)
    current = [0] * len(pool)
    out: list[Instance] = []
    for _ in range(total):
        best = 0
        for i, w in enumerate(weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(pool[best])
    return tuple(out)


class Selection:
    """The candidates of one (capability, where) of one snapshot, ready to pick."""

    __slots__ = ("_ids", "candidates", "cum", "pool", "positive", "schedule", "state", "total")

    def __init__(self, candidates: tuple[Instance, ...], state: SelectionState) -> None:
        self.candidates = candidates
        self.state = state
        weights = [weight_of(i) for i in candidates]
        self.positive = any(weights)
        if self.positive and not all(weights):
            keep = [n for n, w in enumerate(weights) if w]
            self.pool = tuple(candidates[n] for n in keep)
            weights = [weights[n] for n in keep]
        else:  # all positive, or all zero: equal shares
            self.pool = candidates
            weights = weights if self.positive else [1] * len(candidates)
        divisor = math.gcd(*weights) if weights else 1
        weights = [w // divisor for w in weights]
        self.total = sum(weights)
        self.cum = tuple(itertools.accumulate(weights))
        self.schedule: tuple[Instance, ...] | None
        if self.total == len(self.pool):  # equal weights: plain round-robin
            self.schedule = self.pool
        elif self.total * len(self.pool) <= MAX_SCHEDULE_WORK:
            self.schedule = smooth_schedule(self.pool, weights)
        else:
            self.schedule = None
        self._ids: dict[str, Instance] | None = None

    def round_robin(self) -> Instance:
        n = next(self.state.counter)
        schedule = self.schedule
        if schedule is not None:
            return schedule[n % len(schedule)]
        slot = (n * _STRIDE) % self.total
        return self.pool[bisect_right(self.cum, slot)]

    def random(self) -> Instance:
        if self.schedule is self.pool:
            return random.choice(self.pool)
        return self.pool[bisect_right(self.cum, random.randrange(self.total))]

    def least_recently_picked(self) -> Instance:
        ids = self._ids
        if ids is None:
            ids = {i.service_id: i for i in self.pool}
            with self.state.lock:
                order = self.state.order
                for sid in reversed(ids):  # never picked: first in line, in id order
                    if sid not in order:
                        order[sid] = None
                        order.move_to_end(sid, last=False)
            self._ids = ids
        with self.state.lock:
            order = self.state.order
            stale = []
            chosen = None
            for sid in order:
                chosen = ids.get(sid)
                if chosen is not None:
                    break
                stale.append(sid)  # left this selection: forget it
            for sid in stale:
                del order[sid]
            if chosen is None:  # raced with a newer version: fall back to round-robin
                return self.round_robin()
            order.move_to_end(chosen.service_id)
            return chosen

    def pick(self, strategy: str) -> Instance:
        if strategy == "round_robin":
            return self.round_robin()
        if strategy == "random":
            return self.random()
        return self.least_recently_picked()
