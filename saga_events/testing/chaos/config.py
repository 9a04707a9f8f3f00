"""What a chaos run does (:class:`ChaosConfig`) and what it found (:class:`ChaosReport`).

Contract: every fault kind is named in :data:`FAULTS` and every kind of client or
background hazard has its own switch in :class:`ChaosConfig` (a count of 0 or False
turns it off), so a run can enable exactly the kinds a fix makes pass.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

#: Every fault kind, in the order the docs list them.
FAULTS: Final = (
    "redis_restart",  # kill -9, restart empty on the same port
    "redis_pause",  # SIGSTOP 2-5 s, then SIGCONT
    "mirror_conn_kill",  # CLIENT KILL of one mirror's subscription
    "registrar_kill",  # kill -9 one registrar, restart it
    "registrar_pause",  # SIGSTOP one of two registrars 2-5 s (the other keeps going)
    "flags_reset",  # CONFIG SET notify-keyspace-events "" (a registrar puts it back)
    "flags_flip",  # a third party clears the flags and puts them back within ~1 s
    "slow_mirror",  # a mirror cut off by the pub/sub output-buffer limit
    "agent_crash",  # an agent stops without leave (in-process or kill -9)
    "agent_clock_jump",  # an agent restarts with its clock an hour behind
    "worker_recycle",  # one of the worker processes sharing a name and URL is recycled
)

#: Topology faults (opt in with ``ChaosConfig(topology=...)``), listed apart so that a
#: one-node run keeps running every kind of :data:`FAULTS`.
TOPOLOGY_FAULTS: Final = (
    "sentinel_failover",  # kill -9 the Sentinel master, a replica promoted, the old one back
    "cluster_primary_kill",  # kill -9 the registry slot's owner, its replica promoted
    "slot_migration",  # the registry's slot and keys moved to another primary
)

#: The bounds a topology fault measures (seconds from the kill), as named in the report.
BOUND_VISIBLE: Final = "kill -> new registration in every mirror"

#: Faults after which a mirror may drop a live instance for a moment: none.
DROPS_EXPECTED: Final = frozenset[str]()

#: The prefix of the service names the hostile publisher's valid-looking floods use; left
#: out of the comparisons (its instances come and go on their own, which is the point).
HOSTILE_SERVICE: Final = "zz-hostile"


@dataclass
class ChaosConfig:
    """What to run. ``duration`` bounds the whole run (faults stop being started
    after it); ``faults`` limits the kinds; ``cycle`` runs each kind once per
    round in a seeded order (CI) instead of drawing them at random (soak).

    The client kinds, each switchable (0 / False turns it off):

    * ``http_clients``: seed-style clients of a gateway (register with ``http_ttl``,
      heartbeat every ``http_ttl``/2, re-register on 404) on service ``svc-h``; stable.
    * ``workers``: processes sharing one name and URL through
      ``SagaServiceDiscovery(redis_url=...)``; ``worker_recycle`` replaces one.
    * ``pick_threads``: OS threads calling ``mirror.pick()`` in a loop; any exception
      is a violation.
    * ``cpu_hogs``: busy-loop processes started for a few seconds at each fault.
    * ``drains``: instances of ``svc-d`` drained by an operator through the gateway
      (needs ``http_clients``), beside one serving; never picked, never lost.
    * ``hostile``: a publisher of floods of fresh ids and leaves for unknown ids beside
      the faults, and with ``hostile_bombs`` JSON bombs, 1 MB and non-JSON messages.
    """

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
    http_clients: int = 2
    http_ttl: float = 20.0  # REST clients heartbeat every http_ttl/2, as the seed's loop
    workers: int = 2
    pick_threads: int = 2
    cpu_hogs: int = 2
    drains: int = 1
    hostile: bool = True
    hostile_bombs: bool = True  # with hostile: JSON bombs, 1 MB and non-JSON messages too
    topology: str = ""  # "": one redis-server; "sentinel": master, 2 replicas, 3 Sentinels;
    #                     "cluster": 3 primaries with a replica each
    replica_mirrors: int = 0  # with a topology: how many mirrors read_from=replica

    def classic(self) -> ChaosConfig:
        """This config with every client kind added after the first release turned off."""
        self.http_clients = self.workers = self.pick_threads = self.cpu_hogs = self.drains = 0
        self.hostile = self.hostile_bombs = False
        self.faults = tuple(f for f in self.faults if f not in ("flags_flip", "worker_recycle"))
        return self


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
    clients: Counter[str] = field(default_factory=Counter)  # per client kind: what it did
    elapsed: float = 0.0
    bounds: dict[str, list[float]] = field(default_factory=dict)  # BOUND_* -> seconds

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        lines = [f"chaos seed={self.seed}: {sum(self.injected.values())} faults in "
                 f"{self.elapsed:.0f} s, {len(self.violations)} violations"]  # fmt: skip
        for kind in (*FAULTS, *TOPOLOGY_FAULTS):
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
        for name, times in self.bounds.items():
            lines.append(
                f"  {name}: median {statistics.median(times):.2f} s, "
                f"worst {max(times):.2f} s over {len(times)}"
            )
        if self.churn:
            lines.append("  churn: " + ", ".join(f"{k} {v}" for k, v in sorted(self.churn.items())))
        if self.clients:
            lines.append(
                "  clients: " + ", ".join(f"{k} {v}" for k, v in sorted(self.clients.items()))
            )
        by_kind = Counter(v.kind for v in self.violations)
        if by_kind:
            per_kind = ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
            lines.append(f"  violations: {per_kind}")
        for v in self.violations[:40]:
            lines.append(f"  VIOLATION {v}")
        if len(self.violations) > 40:
            lines.append(f"  ... and {len(self.violations) - 40} more")
        if self.violations:
            lines.append(f"replay with: python -m saga_events.testing.chaos --seed {self.seed}")
        return "\n".join(lines)
