"""Helpers for the project's own tests: agents, registrars and other programs in real
subprocesses, stopped and read with a bound (one copy of each, shared by every test file)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
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


def stop_process(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 15.0
) -> int:
    """Send ``sig`` (if it still runs), wait ``timeout``, then SIGKILL; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def close_streams(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def read_lines_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> list[str]:
    """Blocking: lines of stdout up to one matching the regex ``pattern``; bounded."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    if not found.wait(timeout):
        raise AssertionError(f"no line matching {pattern!r} in {timeout} s: {''.join(lines)}")
    return lines


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Blocking: poll a condition in another process (no event to await); bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


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
        stop_process(proc, signal.SIGKILL, 10)
        close_streams(proc)


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
        stop_process(proc, signal.SIGKILL, 10)
        close_streams(proc)


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
