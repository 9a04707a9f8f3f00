"""Shared plumbing for the benchmark scripts in ``bench/``.

Each script measures one scenario and reports it the same way: a table on
stdout (median, p99, p99.9, samples), a JSON file and a PNG plot in the
output directory (``bench/results/`` by default), and a progress bar on
stderr while it runs. Parts that are separate processes in a real
deployment (redis-server, registrar, mirrors, agents) are separate
processes here too; the children are started from a forkserver so that
fifty mirrors start in seconds, not minutes.

Clocks: every latency is a difference of ``time.monotonic_ns()`` readings,
which Linux keeps system-wide, so a time taken in one process can be
subtracted from one taken in another.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.context
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np
from tqdm import tqdm

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results"
NAMESPACE = "default"

# -- statistics -----------------------------------------------------------------


def summarize(values: Sequence[float], low_tail: bool = False) -> dict[str, float | int]:
    """Median, p99, p99.9, mean, min, max and the sample count of ``values``.

    With ``low_tail`` (rates, where the slow end is the small values) the
    "p99" and "p99.9" are the 1st and 0.1st percentiles.
    """
    if not values:
        return {
            "median": float("nan"),
            "p99": float("nan"),
            "p999": float("nan"),
            "mean": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "samples": 0,
        }
    a = np.asarray(values, dtype=float)
    return {
        "median": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 1 if low_tail else 99)),
        "p999": float(np.percentile(a, 0.1 if low_tail else 99.9)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": len(a),
    }


def ns_to(values: Iterable[int], unit: str) -> list[float]:
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}[unit]
    return [v / scale for v in values]


# -- the report -----------------------------------------------------------------


@dataclass
class Row:
    """One line of a result table: a distribution of samples in one unit."""

    name: str
    unit: str
    stats: dict[str, float | int]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, **self.stats, **self.extra}


@dataclass
class Target:
    """A target of the issue and whether this run met it."""

    text: str
    measured: str
    met: bool | None  # None: not measured in this run

    def as_json(self) -> dict[str, Any]:
        return {"target": self.text, "measured": self.measured, "met": self.met}


@dataclass
class Report:
    scenario: str
    params: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    load_start: list[float] = field(default_factory=lambda: [round(x, 2) for x in os.getloadavg()])

    def add(
        self, name: str, unit: str, values: Sequence[float], low_tail: bool = False, **extra: Any
    ) -> Row:
        row = Row(name, unit, summarize(values, low_tail), dict(extra))
        self.rows.append(row)
        return row

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def target(self, text: str, measured: str, met: bool | None) -> None:
        self.targets.append(Target(text, measured, met))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "started": datetime.fromtimestamp(self.started, tz=UTC).isoformat(),
            "duration_s": round(time.time() - self.started, 2),
            "machine": {**machine_info(), "loadavg_start": self.load_start},
            "code": code_version(),
            "params": self.params,
            "rows": [r.as_json() for r in self.rows],
            "targets": [t.as_json() for t in self.targets],
            "notes": self.notes,
            "data": self.data,
        }

    def table(self) -> str:
        headers = ["", "unit", "median", "p99", "p99.9", "samples"]
        extra_keys: list[str] = []
        for r in self.rows:
            for k in r.extra:
                if k not in extra_keys and not isinstance(r.extra[k], list | dict):
                    extra_keys.append(k)
        headers += extra_keys
        lines = [
            [
                r.name,
                r.unit,
                fmt(r.stats["median"]),
                fmt(r.stats["p99"]),
                fmt(r.stats["p999"]),
                str(r.stats["samples"]),
                *(fmt(r.extra.get(k, "")) for k in extra_keys),
            ]
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(headers, *lines, strict=False)]
        out = []
        for i, line in enumerate([headers, *lines]):
            cells = [
                str(c).ljust(w) if j == 0 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            out.append("  ".join(cells).rstrip())
            if i == 0:
                out.append("-" * len(out[0]))
        for t in self.targets:
            mark = {True: "met", False: "MISSED", None: "n/a"}[t.met]
            out.append(f"target [{mark}] {t.text}: {t.measured}")
        for n in self.notes:
            out.append(f"note: {n}")
        m = machine_info()
        out.append(
            f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average "
            f"{self.load_start[0]:.1f} at start, {m['loadavg'][0]:.1f} at end"
        )
        return "\n".join(out)

    def finish(self, out_dir: Path, plot: Callable[[Report, Any], None] | None) -> Path:
        """Print the table, write ``<scenario>.json`` and ``.png``; return the JSON path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        sys.stdout.write(f"\n== {self.scenario} ==\n{self.table()}\n")
        path = out_dir / f"{self.scenario}.json"
        path.write_text(json.dumps(self.as_json(), indent=1, default=str) + "\n")
        if plot is not None:
            import matplotlib.pyplot as plt

            fig = plt.figure(figsize=(7.5, 4.2), dpi=90)
            try:
                plot(self, fig)
                fig.tight_layout()
                fig.savefig(out_dir / f"{self.scenario}.png")
            finally:
                plt.close(fig)
        sys.stdout.write(f"results: {path}\n")
        sys.stdout.flush()
        return path


def finish(report: Report, args: argparse.Namespace, plot: Callable[[Report, Any], None]) -> int:
    """The end of a scenario's ``main``: the ``--quick`` note, then the JSON, the table
    and the plot in ``args.out``; the exit status (0)."""
    if args.quick:
        report.note("--quick: tiny sizes, the figures mean nothing")
    report.finish(args.out, plot)
    return 0


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN
        return "-"
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def code_version() -> str:
    """The git commit of the checkout, with ``+dirty`` when it has uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, timeout=5
        ).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}+dirty" if dirty.strip() else head or "unknown"


_MACHINE: dict[str, Any] | None = None


def machine_info() -> dict[str, Any]:
    global _MACHINE
    if _MACHINE is None:
        cpu = platform.processor() or "?"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = "?"
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) // 1024} MiB"
        except OSError:
            pass
        _MACHINE = {
            "host": socket.gethostname(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory": mem,
            "kernel": platform.release(),
            "python": platform.python_version(),
        }
    info = dict(_MACHINE)
    info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info


# -- command line -----------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: seconds, for the smoke test (figures mean nothing)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for the JSON and PNG results (default {DEFAULT_OUT})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_PROGRESS_ENABLED = True


def configure(args: argparse.Namespace) -> None:
    global _PROGRESS_ENABLED
    _PROGRESS_ENABLED = not args.no_progress
    # SIGTERM unwinds like Ctrl-C, so the servers this script started are stopped.
    signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def progress(total: int, desc: str) -> tqdm[Any]:
    """A progress bar on stderr."""
    return tqdm(
        total=total,
        desc=desc,
        unit="",
        leave=False,
        dynamic_ncols=True,
        disable=not _PROGRESS_ENABLED,
        mininterval=0.25,
    )


def say(text: str) -> None:
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


# -- processes ----------------------------------------------------------------------

_CTX: multiprocessing.context.ForkServerContext | None = None


def mp() -> multiprocessing.context.ForkServerContext:
    """The multiprocessing context: a forkserver with the heavy imports preloaded."""
    global _CTX
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))
        ctx.set_forkserver_preload(["_harness", "_roles"])
        _CTX = ctx
    return _CTX


@contextmanager
def redis_server(*extra_args: str) -> Iterator[Any]:
    """A private redis-server for one scenario."""
    from saga_events.embedded import RedisServer

    with RedisServer(extra_args=extra_args) as server:
        yield server


def wait_until(check: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def stop_processes(procs: Iterable[multiprocessing.process.BaseProcess]) -> None:
    procs = list(procs)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
