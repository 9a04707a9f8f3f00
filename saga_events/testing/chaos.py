"""Chaos harness: break a real deployment on purpose and check that the registry stays right.

A :class:`Deployment` runs a real ``redis-server``, registrars in subprocesses
(so they can be killed and paused), many agents (in-process, plus a few in
subprocesses) and several in-process mirrors. :func:`run_chaos` applies
faults in a seeded order and, after each fault heals, checks within a bound:

* the truth equals the set of live agents: no lost instance, no phantom, no
  resurrection after ``leave`` (:class:`Violation` ``truth``);
* every mirror equals Redis's truth and is not stale (``mirror``);
* during the fault, every mirror keeps answering ``pick()`` for the services
  it knew (``pick``), and reports ``stale`` where the fault makes that
  mandatory (``stale``).

Between faults it churns: agents join, leave and change their records.
The seed fixes the order and the parameters of the faults; timings still
vary from run to run, which is the point. Run it by hand::

    python -m saga_events.testing.chaos --seed 7 --duration 60
    python -m saga_events.testing.chaos --soak 10         # ten minutes, random faults

A failing run prints its seed; ``--seed N`` replays the same schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
import anyio.to_thread
import redis.asyncio as aioredis

from .. import model
from .._redis import TRANSIENT, connect
from .._wait import eventually
from ..agent import Agent
from ..embedded import RedisServer
from ..errors import ServiceNotFound
from ..keys import Keys
from ..mirror import Mirror, Removed

log = logging.getLogger("saga_events.testing.chaos")

#: Every fault kind, in the order the docs list them.
FAULTS: Final = (
    "redis_restart",  # kill -9, restart empty on the same port
    "redis_pause",  # SIGSTOP 2-5 s, then SIGCONT
    "mirror_conn_kill",  # CLIENT KILL of one mirror's subscription
    "registrar_kill",  # kill -9 one registrar, restart it
    "registrar_pause",  # SIGSTOP one of two registrars 2-5 s (the other keeps going)
    "flags_reset",  # CONFIG SET notify-keyspace-events ""
    "slow_mirror",  # a mirror cut off by the pub/sub output-buffer limit
    "agent_crash",  # an agent stops without leave (in-process or kill -9)
    "agent_clock_jump",  # an agent restarts with its clock an hour behind
)

#: Faults after which a mirror may drop a live instance for a moment: none. (A
#: Redis paused longer than ttl minus one heartbeat interval used to reap every
#: instance; the reaper now gives a grace period after a stall.)
DROPS_EXPECTED: Final = frozenset[str]()


# -- configuration and results ------------------------------------------------------


@dataclass
class ChaosConfig:
    """What to run. ``duration`` bounds the whole run (faults stop being started
    after it); ``faults`` limits the kinds; ``cycle`` runs each kind once per
    round in a seeded order (CI) instead of drawing them at random (soak)."""

    seed: int = 1
    duration: float = 60.0
    faults: tuple[str, ...] = FAULTS
    cycle: bool = True
    agents: int = 10
    process_agents: int = 2
    mirrors: int = 3
    registrars: int = 2
    ttl: float = 3.0
    settle_timeout: float = 20.0
    namespace: str = "chaos"


@dataclass
class Violation:
    """One broken invariant: which, during or after which fault, and what was seen."""

    kind: str
    fault: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind} after {self.fault}] {self.detail}"


@dataclass
class ChaosReport:
    """What a run did and found. ``ok`` is True when no invariant was violated."""

    seed: int
    injected: Counter[str] = field(default_factory=Counter)
    convergence: dict[str, list[float]] = field(default_factory=dict)
    recovery: dict[str, list[float]] = field(default_factory=dict)
    dropped_stable: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    stale_seen: Counter[str] = field(default_factory=Counter)
    churn: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"chaos seed={self.seed}: {sum(self.injected.values())} faults in "
                 f"{self.elapsed:.0f} s, {len(self.violations)} violations"]  # fmt: skip
        for kind in FAULTS:
            n = self.injected.get(kind, 0)
            if not n:
                continue
            times = self.convergence.get(kind, [])
            conv = (
                f"converged median {statistics.median(times):.2f} s, max {max(times):.2f} s"
                if times
                else "did not converge"
            )
            rec = self.recovery.get(kind, [])
            if rec:
                conv += f" (from injection: max {max(rec):.2f} s)"
            stale = f", stale seen {self.stale_seen[kind]}/{n}" if kind in self.stale_seen else ""
            dropped = self.dropped_stable.get(kind, 0)
            flaps = f", stable instances dropped {dropped}" if dropped else ""
            lines.append(f"  {kind:17} x{n}: {conv}{stale}{flaps}")
        if self.churn:
            lines.append("  churn: " + ", ".join(f"{k} {v}" for k, v in sorted(self.churn.items())))
        for v in self.violations:
            lines.append(f"  VIOLATION {v}")
        if self.violations:
            lines.append(f"replay with: python -m saga_events.testing.chaos --seed {self.seed}")
        return "\n".join(lines)


# -- subprocess parts ---------------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[str]:
    # SAGA_CHAOS_LOG_DIR=DIR keeps each child's log (INFO) in DIR, for post-mortems.
    log_dir = os.environ.get("SAGA_CHAOS_LOG_DIR")
    stderr: Any = subprocess.DEVNULL
    if log_dir:
        stderr = open(  # handed to the child, closed below
            os.path.join(log_dir, f"{args[0].strip('_')}-{time.time_ns()}.log"), "ab"
        )
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "saga_events.testing.chaos", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # a SIGINT to the harness is not theirs
        )
    finally:
        if log_dir:
            stderr.close()


async def _wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    assert proc.stdout is not None
    stdout = proc.stdout
    with anyio.fail_after(timeout):
        line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
    if "ready" not in line:
        raise RuntimeError(f"{what} did not start (exit {proc.poll()}): {line!r}")


def _kill(proc: subprocess.Popen[str] | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


@dataclass
class AgentSlot:
    """One agent of the deployment and what the harness expects of it."""

    service: str
    service_id: str
    url: str
    stable: bool = False  # never crashed or stopped: its service always has one instance
    agent: Agent | None = None
    scope: anyio.CancelScope | None = None
    proc: subprocess.Popen[str] | None = None
    live: bool = False


class Deployment:
    """A real Redis, subprocess registrars, agents and mirrors; faults on demand."""

    def __init__(self, config: ChaosConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.keys = Keys(config.namespace)
        self.server = RedisServer()
        self.registrars: list[subprocess.Popen[str] | None] = []
        self.slots: list[AgentSlot] = []
        self.mirrors: list[Mirror] = []
        self._ids = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self.admin: aioredis.Redis | None = None
        self.slow_mirror: subprocess.Popen[str] | None = None
        self._clients: list[aioredis.Redis] = []
        self.slow_dump = os.path.join(self.server.directory, "slow-mirror.json")

    @property
    def url(self) -> str:
        return self.server.url

    # -- lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Deployment]:
        await anyio.to_thread.run_sync(self.server.start)
        self.admin = aioredis.Redis.from_url(self.url, socket_timeout=10)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    for _ in range(self.config.registrars):
                        self.registrars.append(None)
                        await self.start_registrar(len(self.registrars) - 1)
                    for i in range(self.config.mirrors):
                        # Named connections: a fault can target one mirror's subscription.
                        client = connect(self.url, client_name=f"chaos-mirror-{i}")
                        self._clients.append(client)
                        mirror = Mirror(client, namespace=self.config.namespace)
                        await tg.start(mirror.run)
                        self.mirrors.append(mirror)
                    services = ["svc-a", "svc-b", "svc-c"]
                    for i in range(self.config.agents):
                        slot = self.new_slot(services[i % len(services)], stable=i < len(services))
                        await self.start_agent(slot)
                    for _ in range(self.config.process_agents):
                        await self.start_agent(self.new_slot("svc-p"), process=True)
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            for slot in self.slots:
                _kill(slot.proc)
            for proc in self.registrars:
                _kill(proc)
            _kill(self.slow_mirror)
            with anyio.CancelScope(shield=True):
                for mirror in self.mirrors:
                    await mirror.aclose()
                for client in self._clients:
                    await client.aclose()
                for slot in self.slots:
                    if slot.agent is not None:
                        await slot.agent.aclose()
                await self.admin.aclose()
            self.server.close()

    async def start_registrar(self, index: int) -> None:
        proc = _child("_registrar", self.url, self.config.namespace)
        self.registrars[index] = proc
        await _wait_ready(proc, "registrar")

    def kill_registrar(self, index: int) -> None:
        _kill(self.registrars[index])
        self.registrars[index] = None

    # -- agents

    def new_slot(
        self, service: str, *, stable: bool = False, service_id: str | None = None
    ) -> AgentSlot:
        self._ids += 1
        sid = service_id or f"{service}-{self._ids}"
        slot = AgentSlot(
            service, sid, f"http://10.1.0.{self._ids % 250}:{8000 + self._ids}", stable
        )
        self.slots.append(slot)
        return slot

    def expected(self) -> set[str]:
        return {self.keys.inst(s.service, s.service_id) for s in self.slots if s.live}

    async def start_agent(
        self, slot: AgentSlot, *, process: bool = False, clock_offset: float = 0.0
    ) -> None:
        if process:
            slot.proc = _child(
                "_agent", str(clock_offset), self.url, self.config.namespace, slot.service,
                slot.url, slot.service_id, str(self.config.ttl),
            )  # fmt: skip
            await _wait_ready(slot.proc, "agent")
            slot.live = True
            return
        agent = Agent(
            self.url, slot.service, slot.url, service_id=slot.service_id,
            ttl=self.config.ttl, namespace=self.config.namespace,
        )  # fmt: skip
        slot.agent = agent
        slot.scope = anyio.CancelScope()
        assert self._tg is not None

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            assert slot.scope is not None
            with slot.scope:
                await agent.run(task_status=task_status)

        await self._tg.start(run)
        slot.live = True

    async def stop_agent(self, slot: AgentSlot, *, leave: bool) -> None:
        """Stop an agent: with ``leave`` as on a clean shutdown, else as in a crash."""
        slot.live = False
        if slot.proc is not None:
            try:
                if leave:
                    slot.proc.send_signal(signal.SIGINT)
                    try:
                        await anyio.to_thread.run_sync(slot.proc.wait, 20)
                    except subprocess.TimeoutExpired:
                        raise RuntimeError(
                            f"agent process {slot.proc.pid} ignored SIGINT for 20 s"
                        ) from None
            finally:
                _kill(slot.proc)
            return
        assert slot.scope is not None and slot.agent is not None
        slot.scope.cancel()
        if leave:
            # No registrar may be listening right now (one is killed): retry.
            await eventually(slot.agent.leave, 5, interval=0.1, what="leave received")
        await slot.agent.aclose()

    # -- what the mirrors see

    async def truth(self) -> dict[str, model.Instance]:
        """Every record in Redis, found by SCAN (not the index), as testing.registry_truth;
        repeated here so the harness runs without the test extra."""
        assert self.admin is not None
        found: dict[str, model.Instance] = {}
        async for raw_key in self.admin.scan_iter(match=f"{self.keys.inst_prefix}*", count=1000):
            raw = await self.admin.get(raw_key)
            if raw is not None:
                found[_text(raw_key)] = model.decode_instance(raw)
        return found

    def slow_mirror_view(self) -> tuple[bool, dict[str, list[int]]] | None:
        if self.slow_mirror is None or self.slow_mirror.poll() is not None:
            return None
        try:
            with open(self.slow_dump, "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return bool(data["stale"]), dict(data["view"])

    async def subscriptions(self, name: str) -> list[dict[str, Any]]:
        """The subscription connections (2 patterns, 1 channel) of the mirror named ``name``."""
        assert self.admin is not None
        clients = await self.admin.client_list()
        return [c for c in clients if c.get("name") == name and str(c.get("psub")) == "2"]


# -- the run ---------------------------------------------------------------------


class ChaosRun:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.report = ChaosReport(seed=config.seed)
        self.dep = Deployment(config, self.rng)
        self._fault: str | None = None
        self._require_stale = False
        self._stale_seen: list[bool] = []

    def violation(self, kind: str, detail: str) -> None:
        v = Violation(kind, self._fault or "start", detail)
        log.error("chaos seed=%d: %s", self.config.seed, v)
        self.report.violations.append(v)

    # -- invariants

    async def converge(self, fault: str, started: float, injected: float | None = None) -> None:
        """After a fault heals: wait (bounded) for truth == live agents == every mirror."""
        dep = self.dep
        last = ""
        with anyio.move_on_after(self.config.settle_timeout):
            while True:
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
                    view = mirror.snapshot()
                    if view != truth:
                        diff = sorted(set(view) ^ set(truth)) or ["(same keys, other values)"]
                        problems.append(f"mirror {i} differs on {diff[:5]}")
                    elif mirror.stale:
                        problems.append(f"mirror {i} still stale")
                slow = dep.slow_mirror_view()
                if slow is not None:
                    stale, versions = slow
                    want = {k: [i.incarnation, i.seq] for k, i in truth.items()}
                    if versions != want:
                        diff = sorted(set(versions) ^ set(want)) or ["(same keys, other versions)"]
                        problems.append(f"slow mirror differs on {diff[:5]}")
                    elif stale:
                        problems.append("slow mirror still stale")
                if not problems:
                    now = anyio.current_time()
                    self.report.convergence.setdefault(fault, []).append(now - started)
                    if injected is not None:
                        self.report.recovery.setdefault(fault, []).append(now - injected)
                    return
                last = "; ".join(problems)
                await anyio.sleep(0.05)
        kind = "truth" if last.startswith("truth") else "mirror"
        self.violation(kind, f"not converged {self.config.settle_timeout} s after heal: {last}")

    async def watch_during_fault(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """While a fault lasts: every mirror answers pick() for services it knew; note stale."""
        known = [
            {s for s in m.services() if any(not i.draining for i in m.instances(s))}
            for m in self.dep.mirrors
        ]
        stable = {s.service for s in self.dep.slots if s.stable}
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
            await anyio.sleep(0.02)

    # -- faults: each returns once the fault has healed

    async def fault(self, kind: str) -> None:
        self._fault = kind
        self.report.injected[kind] += 1
        self._require_stale = False
        injected = anyio.current_time()
        log.warning("chaos seed=%d: fault %s", self.config.seed, kind)
        async with anyio.create_task_group() as tg:
            await tg.start(self.watch_during_fault)
            await getattr(self, f"_fault_{kind}")()
            tg.cancel_scope.cancel()
        healed = anyio.current_time()
        if any(self._stale_seen):
            self.report.stale_seen[kind] += 1
        elif self._require_stale:
            self.violation("stale", "no mirror reported stale while it could not be sure")
        else:
            self.report.stale_seen[kind] += 0
        await self.converge(kind, healed, injected)

    async def _fault_redis_restart(self) -> None:
        self._require_stale = True
        await anyio.to_thread.run_sync(self.dep.server.restart)
        # Healed once Redis answers again; the rebuild is part of converging.
        await eventually(lambda: all(m.stale for m in self.dep.mirrors), 10, what="stale")
        await anyio.sleep(0.1)  # let the watcher sample it too

    async def _fault_redis_pause(self) -> None:
        pause = self.rng.uniform(2.0, 5.0)
        mirror = self.dep.mirrors[0]
        # A mirror can only know after its health timeout plus one ping interval.
        self._require_stale = pause > mirror.health_timeout + mirror.health_interval + 0.5
        self.dep.server.pause()
        try:
            await anyio.sleep(pause)
        finally:
            self.dep.server.resume()

    async def _fault_mirror_conn_kill(self) -> None:
        dep = self.dep
        assert dep.admin is not None
        i = self.rng.randrange(len(dep.mirrors))
        mirror = dep.mirrors[i]
        before = mirror.stats.reconnects
        for victim in await dep.subscriptions(f"chaos-mirror-{i}"):
            await dep.admin.client_kill_filter(_id=victim["id"])
        try:
            await eventually(lambda: mirror.stats.reconnects > before, 10, what="reconnect")
        except TimeoutError:
            self.violation("stale", f"mirror {i} did not notice its killed connection")

    async def _fault_registrar_kill(self) -> None:
        i = self.rng.randrange(len(self.dep.registrars))
        self.dep.kill_registrar(i)
        await self.churn(1)  # changes while a registrar is gone
        await anyio.sleep(self.rng.uniform(0.5, 2.0))
        await self.dep.start_registrar(i)

    async def _fault_registrar_pause(self) -> None:
        live = [p for p in self.dep.registrars if p is not None]
        proc = self.rng.choice(live)
        proc.send_signal(signal.SIGSTOP)
        try:
            # The other registrar keeps applying; the paused one gets a backlog
            # with leaves in it, which it must not undo when it wakes.
            await self.churn(3)
            await anyio.sleep(self.rng.uniform(2.0, 5.0))
        finally:
            proc.send_signal(signal.SIGCONT)

    async def _fault_flags_reset(self) -> None:
        assert self.dep.admin is not None
        reset_at = anyio.current_time()
        await self.dep.admin.config_set("notify-keyspace-events", "")
        await self.churn(2)  # changes the mirrors cannot hear about

        async def restored() -> bool:
            assert self.dep.admin is not None
            flags = await self.dep.admin.config_get("notify-keyspace-events")
            value = next(iter(flags.values()), b"")
            return bool(value)

        await eventually(restored, 15, interval=0.1, what="flags re-applied by a registrar")
        # A mirror learns of the reset only when its canary goes quiet.
        off = anyio.current_time() - reset_at
        self._require_stale = off > self.dep.mirrors[0].canary_timeout + 1.0

    async def _fault_slow_mirror(self) -> None:
        dep = self.dep
        assert dep.admin is not None
        old = await dep.admin.config_get("client-output-buffer-limit")
        previous = next(iter(old.values()))
        if dep.slow_mirror is None or dep.slow_mirror.poll() is not None:
            dep.slow_mirror = _child("_mirror", dep.url, self.config.namespace, dep.slow_dump)
            await _wait_ready(dep.slow_mirror, "slow mirror")
        name = "chaos-slow-mirror"
        await eventually(lambda: dep.subscriptions(name), 10, what="slow mirror subscribed")
        proc = dep.slow_mirror
        proc.send_signal(signal.SIGSTOP)
        try:
            await dep.admin.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
            # Notifications the stopped mirror cannot drain: short-lived keys under
            # the canary prefix (long names make big messages), megabytes of them.
            pad = "x" * 300
            for round_ in range(20):
                pipe = dep.admin.pipeline(transaction=False)
                for i in range(2000):
                    pipe.set(dep.keys.registrar(f"flood-{round_}-{i}-{pad}"), b"1", px=1000)
                await pipe.execute()
                if not await dep.subscriptions(name):
                    break
            cut = not await dep.subscriptions(name)
        finally:
            await dep.admin.config_set("client-output-buffer-limit", _text(previous))
            proc.send_signal(signal.SIGCONT)
        if not cut:
            self.violation("slow_mirror", "the output-buffer limit did not cut the stopped mirror")
            return
        # It must come back by itself: reconnect and resubscribe.
        try:
            await eventually(lambda: dep.subscriptions(name), 15, what="slow mirror back")
        except TimeoutError:
            self.violation("slow_mirror", "the cut-off mirror did not reconnect")

    async def _fault_agent_crash(self) -> None:
        candidates = [s for s in self.dep.slots if s.live and not s.stable]
        if not candidates:
            return
        slot = self.rng.choice(candidates)
        await self.dep.stop_agent(slot, leave=False)
        # A replacement joins, as an orchestrator would start one.
        await self.dep.start_agent(self.dep.new_slot(slot.service), process=slot.proc is not None)

    async def _fault_agent_clock_jump(self) -> None:
        candidates = [s for s in self.dep.slots if s.live and s.proc is not None]
        if not candidates:
            return
        slot = self.rng.choice(candidates)
        await self.dep.stop_agent(slot, leave=True)
        # The same instance id comes back on a host whose clock went back an hour
        # (an NTP step): everything in that process sees the jumped clock.
        again = self.dep.new_slot(slot.service, service_id=slot.service_id)
        await self.dep.start_agent(again, process=True, clock_offset=-3600.0)

    # -- churn between faults

    async def churn(self, steps: int) -> None:
        dep = self.dep
        for _ in range(steps):
            action = self.rng.choice(["join", "leave", "update"])
            movable = [s for s in dep.slots if s.live and not s.stable and s.proc is None]
            if action == "leave" and len(movable) > 2:
                await dep.stop_agent(self.rng.choice(movable), leave=True)
            elif action == "update" and movable:
                agent = self.rng.choice(movable).agent
                assert agent is not None
                await agent.update(metadata={"v": str(self.rng.randrange(1000))})
            else:
                await dep.start_agent(dep.new_slot(self.rng.choice(["svc-a", "svc-b", "svc-c"])))
            self.report.churn[action] += 1

    # -- main loop

    def schedule(self) -> AsyncIterator[str]:
        config, rng = self.config, self.rng

        async def gen() -> AsyncIterator[str]:
            while True:
                if config.cycle:
                    order = list(config.faults)
                    rng.shuffle(order)
                    for kind in order:
                        yield kind
                else:
                    yield rng.choice(config.faults)

        return gen()

    async def count_stable_drops(self) -> None:
        stable = {self.dep.keys.inst(s.service, s.service_id) for s in self.dep.slots if s.stable}
        async with contextlib.aclosing(self.dep.mirrors[0].changes()) as changes:
            async for change in changes:
                inst = change.instance
                if isinstance(change, Removed) and (
                    self.dep.keys.inst(inst.service_name, inst.service_id) in stable
                ):
                    fault = self._fault or "start"
                    self.report.dropped_stable[fault] += 1
                    if fault not in DROPS_EXPECTED:
                        self.violation("pick", f"mirror 0 dropped live instance {inst.service_id}")

    async def run(self) -> ChaosReport:
        start = anyio.current_time()
        async with self.dep.running(), anyio.create_task_group() as tg:
            await self.converge("start", anyio.current_time())
            tg.start_soon(self.count_stable_drops)
            try:
                async for kind in self.schedule():
                    if anyio.current_time() - start > self.config.duration:
                        break
                    await self.fault(kind)
                    self._fault = "churn"
                    await self.churn(2)
                    await self.converge("churn", anyio.current_time())
            except Exception as exc:  # a part that would not come back ends the run
                log.exception("chaos seed=%d: run aborted", self.config.seed)
                self.violation("harness", f"run aborted: {exc!r}")
            tg.cancel_scope.cancel()
        self.report.convergence.pop("start", None)
        self.report.convergence.pop("churn", None)
        self.report.elapsed = anyio.current_time() - start
        return self.report


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run the chaos suite once; returns the report (check ``report.ok``)."""
    return await ChaosRun(config).run()


