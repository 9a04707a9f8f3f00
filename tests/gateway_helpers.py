"""Helpers for the HTTP gateway's tests: a gateway in the test's event loop, and
``saga-events up`` as a real subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from saga_events import Mirror, Registrar
from saga_events.embedded import free_port
from saga_events.web import Gateway, Limits

READY_LINE = "Press Ctrl-C to stop."


@dataclass
class Served:
    gateway: Gateway
    client: httpx.AsyncClient
    redis_url: str
    base_url: str


@asynccontextmanager
async def serve_gateway(
    registrar: Registrar,
    mirror: Mirror,
    redis_url: str,
    token: str | None = None,
    *,
    limits: Limits | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[Served]:
    """A gateway on a free port in the current event loop, and an httpx client for it."""
    gateway = Gateway(registrar, mirror, redis_url, token=token, limits=limits)
    async with anyio.create_task_group() as tg:
        bound, port = await tg.start(gateway.run, host, 0)
        base = f"http://{'127.0.0.1' if bound == '0.0.0.0' else bound}:{port}"
        pool = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=pool) as client:
            yield Served(gateway, client, redis_url, base)
        tg.cancel_scope.cancel()


@dataclass
class SagaUp:
    """A running ``saga-events up`` process and what it printed."""

    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def redis_url(self) -> str:
        for line in self.lines:
            if line.strip().startswith("Redis:"):
                return line.split()[1]
        raise AssertionError(f"no Redis line in {self.output!r}")

    def children(self) -> list[int]:
        """Pids of the direct children (the private redis-server), from /proc."""
        found: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                continue
        return found

    def stop(self, signum: int = signal.SIGINT, timeout: float = 20.0) -> int:
        """Send ``signum`` and wait for the process to exit; return its exit code."""
        self.proc.send_signal(signum)
        return self.proc.wait(timeout)


def _pump(up: SagaUp) -> None:
    stdout = up.proc.stdout
    assert stdout is not None
    for line in stdout:
        up.lines.append(line)
        if READY_LINE in line:
            up.ready.set()
    up.ready.set()  # EOF: the process ended; the waiter checks


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextmanager
def saga_up(
    *extra: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[SagaUp]:
    """``saga-events up`` with a private redis-server on a free port and the HTTP API on
    another free port; stopped with SIGINT (then SIGKILL) on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "saga_events", "up",
            "--redis-port", "0", "--http", f"127.0.0.1:{port}", *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )  # fmt: skip
    up = SagaUp(proc, f"http://127.0.0.1:{port}")
    reader = threading.Thread(target=_pump, args=(up,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        if not up.ready.wait(max(0.0, deadline - time.monotonic())) or proc.poll() is not None:
            raise AssertionError(f"saga-events up did not get ready: {up.output}")
        yield up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        reader.join(10)
        if proc.stdout:
            proc.stdout.close()


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _canonical(key: str) -> str:
    """``name{b="1",a="2"}`` as ``name{a="2",b="1"}`` (label order does not matter)."""
    name, brace, labels = key.partition("{")
    if not brace:
        return key
    pairs = sorted(_LABEL.findall(labels.removesuffix("}")))
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


class Samples(dict[str, float]):
    """Samples by ``name{labels}``, looked up whatever the order of the labels."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(_canonical(key))

    def get(self, key: str, default: float | None = None) -> float | None:  # type: ignore[override]
        return super().get(_canonical(key), default)


def metric_samples(text: str) -> Samples:
    """The samples of a Prometheus text exposition: ``name{labels}`` -> value."""
    samples = Samples()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[_canonical(key)] = float(value)
    return samples
