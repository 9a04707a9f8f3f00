"""The chaos suite on a Redis Cluster: primary kills and migrations of the registry's slot.

``cluster_primary_kill`` kills -9 the primary that owns the ``{ns}`` slot (its replica is
promoted), registers a new agent right after (the bound: kill -> in every mirror), then
brings the old primary back, which the Cluster makes a replica; ``slot_migration`` moves
the slot and its keys to another primary. After each fault heals, the same invariants as
the one-node suite: Redis equals the live agents, every mirror equals Redis, no mirror
dropped a live instance. Replay with ``SAGA_CHAOS_SEED=<seed>`` or
``python -m saga_events.testing.chaos --topology cluster --seed <seed>``.
"""

from __future__ import annotations

import os

import pytest

from saga_events.testing.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.anyio

SEED = int(os.environ.get("SAGA_CHAOS_SEED", "20261130"))
# Longer than a primary kill takes to heal (node timeout 1 s + election, ~2.5 s, twice in a
# row at worst): with the one-node suite's 3 s, heartbeats that could not land during
# back-to-back kills let the reaper drop live instances (the gap docs/DEPLOYMENT.md names
# for Sentinel; seen here with `--topology cluster`, whose CLI default TTL is 3 s).
TTL = 10.0


def cluster_config(duration: float, faults: tuple[str, ...]) -> ChaosConfig:
    return ChaosConfig(
        seed=SEED, duration=duration, faults=faults,
        topology="cluster", replica_mirrors=1, http_clients=0, workers=0, cpu_hogs=0,
        hostile=False, hostile_bombs=False, pick_threads=1, agents=5, process_agents=1,
        ttl=TTL,
    )  # fmt: skip


async def check(config: ChaosConfig, capsys: pytest.CaptureFixture[str]) -> None:
    report = await run_chaos(config)
    with capsys.disabled():
        print("\n" + report.summary())  # noqa: T201 - the figures CI keeps
    assert report.ok, report.summary()
    for fault in config.faults:
        injected = report.injected[fault]
        assert injected >= 1, report.summary()
        assert len(report.convergence[fault]) == injected, report.summary()


@pytest.mark.timeout(150)
async def test_registry_stays_right_through_cluster_faults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short run (in CI): primary kills while agents (in-process and subprocess), two
    registrars and mirrors (one on a replica) run on the Cluster URL: 0 violations after
    convergence, each fault's convergence time reported."""
    await check(cluster_config(25, ("cluster_primary_kill",)), capsys)


@pytest.mark.timeout(150)
async def test_registry_stays_right_through_slot_migrations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A short run (in CI): the registry's slot migrates (MIGRATE deletes each key on the
    source, and the source's replica replays those DELs) while mirrors read from the owner
    and from a replica: no mirror drops a live instance, 0 violations after convergence."""
    await check(cluster_config(20, ("slot_migration",)), capsys)


@pytest.mark.failover_soak
@pytest.mark.timeout(600)
async def test_registry_stays_right_through_many_cluster_faults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The soak (``pytest -m failover_soak``): primary kills and slot migrations mixed, for
    three minutes."""
    await check(cluster_config(180, ("cluster_primary_kill", "slot_migration")), capsys)
