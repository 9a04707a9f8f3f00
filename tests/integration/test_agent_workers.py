"""Worker processes of one app (gunicorn, uvicorn) are separate instances (issue 8).

Two real processes register the same name and URL through the blocking
client; the younger is recycled (a clean ``close()``, which says leave). The
older one must stay visible, and its ``is_registered()`` must say the truth.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

from saga_events import Mirror, Registrar
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio

WORKER_SCRIPT = """
import sys
from saga_events import SagaServiceDiscovery

saga = SagaServiceDiscovery(redis_url=sys.argv[1], ttl=3.0)
info = saga.register_service("webapp", "http://10.0.0.50:8000", ["rest"])
print("id", info.service_id, info.source, flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "status":
        print("status", saga.is_registered("webapp"), flush=True)
    elif command == "exit":
        break
saga.close()
print("closed", flush=True)
"""


@contextmanager
def worker(url: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()


async def ask(proc: subprocess.Popen[str], command: str | None, expect: str) -> list[str]:
    """Send ``command`` (if any) and read the answer line starting with ``expect``; bounded."""
    assert proc.stdin is not None and proc.stdout is not None
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    with anyio.fail_after(20):
        line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    words = line.split()
    if not words or words[0] != expect:
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise AssertionError(f"expected {expect!r}, got {line!r}; stderr={err!r}")
    return words[1:]


async def test_a_recycled_worker_never_hides_its_live_sibling(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """Same name and URL in two processes: two instances; the younger's leave removes only it."""
    with worker(redis_url) as older:
        older_id, source = await ask(older, None, "id")
        assert source == "registry"
        with worker(redis_url) as younger:
            younger_id, source = await ask(younger, None, "id")
            assert source == "registry"
            assert younger_id != older_id  # each process is its own instance
            await mirror.wait_until(
                lambda m: {i.service_id for i in m.instances("webapp")} == {older_id, younger_id},
                timeout=10,
            )
            await ask(younger, "exit", "closed")
        # The younger's leave is applied: its instance is gone from the mirror.
        await mirror.wait_until(
            lambda m: younger_id not in {i.service_id for i in m.instances("webapp")}, timeout=10
        )
        # The older worker keeps heartbeating (every ttl/3 = 1 s): three more are applied,
        # none is refused as stale, and it is the one live instance all along.
        stale = registrar.stats.applied["stale"]
        refreshed = registrar.stats.applied["refreshed"]
        await eventually(lambda: registrar.stats.applied["refreshed"] >= refreshed + 3, 20)
        assert registrar.stats.applied["stale"] == stale
        assert [i.service_id for i in mirror.instances("webapp")] == [older_id]
        assert await ask(older, "status", "status") == ["True"]
        await ask(older, "exit", "closed")
    await mirror.wait_until(lambda m: not m.instances("webapp"), timeout=10)
