"""The chaos suite, short and seeded: every fault kind, zero invariant violations.

Replay a failure with ``SAGA_CHAOS_SEED=<seed> pytest tests/integration/test_chaos.py``
or ``python -m saga_events.chaos --seed <seed>``; soak with ``--soak MINUTES``.
"""

from __future__ import annotations

import os

import pytest

from saga_events.chaos import FAULTS, ChaosConfig, run_chaos

pytestmark = pytest.mark.anyio

SEED = int(os.environ.get("SAGA_CHAOS_SEED", "20261127"))
DURATION = float(os.environ.get("SAGA_CHAOS_SECONDS", "45"))


@pytest.mark.timeout(DURATION + 90)
async def test_registry_stays_right_under_seeded_faults(capsys: pytest.CaptureFixture[str]) -> None:
    """Redis killed and paused, connections cut, registrars killed and paused, flags reset,
    a slow mirror cut off, agents crashed and clock-jumped: after each fault heals, every
    mirror equals Redis and Redis equals the live agents; pick() never fails meanwhile."""
    report = await run_chaos(ChaosConfig(seed=SEED, duration=DURATION))
    with capsys.disabled():
        print("\n" + report.summary())  # noqa: T201 - the note CI keeps: faults per kind
    assert report.ok, report.summary()
    assert set(report.injected) == set(FAULTS), f"not every fault kind ran: {report.injected}"
    assert set(report.convergence) == set(FAULTS)
