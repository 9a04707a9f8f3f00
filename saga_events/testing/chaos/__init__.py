"""The chaos harness: break a real deployment on purpose and check that the registry stays right.

A :class:`Deployment` runs a real ``redis-server``, registrars in subprocesses (so they
can be killed and paused), a gateway (the HTTP API) with seed-style REST clients, many
agents (in-process, plus a few in subprocesses), worker processes that share one name and
URL, and several mirrors. :func:`run_chaos` applies faults in a seeded order, with CPU hogs
during each fault, threads calling ``pick()`` and a hostile publisher beside them, and
checks the invariants :mod:`.harness` states after each heal and during each fault.

Modules: :mod:`.config` (what to run, what was found), :mod:`.deployment` (the parts),
:mod:`.clients` (REST clients, pick threads, hostile publisher, hogs), :mod:`.faults`
(one function per fault kind), :mod:`.harness` (the run and its invariants),
:mod:`.__main__` (the command). Run it by hand::

    python -m saga_events.testing.chaos --seed 7 --duration 60
    python -m saga_events.testing.chaos --soak 10         # ten minutes, random faults
    python -m saga_events.testing.chaos --topology sentinel --duration 60  # failovers

A failing run prints its seed; ``--seed N`` replays the same schedule (timings still
vary from run to run, which is the point).
"""

from __future__ import annotations

from .config import (
    DROPS_EXPECTED,
    FAULTS,
    HOSTILE_SERVICE,
    TOPOLOGY_FAULTS,
    ChaosConfig,
    ChaosReport,
    Violation,
)
from .deployment import AgentSlot, Deployment
from .harness import ChaosRun, run_chaos

__all__ = [
    "DROPS_EXPECTED",
    "FAULTS",
    "HOSTILE_SERVICE",
    "TOPOLOGY_FAULTS",
    "AgentSlot",
    "ChaosConfig",
    "ChaosReport",
    "ChaosRun",
    "Deployment",
    "Violation",
    "run_chaos",
]
