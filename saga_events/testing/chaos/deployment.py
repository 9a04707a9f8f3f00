"""The deployment a chaos run breaks: real Redis, registrars, a gateway, agents, clients, mirrors.

Contract: :class:`Deployment` starts every part (subprocesses where a fault needs to kill
or pause them), knows which instances should be live (:meth:`Deployment.expected`) and
reads what Redis really holds (:meth:`Deployment.truth`, by SCAN). It decides nothing
about correctness: the invariants live in :mod:`.harness`. With ``config.topology ==
"sentinel"`` the registry lives on a :class:`~saga_events.embedded_topology.SentinelGroup`
and every part is given its ``redis+sentinel://`` URL (the last ``replica_mirrors``
mirrors read from replicas); ``"cluster"`` runs an
:class:`~saga_events.embedded_topology.EmbeddedCluster` (3 primaries, a replica each; not
yet in CI: see docs/DEPLOYMENT.md, Known gaps). The harness sets the notification flags on
every replica (CONFIG is not replicated, and the registrar sets them on the master only).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import redis.asyncio as aioredis

from ... import model
from ..._redis import connect
from ..._topology_pool import topology_of
from ..._wait import eventually
from ...agent import Agent
from ...embedded import RedisServer, free_port
from ...embedded_topology import EmbeddedCluster, SentinelGroup, client
from ...keys import Keys
from ...mirror import Mirror
from .config import HOSTILE_SERVICE, ChaosConfig

CHILD_MODULE = "saga_events.testing.chaos"
HTTP_SERVICE = "svc-h"
WORKER_SERVICE = "svc-w"
WORKER_URL = "http://10.9.0.1:9000"  # one URL for every worker process, as under gunicorn


# -- subprocess parts ---------------------------------------------------------------


def child(*args: str) -> subprocess.Popen[str]:
    # SAGA_CHAOS_LOG_DIR=DIR keeps each child's log (INFO) in DIR, for post-mortems.
    log_dir = os.environ.get("SAGA_CHAOS_LOG_DIR")
    stderr: Any = subprocess.DEVNULL
    if log_dir:
        stderr = open(  # handed to the child, closed below
            os.path.join(log_dir, f"{args[0].strip('_')}-{time.time_ns()}.log"), "ab"
        )
    try:
        return subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # a SIGINT to the harness is not theirs
        )
    finally:
        if log_dir:
            stderr.close()


async def wait_ready(proc: subprocess.Popen[str], what: str, timeout: float = 20.0) -> str:  # noqa: ASYNC109
    """Wait (bounded) for the child's ``ready ...`` line; return what follows ``ready``."""
    assert proc.stdout is not None
    stdout = proc.stdout
    with anyio.fail_after(timeout):
        line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
    if not line.startswith("ready"):
        raise RuntimeError(f"{what} did not start (exit {proc.poll()}): {line!r}")
    return line[len("ready") :].strip()


def kill(proc: subprocess.Popen[str] | None) -> None:
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
    kind: str = "agent"  # "agent", "http" (a seed-style REST client) or "worker"
    agent: Agent | None = None
    scope: anyio.CancelScope | None = None
    proc: subprocess.Popen[str] | None = None
    live: bool = False
    # kind "http": when the last register or heartbeat answered 200 was sent (the
    # harness's clock): Redis moved the deadline to at least this + ttl (clients.lapsed)
    confirmed: float | None = None


