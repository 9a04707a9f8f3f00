"""Print the results in ``bench/results/`` as Markdown tables (for docs/BENCHMARKS.md).

python bench/summarize.py [--out bench/results] [--copy-plots docs/img]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

ORDER = [
    "cache_latency",
    "propagation",
    "heartbeat_cost",
    "registrar_throughput",
    "mirror_scale",
    "peers",
]


def table(result: dict[str, Any]) -> str:
    extra_keys: list[str] = []
    for row in result["rows"]:
        for k, v in row.items():
            if k in {"name", "unit", "median", "p99", "p999", "samples", "mean", "min", "max"}:
                continue
            if isinstance(v, list | dict) or k in extra_keys:
                continue
            extra_keys.append(k)
    head = ["", "unit", "median", "p99", "p99.9", "samples", *extra_keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [
            row["name"],
            row["unit"],
            h.fmt(row["median"]),
            h.fmt(row["p99"]),
            h.fmt(row["p999"]),
            str(row["samples"]),
            *(h.fmt(row.get(k, "")) for k in extra_keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=h.DEFAULT_OUT)
    p.add_argument("--copy-plots", type=Path, default=None, help="copy the PNGs here")
    args = p.parse_args(argv)
    for name in ORDER:
        path = args.out / f"{name}.json"
        if not path.is_file():
            sys.stdout.write(f"## {name}: no results\n\n")
            continue
        result = json.loads(path.read_text())
        m = result["machine"]
        sys.stdout.write(
            f"## {name}\n\nrun {result['started'][:19]}Z, {result['duration_s']:.0f} s; "
            f"load average {m.get('loadavg_start', ['?'])[0]} at start, {m['loadavg'][0]} at end; "
            f"params {json.dumps(result['params'])}\n\n{table(result)}\n\n"
        )
        for t in result["targets"]:
            mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
            sys.stdout.write(f"- {mark}: {t['target']} — {t['measured']}\n")
        for n in result["notes"]:
            sys.stdout.write(f"\n```\n{n}\n```\n")
        sys.stdout.write("\n")
        png = args.out / f"{name}.png"
        if args.copy_plots is not None and png.is_file():
            args.copy_plots.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, args.copy_plots / f"bench-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
