"""Sample a running process with py-spy and summarise where its time goes."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    """The py-spy binary: next to this Python (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def py_spy_missing() -> str | None:
    if py_spy() is None:
        return "py-spy is not installed (pip install 'saga-events[bench]')"
    return None


class Sampler:
    """``py-spy record`` on ``pid`` for ``seconds``, raw (collapsed) stacks."""

    def __init__(self, pid: int, seconds: float, rate: int = 250) -> None:
        self.expected = rate * max(1, round(seconds))
        self._dir = tempfile.TemporaryDirectory(prefix="bench-prof-")
        self.path = Path(self._dir.name) / "stacks.txt"
        self.proc = subprocess.Popen(
            [
                py_spy() or "py-spy",
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--output",
                str(self.path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def summary(self, top: int = 12) -> dict[str, Any]:
        """Wait for py-spy; return the hottest functions by self and by total samples."""
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            lines = []
        finally:
            self._dir.cleanup()
        for line in lines:
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            samples += count
            frames = [_short(f) for f in stack.split(";")]
            own[frames[-1]] += count
            for f in set(frames):
                total[f] += count

        def pct(c: Counter[str], skip_roots: bool) -> list[tuple[str, float]]:
            # Frames on (nearly) every stack are the event loop's roots: no news.
            roots = 0.9 * max(total.values(), default=0) if skip_roots else float("inf")
            hot = [(f, n) for f, n in c.most_common() if n < roots][:top]
            return [(f, round(100 * n / samples, 1)) for f, n in hot] if samples else []

        return {
            "samples": samples,
            "busy_pct": round(100 * samples / self.expected, 1),
            "self_pct": pct(own, False),
            "total_pct": pct(total, True),
        }


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


def format_summary(summary: dict[str, Any], what: str) -> str:
    lines = [
        f"py-spy profile of {what}: {summary['samples']} samples "
        f"(busy in {summary['busy_pct']}% of the sampling ticks)"
    ]
    lines.append("  self %   function")
    for f, p in summary["self_pct"]:
        lines.append(f"  {p:6.1f}   {f}")
    lines.append("  total %  function")
    for f, p in summary["total_pct"]:
        lines.append(f"  {p:6.1f}   {f}")
    return "\n".join(lines)
