"""The mirror's store: instances by key and by service, and the pick policy.

One job: hold the view that a watcher feeds and that readers query, after
client-go's ``Store``/``Indexer``. It talks to no network.

Contract:

* One writer (the watcher, in the event loop) calls :meth:`View.put`,
  :meth:`View.remove` and :meth:`View.replace`, then :meth:`View.publish`;
  changes become visible to readers at ``publish``, one service at a time.
* Each service's index is an immutable :class:`ServiceSnapshot` (all
  instances sorted by id, the live non-draining ones, a capability index, the
  round-robin counter) that ``publish`` swaps in with one assignment. A
  reader takes one snapshot and uses only it, so reads from any thread see
  one consistent version of a service and ``pick`` never meets a
  half-updated index. Two services may be seen at different versions.
* The key map is a dict that only the writer mutates, one key at a time;
  :meth:`View.snapshot` copies it in one C-level step under the GIL.
* Cost: a change to one service costs O(log n) comparisons (bisect into the
  sorted instances) plus a C-level copy of that service's tuples per batch
  (open, then publish),
  never a re-sort: a batch of k changes to a service of n instances costs
  O(k log n + n), not O(k n log n). ``stats`` counts the work for tests.
* Pick policy: a strategy name (``round_robin`` default, ``random``,
  ``least_recently_picked``; see :mod:`saga_events.selection`: weights from
  metadata ``weight``), or a custom :class:`Picker` given the snapshot and the
  candidates (live, filtered by capability and ``where``).
* Selection is a dict lookup: each snapshot caches, lazily, one
  :class:`~saga_events.selection.Selection` per (capability, frozen ``where``
  items), so a repeated ``pick(where=...)`` scans nothing.
"""

from __future__ import annotations

import itertools
import operator
import sys
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec

from .model import Instance
from .selection import (
    MAX_SELECTIONS,
    STRATEGIES,
    Selection,
    SelectionState,
    WhereKey,
    matches,
    merged_key,
    where_key,
)

MAX_SHARED_CAPABILITY_SETS: Final = 4096
_force_setattr: Callable[[object, str, object], None] | None = getattr(
    msgspec.structs, "force_setattr", None
)


class Added(msgspec.Struct, frozen=True):
    """An instance appeared."""

    instance: Instance


class Updated(msgspec.Struct, frozen=True):
    """An instance's record changed (URL, capabilities, metadata, draining, restart)."""

    instance: Instance
    previous: Instance


class Removed(msgspec.Struct, frozen=True):
    """An instance left, expired or was reaped."""

    instance: Instance


Change = Added | Updated | Removed


class ServiceSnapshot:
    """One immutable version of one service's index. It can be shared between threads.

    ``instances`` holds every instance sorted by id, ``live`` the non-draining
    ones in the same order. ``counter`` is the service's round-robin counter,
    carried from version to version.
    """

    __slots__ = ("_by_capability", "_selections", "counter", "instances", "live", "name", "states")

    def __init__(
        self,
        name: str,
        instances: tuple[Instance, ...],
        live: tuple[Instance, ...],
        counter: itertools.count[int],
        states: dict[tuple[str | None, WhereKey], SelectionState] | None = None,
    ) -> None:
        self.name = name
        self.instances = instances
        self.live = live
        self.counter = counter
        #: per-selection state shared by this service's versions
        self.states = states if states is not None else {}
        self._by_capability: dict[str, tuple[Instance, ...]] | None = None
        self._selections: dict[tuple[str | None, WhereKey], Selection] = {}

    def select(self, capability: str | None, key: WhereKey) -> Selection:
        """The selection of the live instances with ``capability`` matching ``key``.

        Cached per snapshot (lock-free: racing threads build equal selections).
        """
        ck = (capability, key)
        found = self._selections.get(ck)
        if found is not None:
            return found
        base = self.live_with(capability)
        candidates = base if key is None else tuple(i for i in base if matches(i, key))
        state = self.states.get(ck)
        if state is None:
            state = SelectionState()
            if ck == (None, None):
                state.counter = self.counter
            if len(self.states) < MAX_SELECTIONS:
                state = self.states.setdefault(ck, state)
        sel = Selection(candidates, state)
        if len(self._selections) < MAX_SELECTIONS:
            self._selections[ck] = sel
        return sel

    def choose(
        self,
        capability: str | None,
        where: Mapping[str, str] | None,
        prefer: Mapping[str, str] | None,
    ) -> Selection | None:
        """The selection to pick from, ``prefer`` first; None when nothing matches."""
        base = self.select(capability, where_key(where))
        if prefer:
            preferred = self.select(capability, merged_key(where, prefer))
            if preferred.candidates and (preferred.positive or not base.positive):
                return preferred
        return base if base.candidates else None

    def matching(self, where: Mapping[str, str] | None) -> list[Instance]:
        """Every instance (draining ones too) whose metadata matches ``where``."""
        key = where_key(where)
        return [i for i in self.instances if matches(i, key)]

    def live_with(self, capability: str | None) -> tuple[Instance, ...]:
        """The live instances that have ``capability`` (all of them for None).

        Computed once per snapshot and capability; two threads racing here
        compute the same tuple, so the cache needs no lock.
        """
        if capability is None:
            return self.live
        cache = self._by_capability
        if cache is None:
            cache = self._by_capability = {}
        found = cache.get(capability)
        if found is None:
            found = tuple(i for i in self.live if capability in i.capabilities)
            cache[capability] = found
        return found


