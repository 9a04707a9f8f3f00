"""Run the benchmark scripts of ``bench/`` (``saga-events bench [SCENARIO]``).

The scripts live outside the package, next to it in a source checkout, and
need the ``bench`` extra. Each runs in its own Python process, exactly as
``python bench/<script>.py`` would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

#: Scenario name → script in bench/, in the order ``all`` runs them.
SCENARIOS: Final = {
    "cache": "cache_latency.py",
    "propagation": "propagation.py",
    "heartbeat": "heartbeat_cost.py",
    "throughput": "registrar_throughput.py",
    "scale": "mirror_scale.py",
    "peers": "peers.py",
    "gateway": "gateway_latency.py",
}


class BenchError(Exception):
    """Raised when the benchmarks cannot run (no bench/ directory, unknown scenario)."""


def bench_dir() -> Path:
    """The ``bench/`` directory: ``$SAGA_BENCH_DIR`` or the one beside the package."""
    env = os.environ.get("SAGA_BENCH_DIR")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "bench"
    if not (path / SCENARIOS["cache"]).is_file():
        raise BenchError(
            f"no benchmark scripts in {path}: run from a source checkout of saga-events "
            "(pip install -e '.[bench]') or set SAGA_BENCH_DIR"
        )
    return path


def script_for(scenario: str) -> Path:
    if scenario not in SCENARIOS:
        names = ", ".join([*SCENARIOS, "all"])
        raise BenchError(f"unknown scenario {scenario!r}; choose one of {names}")
    return bench_dir() / SCENARIOS[scenario]


def run(scenario: str, args: Sequence[str] = ()) -> int:
    """Run one scenario (or ``all`` in turn); return the exit status of the first failure."""
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    scripts = [script_for(name) for name in names]
    for script in scripts:
        status = subprocess.call([sys.executable, str(script), *args])
        if status != 0:
            return status
    return 0