# -- command line and subprocess entry points --------------------------------------------


async def _serve_registrar(url: str, namespace: str) -> None:
    from ..registrar import Registrar

    # Production settings: rebuild_wait must outlast the agents' re-announce jitter.
    async with Registrar(url, namespace=namespace):
        print("ready", flush=True)  # noqa: T201 - the harness waits for this line
        await anyio.sleep_forever()


async def _serve_agent(
    url: str, namespace: str, name: str, svc_url: str, sid: str, ttl: str
) -> None:
    async with Agent(url, name, svc_url, service_id=sid, ttl=float(ttl), namespace=namespace):
        print("ready", flush=True)  # noqa: T201
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return  # leave the block: the agent says leave


async def _serve_mirror(url: str, namespace: str, dump: str) -> None:
    # Writes its view to ``dump`` (atomically) so the harness can compare it.
    client = connect(url, client_name="chaos-slow-mirror")
    async with Mirror(client, namespace=namespace) as mirror:
        print("ready", flush=True)  # noqa: T201
        last = b""
        while True:
            view = {k: [i.incarnation, i.seq] for k, i in mirror.snapshot().items()}
            data = json.dumps({"stale": mirror.stale, "view": view}, sort_keys=True).encode()
            if data != last:
                tmp = anyio.Path(dump + ".tmp")
                await tmp.write_bytes(data)
                await tmp.replace(dump)
                last = data
            await anyio.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith("_") and os.environ.get("SAGA_CHAOS_LOG_DIR"):
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
    if args and args[0] == "_registrar":
        anyio.run(_serve_registrar, args[1], args[2])
        return 0
    if args and args[0] == "_agent":
        offset = float(args[1])
        if offset:
            real = time.time
            time.time = lambda: real() + offset  # this process's clock jumped
        anyio.run(_serve_agent, *args[2:8])  # type: ignore[arg-type]  # six strings
        return 0
    if args and args[0] == "_mirror":
        anyio.run(_serve_mirror, args[1], args[2], args[3])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m saga_events.testing.chaos", description=__doc__
    )
    parser.add_argument("--seed", type=int, default=None, help="replay this seed")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                        help="run this long with faults drawn at random")  # fmt: skip
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated kinds")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    kinds = tuple(k for k in ns.faults.split(",") if k)
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**31)
    config = ChaosConfig(seed=seed, duration=ns.duration, faults=kinds)
    if ns.soak is not None:
        config.duration = ns.soak * 60
        config.cycle = False
    report = anyio.run(run_chaos, config)
    print(report.summary())  # noqa: T201 - the command's output
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