class Picker(Protocol):
    """Chooses one of ``candidates`` (never empty) of ``service``."""

    def __call__(self, service: ServiceSnapshot, candidates: tuple[Instance, ...]) -> Instance: ...


class RoundRobin:
    """Round-robin over the candidates, one counter per service (atomic under the GIL)."""

    def __call__(self, service: ServiceSnapshot, candidates: tuple[Instance, ...]) -> Instance:
        return candidates[next(service.counter) % len(candidates)]


@dataclass
class ViewStats:
    """Work the view did: for tests that check its complexity without a clock."""

    publishes: int = 0  # service snapshots built
    sorted_items: int = 0  # items passed to a full sort (bulk loads only)


_sid: Final = operator.attrgetter("service_id")  # C-level: bisect's key runs per comparison


@dataclass(slots=True)
class _Group:
    """The writer's mutable copy of one service, sorted by id, open only between a
    change and the next publish (never seen by readers)."""

    insts: list[Instance] = field(default_factory=list)
    live: list[Instance] = field(default_factory=list)

    def put(self, inst: Instance) -> None:
        sid = inst.service_id
        _put_sorted(self.insts, inst, sid)
        if inst.draining:
            _remove_sorted(self.live, sid)
        else:
            _put_sorted(self.live, inst, sid)

    def remove(self, sid: str) -> None:
        _remove_sorted(self.insts, sid)
        _remove_sorted(self.live, sid)


def _put_sorted(items: list[Instance], inst: Instance, sid: str) -> None:
    i = bisect_left(items, sid, key=_sid)
    if i < len(items) and items[i].service_id == sid:
        items[i] = inst
    else:
        items.insert(i, inst)


def _remove_sorted(items: list[Instance], sid: str) -> None:
    i = bisect_left(items, sid, key=_sid)
    if i < len(items) and items[i].service_id == sid:
        del items[i]


