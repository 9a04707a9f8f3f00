"""The faults a chaos run injects, one function per kind in :data:`~.config.FAULTS`, and churn.

Contract: ``await FAULT_FUNCS[kind](run)`` injects the fault and returns once it has healed
(the harness then checks convergence); a fault may set ``run._require_stale`` when every
mirror must have reported ``stale`` meanwhile. Faults draw their parameters from
``run.rng`` only, so a seed replays the same schedule.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread

from ..._wait import eventually
from ...embedded_topology import info
from ...topology import slot_of
from .config import BOUND_VISIBLE
from .deployment import child, wait_ready

if TYPE_CHECKING:
    from .harness import ChaosRun


async def redis_restart(self: ChaosRun) -> None:
    self._require_stale = True
    await anyio.to_thread.run_sync(self.dep.server.restart)
    # Healed once Redis answers again; the rebuild is part of converging.
    await eventually(lambda: all(m.stale for m in self.dep.mirrors), 10, what="stale")
    await anyio.sleep(0.1)  # let the watcher sample it too


async def redis_pause(self: ChaosRun) -> None:
    pause = self.rng.uniform(2.0, 5.0)
    mirror = self.dep.mirrors[0]
    # A mirror can only know after its health timeout plus one ping interval.
    self._require_stale = pause > mirror.health_timeout + mirror.health_interval + 0.5
    self.dep.server.pause()
    try:
        await anyio.sleep(pause)
    finally:
        self.dep.server.resume()


async def mirror_conn_kill(self: ChaosRun) -> None:
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


async def registrar_kill(self: ChaosRun) -> None:
    i = self.rng.randrange(len(self.dep.registrars))
    self.dep.kill_registrar(i)
    await churn(self, 1)  # changes while a registrar is gone
    await anyio.sleep(self.rng.uniform(0.5, 2.0))
    await self.dep.start_registrar(i)


async def registrar_pause(self: ChaosRun) -> None:
    live = [p for p in self.dep.registrars if p is not None]
    proc = self.rng.choice(live)
    proc.send_signal(signal.SIGSTOP)
    try:
        # The other registrar keeps applying; the paused one gets a backlog
        # with leaves in it, which it must not undo when it wakes.
        await churn(self, 3)
        await anyio.sleep(self.rng.uniform(2.0, 5.0))
        # And a crash: the backlog holds the victim's last heartbeats, and the other
        # registrar reaps it meanwhile; nothing older than the reap may bring it back.
        dep = self.dep
        victims = [s for s in dep.slots if s.live and not s.stable and s.agent is not None]
        if victims:
            victim = self.rng.choice(victims)
            key = dep.keys.inst(victim.service, victim.service_id)
            await dep.stop_agent(victim, leave=False)
            self.report.churn["crash"] += 1

            async def reaped() -> bool:
                return key not in await dep.truth()

            limit = 4 * self.config.ttl + 5
            await eventually(reaped, limit, interval=0.1, what=f"{key} reaped")
    finally:
        proc.send_signal(signal.SIGCONT)


async def flags_reset(self: ChaosRun) -> None:
    assert self.dep.admin is not None
    reset_at = anyio.current_time()
    await self.dep.admin.config_set("notify-keyspace-events", "")
    await churn(self, 2)  # changes the mirrors cannot hear about

    async def restored() -> bool:
        assert self.dep.admin is not None
        flags = await self.dep.admin.config_get("notify-keyspace-events")
        value = next(iter(flags.values()), b"")
        return bool(value)

    await eventually(restored, 15, interval=0.1, what="flags re-applied by a registrar")
    # A mirror learns of the reset only when its canary goes quiet.
    off = anyio.current_time() - reset_at
    self._require_stale = off > self.dep.mirrors[0].canary_timeout + 1.0


async def slow_mirror(self: ChaosRun) -> None:
    dep = self.dep
    assert dep.admin is not None
    old = await dep.admin.config_get("client-output-buffer-limit")
    previous = next(iter(old.values()))
    if dep.slow_mirror is None or dep.slow_mirror.poll() is not None:
        dep.slow_mirror = child("_mirror", dep.url, self.config.namespace, dep.slow_dump)
        await wait_ready(dep.slow_mirror, "slow mirror")
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


async def agent_crash(self: ChaosRun) -> None:
    candidates = [s for s in self.dep.slots if s.live and not s.stable]
    if not candidates:
        return
    slot = self.rng.choice(candidates)
    await self.dep.stop_agent(slot, leave=False)
    # A replacement joins, as an orchestrator would start one.
    await self.dep.start_agent(self.dep.new_slot(slot.service), process=slot.proc is not None)


async def agent_clock_jump(self: ChaosRun) -> None:
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


async def churn(self: ChaosRun, steps: int) -> None:
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


async def flags_flip(self: ChaosRun) -> None:
    """A third party (an operator, a config-management run) clears notify-keyspace-events
    and puts the old value back within about a second, while a change is made: the
    change's notification is lost, and the mirrors must still converge."""
    dep = self.dep
    assert dep.admin is not None
    old = await dep.admin.config_get("notify-keyspace-events")
    previous = _text(next(iter(old.values()), b""))
    await dep.admin.config_set("notify-keyspace-events", "")
    try:
        movable = [s for s in dep.slots if s.live and not s.stable and s.agent is not None]
        if movable:
            agent = self.rng.choice(movable).agent
            assert agent is not None
            await agent.update(metadata={"flip": str(self.rng.randrange(1000))})
            self.report.churn["update"] += 1
        await dep.start_agent(dep.new_slot(self.rng.choice(["svc-a", "svc-b", "svc-c"])))
        self.report.churn["join"] += 1
        await anyio.sleep(self.rng.uniform(0.3, 0.8))
    finally:
        await dep.admin.config_set("notify-keyspace-events", previous)


