"""The chaos suite on a Sentinel topology: repeated kill -9 of the master, zero violations.

Each ``sentinel_failover`` kills the master the Sentinels name, registers a new agent
right after the kill, waits for it in every mirror (the measured bound), brings the old
master back (the Sentinels make it a replica) and then checks the same invariants as the
one-node suite. Replay with ``SAGA_CHAOS_SEED=<seed>`` or
``python -m saga_events.testing.chaos --topology sentinel --seed <seed>``.
"""

from __future__ import annotations

import os

import pytest

from saga_events.testing.chaos import ChaosConfig, run_chaos
from saga_events.testing.chaos.config import BOUND_VISIBLE

pytestmark = pytest.mark.anyio

SEED = int(os.environ.get("SAGA_CHAOS_SEED", "20261130"))
# The one-node suite's ttl: shorter than a failover here (kill -> promoted -> reachable:
# ~3 s), so the reaper's grace after a stall is what keeps live instances (seed 11 used to
# drop one: "[pick after sentinel_failover] mirror 0 dropped live instance svc-c-3").
TTL = 3.0


def _config(duration: float) -> ChaosConfig:
    return ChaosConfig(
        seed=SEED, duration=duration, faults=("sentinel_failover",), topology="sentinel",
        replica_mirrors=1, http_clients=0, workers=0, cpu_hogs=0, hostile=False,
        hostile_bombs=False, pick_threads=1, agents=6, process_agents=1, ttl=TTL,
    )  # fmt: skip


@pytest.mark.timeout(170)
async def test_registry_stays_right_through_sentinel_failovers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Masters killed one after another while agents (in-process and subprocess), two
    registrars and three mirrors (one reading from a replica) run on the Sentinel URL and
    pick() threads read: after each failover heals, Redis equals the live agents and every
    mirror equals Redis, no mirror dropped a live instance meanwhile, and every mirror
    reported stale while it could not be sure."""
    config = _config(30)
    report = await run_chaos(config)
    with capsys.disabled():
        print("\n" + report.summary())  # noqa: T201 - the figures CI keeps
    assert report.ok, report.summary()
    assert report.injected["sentinel_failover"] >= 2, report.summary()
    failovers = report.injected["sentinel_failover"]
    assert len(report.convergence["sentinel_failover"]) == failovers
    assert len(report.bounds[BOUND_VISIBLE]) == failovers
    assert report.stale_seen["sentinel_failover"] == failovers


@pytest.mark.failover_soak
@pytest.mark.timeout(900)
async def test_sentinel_failover_soak(capsys: pytest.CaptureFixture[str]) -> None:
    """The same for 10 minutes (about 30 failovers), by hand: `pytest -m failover_soak`."""
    report = await run_chaos(_config(600))
    with capsys.disabled():
        print("\n" + report.summary())  # noqa: T201
    assert report.ok, report.summary()
    assert report.stale_seen["sentinel_failover"] == report.injected["sentinel_failover"]