class View:
    """The store and indexes of one mirror. Reads can be called from any thread;
    writes only from the watcher's task."""

    def __init__(self, picker: Picker | None = None, strategy: str = "round_robin") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: expected one of {STRATEGIES}")
        self.picker: Picker = picker or RoundRobin()
        #: None when a custom picker chooses; else the strategy's name
        self.strategy: str | None = strategy if picker is None else None
        self.stats = ViewStats()
        self._records: dict[str, Instance] = {}
        #: name → current snapshot. Readers may look up and copy it; only the
        #: writer assigns to it (one key at a time).
        self.by_service: dict[str, ServiceSnapshot] = {}
        self.round_robin = isinstance(self.picker, RoundRobin)
        self._open: dict[str, _Group] = {}  # services changed since the last publish
        self._shared_caps: dict[tuple[str, ...], tuple[str, ...]] = {}

    # -- reading (any thread) ------------------------------------------------------

    def service(self, name: str) -> ServiceSnapshot | None:
        """The current snapshot of ``name``, or None when it has no instance."""
        return self.by_service.get(name)

    def pick(
        self,
        name: str,
        capability: str | None = None,
        *,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> Instance | None:
        """A live, non-draining instance of ``name`` chosen by the strategy, or None."""
        snap = self.by_service.get(name)
        if snap is None:
            return None
        return self.pick_in(snap, capability, where, prefer)

    def pick_in(
        self,
        snap: ServiceSnapshot,
        capability: str | None,
        where: Mapping[str, str] | None,
        prefer: Mapping[str, str] | None,
    ) -> Instance | None:
        sel = snap.choose(capability, where, prefer)
        if sel is None:
            return None
        strategy = self.strategy
        if strategy is None:
            return self.picker(snap, sel.candidates)
        return sel.pick(strategy)

    def instances(self, name: str, *, where: Mapping[str, str] | None = None) -> list[Instance]:
        snap = self.by_service.get(name)
        if snap is None:
            return []
        return list(snap.instances) if not where else snap.matching(where)

    def services(self) -> dict[str, list[Instance]]:
        snaps = dict(self.by_service)  # one atomic copy
        return {name: list(snaps[name].instances) for name in sorted(snaps)}

    def snapshot(self) -> dict[str, Instance]:
        return dict(self._records)

    def get(self, key: str) -> Instance | None:
        return self._records.get(key)

    def __len__(self) -> int:
        return len(self._records)

    # -- writing (the watcher's task only) -----------------------------------------------

    def put(self, key: str, inst: Instance) -> Change | None:
        """Store ``inst`` under ``key``; return the change, None when equal to the stored one."""
        old = self._records.get(key)
        if old == inst:
            return None
        if old is not None and old.service_name != inst.service_name:
            self._group_remove(old)  # keys name their service: only a foreign record does this
        self._records[key] = inst
        self._group(inst.service_name).put(inst)
        return Added(inst) if old is None else Updated(inst, old)

    def remove(self, key: str) -> Change | None:
        old = self._records.pop(key, None)
        if old is None:
            return None
        self._group_remove(old)
        return Removed(old)

    def replace(self, fresh: Mapping[str, Instance], *, changes: bool = True) -> list[Change]:
        """Make the view equal to ``fresh`` (a full list); return the differences
        (none are built with ``changes=False``: a cold start of 100k instances
        need not allocate 100k change objects that nobody reads).

        Services are rebuilt with one sort each, not one bisect per instance.
        """
        out: list[Change] = []
        for key in [k for k in self._records if k not in fresh]:
            change = self.remove(key)
            if change is not None and changes:
                out.append(change)
        touched: set[str] = set()
        records = self._records
        for key, inst in fresh.items():
            old = records.get(key)
            if old == inst:
                continue
            if old is not None and old.service_name != inst.service_name:
                self._group_remove(old)
            records[key] = inst
            touched.add(inst.service_name)
            if changes:
                out.append(Added(inst) if old is None else Updated(inst, old))
        if touched:
            # After the loop the view holds exactly ``fresh``: group the touched
            # services' instances from it.
            by_service: dict[str, list[Instance]] = {name: [] for name in touched}
            for key in fresh:
                inst = records[key]
                group = by_service.get(inst.service_name)
                if group is not None:
                    group.append(inst)
            for name, insts in by_service.items():
                self._open[name] = self._build_group(insts)
        return out

    def publish(self) -> bool:
        """Swap in new snapshots of the services changed since the last publish.

        Returns True when any service changed.
        """
        if not self._open:
            return False
        for name, group in self._open.items():
            if not group.insts:
                self.by_service.pop(name, None)
                continue
            previous = self.by_service.get(name)
            counter = previous.counter if previous is not None else itertools.count()
            states = previous.states if previous is not None else None
            insts = tuple(group.insts)
            # Usually nothing drains: then live is the same tuple.
            live = insts if len(group.live) == len(insts) else tuple(group.live)
            self.stats.publishes += 1
            self.by_service[name] = ServiceSnapshot(name, insts, live, counter, states)
        self._open.clear()
        return True

    def _group(self, name: str) -> _Group:
        """The open copy of ``name``, made from its snapshot at the first change."""
        group = self._open.get(name)
        if group is None:
            snap = self.by_service.get(name)
            group = _Group() if snap is None else _Group(list(snap.instances), list(snap.live))
            self._open[name] = group
        return group

    def _group_remove(self, old: Instance) -> None:
        self._group(old.service_name).remove(old.service_id)

    def _build_group(self, insts: list[Instance]) -> _Group:
        insts.sort(key=_sid)
        self.stats.sorted_items += len(insts)
        return _Group(insts, [i for i in insts if not i.draining])

    def share(self, inst: Instance) -> Instance:
        """Let instances share one copy of their (immutable) service name and
        capability tuple: ~200 bytes less per instance in a large view. The watcher
        calls it as it decodes, on an instance nobody else holds yet (it may be
        changed in place), so the unshared copies die at once."""
        name = sys.intern(inst.service_name)
        caps = self._shared_caps.get(inst.capabilities)
        if caps is None:
            caps = tuple(sys.intern(c) for c in inst.capabilities)
            if len(self._shared_caps) < MAX_SHARED_CAPABILITY_SETS:
                self._shared_caps[caps] = caps
        if name is inst.service_name and caps is inst.capabilities:
            return inst
        if _force_setattr is None:  # msgspec < 0.19
            return msgspec.structs.replace(inst, service_name=name, capabilities=caps)
        # The instance was just decoded and nobody else holds it: swap the two fields
        # in place (a copy of the whole struct cost more than the decode).
        _force_setattr(inst, "service_name", name)
        _force_setattr(inst, "capabilities", caps)
        return inst
