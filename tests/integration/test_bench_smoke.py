"""The benchmark scripts run end to end at tiny size, so they cannot rot.

Each scenario runs as ``saga-events bench SCENARIO --quick`` in its own
process (its own redis-server, registrar and mirror processes) and must
print its table and write a JSON result and a PNG plot of the expected
shape. Timings are never checked here: the benchmarks report them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from saga_events.bench import SCENARIOS, BenchError, bench_dir, script_for

ROW_KEYS = {"name", "unit", "median", "p99", "p999", "samples"}
# Scenario → (JSON file, names of rows that must be there with samples).
EXPECTED: dict[str, tuple[str, list[str]]] = {
    "cache": (
        "cache_latency",
        [
            "mirror.pick()",
            "Redis GET",
            "gateway GET /api/v1/services/{name}",
            "poll-and-cache hit (30 s TTL)",
            "poll-and-cache miss (gateway)",
        ],
    ),
    "propagation": (
        "propagation",
        [
            "saga-events register M=1",
            "saga-events leave M=3",
            "saga-events crash M=3",
            "mirror staleness (same change)",
            "poll-and-cache (0.5 s TTL) staleness",
        ],
    ),
    "heartbeat": (
        "heartbeat_cost",
        [
            "registrar CPU, N=100",
            "Redis commands/s, N=100",
            "mirror messages per heartbeat, N=100",
            "mirror commands per heartbeat, N=100",
        ],
    ),
    "throughput": (
        "registrar_throughput",
        ["1 registrar(s), heartbeats", "2 registrar(s), registers"],
    ),
    "scale": ("mirror_scale", ["cold start, N=1000", "memory (RSS growth), N=1000"]),
    "peers": ("peers", ["saga-events register M=1", "saga-events crash M=2"]),
    "gateway": (
        "gateway_latency",
        [
            "register (answered once visible)",
            "GET /api/v1/services/{name}",
            "change -> last of 20 SSE watchers",
        ],
    ),
}


# The peers scenario starts a JVM ZooKeeper and etcd as well (about 65 s alone on 2 cores):
# its bound is wider, so that a loaded machine does not fail it. Bounds, not timings.
SCENARIO_TIMEOUT = {"peers": 300.0}


def run_scenario(scenario: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "saga_events",
            "bench",
            scenario,
            "--quick",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT.get(scenario, 100.0),
    )


def check_result(result: dict[str, Any], rows: list[str], *, targets: bool = True) -> None:
    assert {"scenario", "machine", "params", "rows", "targets", "notes", "data"} <= set(result)
    assert result["machine"]["cores"] >= 1
    assert result["params"]["quick"] is True
    by_name = {r["name"]: r for r in result["rows"]}
    for name in rows:
        assert name in by_name, f"row {name!r} missing; rows: {sorted(by_name)}"
        row = by_name[name]
        assert ROW_KEYS <= set(row), row
        assert row["samples"] >= 1, row
        assert row["median"] == row["median"], f"median of {name} is NaN"
        assert row["min"] <= row["median"] <= row["max"], row
    for target in result["targets"]:
        assert set(target) == {"target", "measured", "met"}
        assert target["met"] in (True, False, None)
    if targets:
        assert result["targets"], "a scenario reports at least one target"


@pytest.mark.timeout(max(SCENARIO_TIMEOUT.values()) + 20)
@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_bench_scenario_runs_at_tiny_size(scenario: str, tmp_path: Path) -> None:
    """`saga-events bench SCENARIO --quick` prints a table and writes JSON and a PNG."""
    proc = run_scenario(scenario, tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    name, rows = EXPECTED[scenario]
    assert f"== {name} ==" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if "median" in line)
    assert header.split()[:5] == ["unit", "median", "p99", "p99.9", "samples"]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result["scenario"] == name
    # The peers scenario's targets compare saga-events with ZooKeeper and etcd: with
    # neither installed there is nothing to compare (.ci/run installs both from Debian).
    peers_absent = scenario == "peers" and not set(result["data"]["ran"]) - {"saga-events"}
    check_result(result, rows, targets=not peers_absent)
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
    if scenario == "peers":
        data = result["data"]
        assert "saga-events" in data["ran"]
        # ZooKeeper and etcd either ran (rows present) or were skipped with a reason.
        for peer in ("ZooKeeper", "etcd"):
            ran = any(r["name"].startswith(f"{peer} register") for r in result["rows"])
            assert ran == (peer in data["ran"])
            assert ran or data["skipped"][peer], f"{peer} neither ran nor says why"


def test_bench_rejects_unknown_scenario() -> None:
    """An unknown scenario is a clear error naming the valid ones, and runs nothing."""
    with pytest.raises(BenchError, match=r"unknown scenario 'nope'.*cache"):
        script_for("nope")
    proc = subprocess.run(
        [sys.executable, "-m", "saga_events", "bench", "nope"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "unknown scenario 'nope'" in proc.stderr


def test_every_scenario_has_a_script() -> None:
    """Each name `saga-events bench` accepts maps to a script in bench/."""
    for name, script in SCENARIOS.items():
        assert script_for(name) == bench_dir() / script
        assert script_for(name).is_file()