async def worker_recycle(self: ChaosRun) -> None:
    """One of the worker processes sharing a name and URL is recycled (as gunicorn's
    max_requests does): the youngest stops cleanly, a new one starts. The survivors must
    stay visible throughout."""
    dep = self.dep
    if len(dep.worker_slots) < 2:
        return
    youngest = dep.worker_slots[-1]
    await dep.recycle_worker(youngest)
    await anyio.sleep(self.rng.uniform(0.5, 1.5))
    await dep.start_worker()


async def sentinel_failover(self: ChaosRun) -> None:
    """kill -9 the master the Sentinels name; an agent registers right after the kill (the
    bound: kill -> in every mirror); then the old master comes back empty and the
    Sentinels make it a replica of the promoted one. Every mirror must report stale
    meanwhile: what it serves may miss writes the dead master never replicated."""
    dep = self.dep
    group = dep.group
    if group is None:
        raise RuntimeError("sentinel_failover needs ChaosConfig(topology='sentinel')")
    self._require_stale = True
    killed_at = anyio.current_time()
    old = await anyio.to_thread.run_sync(group.kill_master)
    slot = dep.new_slot(self.rng.choice(["svc-a", "svc-b", "svc-c"]))
    key = dep.keys.inst(slot.service, slot.service_id)

    async with anyio.create_task_group() as tg:
        tg.start_soon(dep.start_agent, slot)
        limit = self.config.settle_timeout + 30
        await eventually(lambda: all(key in m.snapshot() for m in dep.mirrors), limit,
                         interval=0.02, what=f"{key} in every mirror after the kill")  # fmt: skip
        self.report.bounds.setdefault(BOUND_VISIBLE, []).append(anyio.current_time() - killed_at)
    self.report.churn["join"] += 1
    await anyio.to_thread.run_sync(old.start)
    await anyio.to_thread.run_sync(group.wait_settled)
    await anyio.to_thread.run_sync(dep.set_replica_flags)  # the old master, now a replica


async def _register_and_wait(self: ChaosRun, started: float, limit: float) -> None:
    """A new agent registers now; wait until it is in every mirror; note the time taken."""
    dep = self.dep
    slot = dep.new_slot(self.rng.choice(["svc-a", "svc-b", "svc-c"]))
    key = dep.keys.inst(slot.service, slot.service_id)
    async with anyio.create_task_group() as tg:
        tg.start_soon(dep.start_agent, slot)
        await eventually(lambda: all(key in m.snapshot() for m in dep.mirrors), limit,
                         interval=0.02, what=f"{key} in every mirror after the fault")  # fmt: skip
    self.report.bounds.setdefault(f"{self._fault}: fault -> new registration in every mirror",
                                  []).append(anyio.current_time() - started)  # fmt: skip
    self.report.churn["join"] += 1


async def cluster_primary_kill(self: ChaosRun) -> None:
    """kill -9 the primary that owns the registry's slot; its replica is promoted by the
    Cluster; a registration right after; then the old primary comes back as a replica."""
    dep = self.dep
    cluster = dep.cluster
    if cluster is None:
        raise RuntimeError("cluster_primary_kill needs ChaosConfig(topology='cluster')")
    self._require_stale = True
    slot = slot_of(self.config.namespace)
    owner = await anyio.to_thread.run_sync(cluster.owner, slot)
    started = anyio.current_time()
    owner.kill()
    await _register_and_wait(self, started, self.config.settle_timeout + 30)
    await anyio.to_thread.run_sync(owner.start)
    await anyio.to_thread.run_sync(cluster.wait_ok)
    await anyio.to_thread.run_sync(dep.set_replica_flags)


async def slot_migration(self: ChaosRun) -> None:
    """Move the registry's slot (and its keys) to another primary while clients run."""
    dep = self.dep
    cluster = dep.cluster
    if cluster is None:
        raise RuntimeError("slot_migration needs ChaosConfig(topology='cluster')")
    slot = slot_of(self.config.namespace)
    owner = await anyio.to_thread.run_sync(cluster.owner, slot)

    def other_primaries() -> list[Any]:
        live = [n for n in cluster.nodes if n.process is not None and n is not owner]
        return [n for n in live if info(n, "replication").get("role") == "master"]

    target = self.rng.choice(await anyio.to_thread.run_sync(other_primaries))
    started = anyio.current_time()
    await anyio.to_thread.run_sync(cluster.migrate_slot, slot, target)
    await _register_and_wait(self, started, self.config.settle_timeout + 30)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


FAULT_FUNCS: Final[dict[str, Callable[[ChaosRun], Awaitable[None]]]] = {
    "redis_restart": redis_restart,
    "redis_pause": redis_pause,
    "mirror_conn_kill": mirror_conn_kill,
    "registrar_kill": registrar_kill,
    "registrar_pause": registrar_pause,
    "flags_reset": flags_reset,
    "flags_flip": flags_flip,
    "slow_mirror": slow_mirror,
    "agent_crash": agent_crash,
    "agent_clock_jump": agent_clock_jump,
    "worker_recycle": worker_recycle,
    "sentinel_failover": sentinel_failover,
    "cluster_primary_kill": cluster_primary_kill,
    "slot_migration": slot_migration,
}
