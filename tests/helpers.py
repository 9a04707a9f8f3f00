"""Helpers for the project's own tests: agents and registrars in real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread

AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, anyio, saga_events
    url, name, svc_url, sid, ttl = sys.argv[1:6]
    async def main():
        async with saga_events.Agent(url, name, svc_url, service_id=sid, ttl=float(ttl)) as a:
            print("registered" if a.registered else "unregistered", flush=True)
            await anyio.sleep_forever()
    anyio.run(main)
    """
)


@contextmanager
def agent_process(
    url: str, name: str, service_url: str, service_id: str, ttl: float = 60.0
) -> Iterator[subprocess.Popen[str]]:
    """An Agent in its own Python process; killed (SIGKILL) on exit if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, url, name, service_url, service_id, str(ttl)],
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
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


@contextmanager
def registrar_process(url: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """``saga-events registrar`` in its own process; SIGKILLed on exit if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saga_events", "registrar", "--redis", url, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


async def read_line_until(
    proc: subprocess.Popen[str],
    needle: str,
    timeout: float = 15.0,  # noqa: ASYNC109 - a plain bound
) -> str:
    """Read the process's stdout until a line containing ``needle``; bounded."""
    stdout = proc.stdout
    assert stdout is not None
    seen: list[str] = []
    with anyio.move_on_after(timeout):
        while True:
            line = await anyio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True)
            if not line:
                break  # EOF: the process ended
            seen.append(line)
            if needle in line:
                return line
    proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"{needle!r} not printed in {timeout} s; stdout={seen!r} stderr={err!r}")
