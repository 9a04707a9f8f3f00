"""The chaos run: inject faults in a seeded order, churn between them, check the invariants.

Contract (the invariants; each broken one is a :class:`~.config.Violation`):

* ``truth``: after each fault heals, within ``settle_timeout``, Redis's records equal the
  live agents, REST clients and worker processes: no lost instance, no phantom, no
  resurrection after ``leave``;
* ``mirror``: by then every mirror (and the slow mirror process) equals that truth and is
  not stale;
* ``pick``: during a fault, no mirror drops a live instance of an always-present service
  (``pick()`` keeps answering, and mirror 0 reports no ``Removed`` for one), except a
  REST client's instance with no heartbeat confirmed for a whole ttl
  (:func:`~.clients.lapsed`: its client lost one; counted, not a violation);
* ``thread``: no ``pick()`` from another thread raised, ever;
* ``resurrect``: an instance removed after its client stopped (leave or crash, then
  reaped) never comes back (mirror 0's change stream);
* ``stale``: a mirror reports ``stale`` where the fault makes that mandatory;
* ``crash``: no registrar or gateway process died (they are only killed by a fault);
* ``drain``: an operator-drained instance is never picked and never lost
  (:mod:`.drains`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random

import anyio
import anyio.abc

from ... import model
from ..._redis import TRANSIENT
from ...errors import ServiceNotFound
from ...mirror import Removed
from .clients import PickThreads, cpu_hogs, hostile_publisher, http_client, lapsed
from .config import DROPS_EXPECTED, ChaosConfig, ChaosReport, Violation
from .deployment import HTTP_SERVICE, WORKER_SERVICE, Deployment
from .drains import (
    DRAIN_PICKS_EXPECTED,
    Drains,
    check_drained,
    check_picks,
    check_truth,
    start_drains,
)
from .faults import FAULT_FUNCS, churn

log = logging.getLogger("saga_events.testing.chaos")


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = ChaosReport(seed=config.seed)
        self.dep = Deployment(config, self.rng)
        self._fault: str | None = None
        self._require_stale = False
        self._stale_seen: list[bool] = []
        self._picks: PickThreads | None = None
        self.drains: Drains | None = None
        self._drain_seen: set[tuple[str, str]] = set()

    def violation(self, kind: str, detail: str, fault: str | None = None) -> None:
        v = Violation(kind, fault or self._fault or "start", detail)
        log.error("chaos seed=%d: %s", self.config.seed, v)
        self.report.violations.append(v)

    def where(self) -> str:
        return self._fault or "start"

    def stable_services(self) -> set[str]:
        """Services that always have a live instance: pick() must never fail for them."""
        stable = {s.service for s in self.dep.slots if s.stable}
        if self.config.workers >= 2:
            stable.add(WORKER_SERVICE)
        return stable

    # -- invariants

    def _drain_threads(self) -> None:
        if self._picks is not None:
            for fault, detail in self._picks.drain():
                self.violation("thread", detail, fault)

    async def converge(self, fault: str, started: float, injected: float | None = None) -> None:
        """After a fault heals: wait (bounded) for truth == live clients == every mirror."""
        dep = self.dep
        last = ""
        for dead in dep.dead_children():
            self.violation("crash", f"{dead} died")
        with anyio.move_on_after(self.config.settle_timeout):
            while True:
                self._drain_threads()
                for dead in dep.dead_children():
                    self.violation("crash", f"{dead} died")
                try:
                    truth = await dep.truth()
                except TRANSIENT as exc:  # the harness's own connection broke too
                    last = f"cannot read the truth: {exc}"
                    await anyio.sleep(0.1)
                    continue
                expected = dep.expected()
                problems = []
                if set(truth) != expected:
                    lost = sorted(expected - set(truth))
                    phantom = sorted(set(truth) - expected)
                    problems.append(f"truth: lost {lost} phantom {phantom}")
                for i, mirror in enumerate(dep.mirrors):
                    view = {k: v for k, v in mirror.snapshot().items() if dep.counted(k)}
                    if view != truth:
                        diff = sorted(set(view) ^ set(truth)) or ["(same keys, other values)"]
                        problems.append(f"mirror {i} differs on {diff[:5]}")
                    elif mirror.stale:
                        problems.append(f"mirror {i} still stale")
                slow = dep.slow_mirror_view()
                if slow is not None:
                    stale, versions = slow
                    versions = {k: v for k, v in versions.items() if dep.counted(k)}
                    want = {k: [i.incarnation, i.seq] for k, i in truth.items()}
                    if versions != want:
                        diff = sorted(set(versions) ^ set(want)) or ["(same keys, other versions)"]
                        problems.append(f"slow mirror differs on {diff[:5]}")
                    elif stale:
                        problems.append("slow mirror still stale")
                problems += self.drain_problems(truth)
                if not problems:
                    now = anyio.current_time()
                    self.report.convergence.setdefault(fault, []).append(now - started)
                    if injected is not None:
                        self.report.recovery.setdefault(fault, []).append(now - injected)
                    return
                last = "; ".join(problems)
                await anyio.sleep(0.05)
        kind = "truth" if last.startswith("truth") else "mirror"
        kind = "drain" if last.startswith("drain") else kind
        self.violation(kind, f"not converged {self.config.settle_timeout} s after heal: {last}")

    async def watch_during_fault(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """While a fault lasts: every mirror answers pick() for services it knew; note stale."""
        known = [
            {s for s in m.services() if any(not i.draining for i in m.instances(s))}
            for m in self.dep.mirrors
        ]
        stable = self.stable_services()
        self._stale_seen = [False] * len(self.dep.mirrors)
        task_status.started()
        while True:
            for i, mirror in enumerate(self.dep.mirrors):
                if mirror.stale:
                    self._stale_seen[i] = True
                for name in known[i] & stable:
                    try:
                        mirror.pick(name)
                    except ServiceNotFound:
                        self.violation("pick", f"mirror {i} lost {name!r} during the fault")
                        known[i].discard(name)
            self.watch_drain_picks()
            await anyio.sleep(0.02)

    # -- the drain invariant (drains.py)

    def drain_picked(self, detail: str) -> None:
        """A drained instance was picked: a violation unless the fault allows it."""
        key = (self.where(), detail)
        if self.where() not in DRAIN_PICKS_EXPECTED and key not in self._drain_seen:
            self._drain_seen.add(key)
            self.violation("drain", detail)

    def watch_drain_picks(self) -> None:
        if self.drains is None:
            return
        for i, mirror in enumerate(self.dep.mirrors):
            for name, sid in self.drains.drained.values():
                for problem in check_picks(mirror, name, [sid], 4):
                    self.drain_picked(f"mirror {i}: {problem}")

    def drain_problems(self, truth: dict[str, model.Instance]) -> list[str]:
        """After a heal: a drained instance picked is a violation at once; one lost
        (from Redis or a mirror) is a problem the convergence waits for."""
        if self.drains is None:
            return []
        drained = self.drains.drained
        waiting = [f"drain: {p}" for p in check_truth(truth, drained)]
        for i, mirror in enumerate(self.dep.mirrors):
            for problem in check_drained(mirror, drained):
                if problem.startswith("picked"):
                    self.drain_picked(f"mirror {i}: {problem}")
                else:
                    waiting.append(f"drain: mirror {i}: {problem}")
        return waiting

    async def watch_changes(self) -> None:
        """On mirror 0's change stream: a live stable instance removed (``pick``), or an
        instance that was removed after its client stopped coming back (``resurrect``)."""
        dep = self.dep
        gone: set[str] = set()  # stopped clients' instances, seen removed
        async with contextlib.aclosing(dep.mirrors[0].changes()) as changes:
            async for change in changes:
                inst = change.instance
                key = dep.keys.inst(inst.service_name, inst.service_id)
                if not dep.counted(key):
                    continue
                expected = dep.expected()
                if isinstance(change, Removed):
                    if key not in expected:
                        gone.add(key)
                elif key in gone:
                    gone.discard(key)
                    worker = inst.service_name == WORKER_SERVICE  # ids are the client's
                    if key not in expected and key not in dep.reused and not worker:
                        self.violation("resurrect", f"mirror 0: {key} came back after removal")
                stable = {dep.keys.inst(s.service, s.service_id): s for s in dep.slots if s.stable}
                if isinstance(change, Removed) and key in stable:
                    fault = self._fault or "start"
                    self.report.dropped_stable[fault] += 1
                    slot = stable[key]
                    why = lapsed(slot, anyio.current_time(), self.config.http_ttl)
                    if why is not None:  # its client could not heartbeat for a ttl
                        log.warning("chaos: %s lapsed: %s", inst.service_id, why)
                        self.report.clients["http lapsed (no heartbeat within ttl)"] += 1
                    elif fault not in DROPS_EXPECTED:
                        since = ""
                        if slot.confirmed is not None:
                            ago = anyio.current_time() - slot.confirmed
                            since = f" (its last heartbeat confirmed {ago:.1f} s before)"
                        self.violation(
                            "pick", f"mirror 0 dropped live instance {inst.service_id}{since}"
                        )

    # -- one fault

    async def fault(self, kind: str) -> None:
        self._fault = kind
        self.report.injected[kind] += 1
        self._require_stale = False
        injected = anyio.current_time()
        log.warning("chaos seed=%d: fault %s", self.config.seed, kind)
        hog_for = self.rng.uniform(2.0, 4.0)
        async with anyio.create_task_group() as tg:
            await tg.start(self.watch_during_fault)
            if self.config.cpu_hogs:
                async with cpu_hogs(self.config.cpu_hogs, hog_for, self.report.clients):
                    await FAULT_FUNCS[kind](self)
            else:
                await FAULT_FUNCS[kind](self)
            tg.cancel_scope.cancel()
        healed = anyio.current_time()
        if any(self._stale_seen):
            self.report.stale_seen[kind] += 1
        elif self._require_stale:
            self.violation("stale", "no mirror reported stale while it could not be sure")
        else:
            self.report.stale_seen[kind] += 0
        await self.converge(kind, healed, injected)

    # -- main loop

    def schedule(self) -> list[str]:
        """One round of faults: each kind once in a seeded order (cycle), or one at random."""
        if self.config.cycle:
            order = list(self.config.faults)
            self.rng.shuffle(order)
            return order
        return [self.rng.choice(self.config.faults)]

    async def start_http_clients(self, tg: anyio.abc.TaskGroup) -> None:
        dep = self.dep
        for _ in range(self.config.http_clients):
            slot = dep.new_slot(HTTP_SERVICE, stable=True)
            slot.kind = "http"
            await tg.start(http_client, dep, slot, self.report.clients)
            slot.live = True

    async def run(self) -> ChaosReport:
        start = anyio.current_time()
        config = self.config
        async with self.dep.running(), anyio.create_task_group() as tg:
            try:
                await self.start_http_clients(tg)
                if config.drains and config.http_clients:  # drains go through the gateway
                    self.drains = await start_drains(self.dep, config.drains)
                    self.report.clients["operator drains"] += len(self.drains.drained)
                await self.converge("start", anyio.current_time())
                tg.start_soon(self.watch_changes)
                if config.hostile:
                    counts = self.report.clients
                    tg.start_soon(
                        functools.partial(hostile_publisher, bombs=config.hostile_bombs),
                        self.dep, counts, itertools.count(),
                    )  # fmt: skip
                with contextlib.ExitStack() as stack:
                    if config.pick_threads:
                        self._picks = stack.enter_context(
                            PickThreads(self.dep.mirrors, self.stable_services,
                                        config.pick_threads, self.where)
                        )  # fmt: skip
                    try:
                        await self._loop(start)
                    finally:
                        if self._picks is not None:
                            self.report.clients["thread picks"] += self._picks.picks
                self._drain_threads()
            except Exception as exc:  # a part that would not come back ends the run
                log.exception("chaos seed=%d: run aborted", config.seed)
                for dead in self.dep.dead_children():
                    self.violation("crash", f"{dead} died")
                self.violation("harness", f"run aborted: {exc!r}")
            tg.cancel_scope.cancel()
        self.report.convergence.pop("start", None)
        self.report.convergence.pop("churn", None)
        self.report.elapsed = anyio.current_time() - start
        return self.report

    async def _loop(self, start: float) -> None:
        while anyio.current_time() - start <= self.config.duration:
            for kind in self.schedule():
                if anyio.current_time() - start > self.config.duration:
                    return
                await self.fault(kind)
                self._fault = "churn"
                await churn(self, 2)
                await self.converge("churn", anyio.current_time())


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run the chaos suite once; returns the report (check ``report.ok``)."""
    return await ChaosRun(config).run()