class Deployment:
    """A real Redis, subprocess registrars, agents and mirrors; faults on demand."""

    def __init__(self, config: ChaosConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.keys = Keys(config.namespace)
        self.server = RedisServer()
        self.group: SentinelGroup | None = None
        self.cluster: EmbeddedCluster | None = None
        if config.topology == "sentinel":
            self.group = SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000)
        elif config.topology == "cluster":
            self.cluster = EmbeddedCluster(primaries=3, replicas=1, node_timeout_ms=1000)
        elif config.topology:
            raise ValueError(
                f"chaos topology {config.topology!r}: expected '', 'sentinel' or 'cluster'"
            )
        self.registrars: list[subprocess.Popen[str] | None] = []
        self.slots: list[AgentSlot] = []
        self.mirrors: list[Mirror] = []
        self._ids = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self.admin: aioredis.Redis | None = None
        self.slow_mirror: subprocess.Popen[str] | None = None
        self._clients: list[aioredis.Redis] = []
        self.slow_dump = os.path.join(self.server.directory, "slow-mirror.json")
        self.gateway: subprocess.Popen[str] | None = None
        self.gateway_port = free_port()
        self.worker_slots: list[AgentSlot] = []
        self._dead_seen: set[int] = set()
        self.reused: set[str] = set()  # instance keys a new slot took over on purpose

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def url(self) -> str:
        if self.cluster is not None:
            return self.cluster.url
        return self.group.url if self.group is not None else self.server.url

    def set_replica_flags(self) -> None:
        """Set the notification flags on every live node but the master (the registrar sets
        them on the node it writes to, not on replicas; a Cluster: on every node)."""
        if self.cluster is not None:
            nodes, master = self.cluster.nodes, None
        elif self.group is not None:
            nodes, master = self.group.nodes, self.group.master()
        else:
            return
        for node in nodes:
            if node is not master and node.process is not None:
                with client(node) as c:
                    c.config_set("notify-keyspace-events", "KEg$xe")

    # -- lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Deployment]:
        topology = self.group or self.cluster
        if topology is not None:
            await anyio.to_thread.run_sync(topology.start)
            await anyio.to_thread.run_sync(self.set_replica_flags)
            self.admin = connect(self.url, namespace=self.config.namespace, socket_timeout=10)
        else:
            await anyio.to_thread.run_sync(self.server.start)
            self.admin = aioredis.Redis.from_url(self.url, socket_timeout=10)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    for _ in range(self.config.registrars):
                        self.registrars.append(None)
                        await self.start_registrar(len(self.registrars) - 1)
                    on_replica = self.config.mirrors - self.config.replica_mirrors
                    for i in range(self.config.mirrors):
                        # Named connections: a fault can target one mirror's subscription.
                        url = self.url
                        if (self.group or self.cluster) is not None and i >= on_replica:
                            url += "?read_from=replica"
                        conn = connect(url, client_name=f"chaos-mirror-{i}",
                                       namespace=self.config.namespace)  # fmt: skip
                        self._clients.append(conn)
                        mirror = Mirror(conn, namespace=self.config.namespace)
                        await tg.start(mirror.run)
                        self.mirrors.append(mirror)
                    services = ["svc-a", "svc-b", "svc-c"]
                    for i in range(self.config.agents):
                        slot = self.new_slot(services[i % len(services)], stable=i < len(services))
                        await self.start_agent(slot)
                    for _ in range(self.config.process_agents):
                        await self.start_agent(self.new_slot("svc-p"), process=True)
                    if self.config.http_clients:
                        await self.start_gateway()
                    for _ in range(self.config.workers):
                        await self.start_worker()
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            for slot in self.slots:
                kill(slot.proc)
            for proc in self.registrars:
                kill(proc)
            kill(self.slow_mirror)
            kill(self.gateway)
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
            if self.group is not None:
                self.group.close()
            if self.cluster is not None:
                self.cluster.close()

    async def start_registrar(self, index: int) -> None:
        proc = child("_registrar", self.url, self.config.namespace)
        self.registrars[index] = proc
        await wait_ready(proc, "registrar")

    def kill_registrar(self, index: int) -> None:
        kill(self.registrars[index])
        self.registrars[index] = None

    def dead_children(self) -> list[str]:
        """The registrars and the gateway that should run but exited since the last call."""
        named = [(f"registrar {i}", p) for i, p in enumerate(self.registrars)]
        named.append(("gateway", self.gateway))
        dead = []
        for name, proc in named:
            if proc is not None and proc.poll() is not None and proc.pid not in self._dead_seen:
                self._dead_seen.add(proc.pid)
                dead.append(f"{name} (pid {proc.pid}, exit {proc.returncode})")
        return dead

    async def start_gateway(self) -> None:
        """A registrar with the HTTP API (the seed's REST API) on a fixed port, in a child."""
        self.gateway = child("_gateway", self.url, self.config.namespace, str(self.gateway_port))
        await wait_ready(self.gateway, "gateway", timeout=40)

    # -- worker processes: one name and URL, SagaServiceDiscovery(redis_url=...)

    async def start_worker(self) -> AgentSlot:
        proc = child("_worker", self.url, self.config.namespace, WORKER_SERVICE, WORKER_URL,
                     str(self.config.ttl))  # fmt: skip
        sid = await wait_ready(proc, "worker", timeout=40)
        slot = AgentSlot(WORKER_SERVICE, sid, WORKER_URL, kind="worker", proc=proc, live=True)
        self.slots.append(slot)
        self.worker_slots.append(slot)
        return slot

    async def recycle_worker(self, slot: AgentSlot) -> None:
        """Stop one worker as a process manager recycles it (SIGTERM: it unregisters)."""
        await self.stop_agent(slot, leave=True)
        self.worker_slots.remove(slot)

    # -- agents

    def new_slot(
        self, service: str, *, stable: bool = False, service_id: str | None = None
    ) -> AgentSlot:
        self._ids += 1
        sid = service_id or f"{service}-{self._ids}"
        if service_id is not None:
            self.reused.add(self.keys.inst(service, sid))
        slot = AgentSlot(
            service, sid, f"http://10.1.0.{self._ids % 250}:{8000 + self._ids}", stable
        )
        self.slots.append(slot)
        return slot

    def expected(self) -> set[str]:
        return {self.keys.inst(s.service, s.service_id) for s in self.slots if s.live}

    def counted(self, key: str) -> bool:
        """Whether ``key`` takes part in the comparisons (the hostile floods do not)."""
        parsed = self.keys.parse_inst(key)
        return parsed is None or not parsed[0].startswith(HOSTILE_SERVICE)

    async def start_agent(
        self, slot: AgentSlot, *, process: bool = False, clock_offset: float = 0.0
    ) -> None:
        if process:
            slot.proc = child(
                "_agent", str(clock_offset), self.url, self.config.namespace, slot.service,
                slot.url, slot.service_id, str(self.config.ttl),
            )  # fmt: skip
            await wait_ready(slot.proc, "agent")
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
                            f"{slot.kind} process {slot.proc.pid} ignored SIGINT for 20 s"
                        ) from None
            finally:
                kill(slot.proc)
            return
        assert slot.scope is not None and slot.agent is not None
        slot.scope.cancel()
        if leave:
            # No registrar may be listening right now (one is killed; on a topology, the
            # registrars may still be resubscribing after a failover): retry.
            limit = self.config.settle_timeout if self.config.topology else 5
            await eventually(slot.agent.leave, limit, interval=0.1, what="leave received")
        await slot.agent.aclose()

    # -- what the mirrors see

    async def truth(self) -> dict[str, model.Instance]:
        """Every counted record in Redis, found by SCAN (not the index), as
        testing.registry_truth; repeated here so the harness runs without the test extra."""
        assert self.admin is not None
        topology = topology_of(self.admin)
        if topology is not None:
            # SCAN names no key, so a Cluster never answers it MOVED: after a slot
            # migration the admin client would scan the old owner (empty) for ever.
            topology.refresh()
        found: dict[str, model.Instance] = {}
        async for raw_key in self.admin.scan_iter(match=f"{self.keys.inst_prefix}*", count=1000):
            raw = await self.admin.get(raw_key)
            if raw is not None and self.counted(_text(raw_key)):
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
        """The subscription connections (1 pattern, 4 channels) of the mirror named ``name``."""
        assert self.admin is not None
        clients = await self.admin.client_list()
        return [
            c
            for c in clients
            if c.get("name") == name and str(c.get("psub")) == "1" and str(c.get("sub")) == "4"
        ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
