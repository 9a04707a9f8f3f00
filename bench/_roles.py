"""The saga-events side of the benchmarks: child-process roles and event helpers.

Roles run in their own processes (started by :func:`_harness.mp`), as the
registrar, the mirrors and the agents of a real deployment would. They
report through ``multiprocessing`` pipes, events and shared counters,
never through the Redis being measured.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio

from saga_events import Added, Agent, Mirror, Registrar, Removed, model
from saga_events.keys import Keys

NS = "default"
KEYS = Keys(NS)
TARGET = "bench-target"
# What a registrar child publishes in its shared counters, per registrar.
REG_FIELDS = ("received", "applied", "reaped", "created", "refreshed", "stale", "rejected")
MIRROR_FIELDS = (
    "record_notifications",
    "canary_notifications",
    "epoch_notifications",
    "gets",
    "snapshots",
    "resyncs",
    "instances",
)


def _quiet() -> None:
    logging.basicConfig(level=logging.ERROR)


# -- events -----------------------------------------------------------------------


def instance_url(i: int) -> str:
    return f"http://10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:8080"


def announce(
    kind: str,
    service: str,
    sid: str,
    *,
    incarnation: int,
    seq: int,
    url: str,
    ttl_ms: int = 60_000,
    metadata: dict[str, str] | None = None,
    since: int | None = None,
) -> bytes:
    """The bytes an Agent publishes for a register or heartbeat (``since``: the seq of
    its last change, as an Agent sends it; None: as an agent without the field)."""
    cls = model.Register if kind == "register" else model.Heartbeat
    return model.encode(
        cls(
            service_name=service,
            service_id=sid,
            incarnation=incarnation,
            seq=seq,
            service_url=url,
            capabilities=("rest", "grpc"),
            metadata=metadata or {"zone": "eu-west-1a", "version": "1.4.2"},
            ttl_ms=ttl_ms,
            since=since,
        )
    )


def leave(service: str, sid: str, *, incarnation: int, seq: int) -> bytes:
    return model.encode(
        model.Leave(service_name=service, service_id=sid, incarnation=incarnation, seq=seq)
    )


def resp(*parts: bytes) -> bytes:
    """One Redis command in the wire protocol."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += [b"$%d\r\n" % len(p), p, b"\r\n"]
    return b"".join(out)


def publish_cmd(service: str, payload: bytes) -> bytes:
    return resp(b"PUBLISH", KEYS.events(service).encode(), payload)


class RawRedis:
    """A bare socket that sends pre-built commands and counts integer replies.

    The publisher of the load scenarios: it costs almost no CPU, so the two
    cores go to Redis and the registrar being measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, commands: Sequence[bytes]) -> list[int]:
        """Send the commands in one write; return their integer replies."""
        self.sock.sendall(b"".join(commands))
        replies: list[int] = []
        while len(replies) < len(commands):
            while b"\r\n" not in self._buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self._buf += chunk
            lines = self._buf.split(b"\r\n")
            self._buf = lines.pop()
            for line in lines:
                if not line.startswith(b":"):
                    raise RuntimeError(f"unexpected reply {line[:200]!r}")
                replies.append(int(line[1:]))
        return replies

    def close(self) -> None:
        self.sock.close()


def preload(
    raw: RawRedis, n: int, *, services: int = 100, ttl_ms: int = 600_000, prefix: str = "bg"
) -> list[tuple[str, str]]:
    """Register ``n`` background instances over ``services`` service names; return them."""
    inc = model.new_incarnation()
    made: list[tuple[str, str]] = []
    batch: list[bytes] = []
    for i in range(n):
        service = f"{prefix}-svc-{i % max(1, services)}"
        sid = f"{prefix}-{i}"
        made.append((service, sid))
        payload = announce(
            "register", service, sid, incarnation=inc, seq=1, url=instance_url(i), ttl_ms=ttl_ms
        )
        batch.append(publish_cmd(service, payload))
        if len(batch) >= 500:
            raw.send(batch)
            batch = []
    if batch:
        raw.send(batch)
    return made


def index_size(url: str) -> int:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return int(r.scard(KEYS.index))
    finally:
        r.close()


def wait_epoch_ready(url: str, timeout: float = 15.0) -> None:
    """Wait until a registrar has finished its first-start rebuild."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            raw = r.get(KEYS.epoch)
            if isinstance(raw, bytes) and raw.endswith(b":ready"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("registrar did not finish its first rebuild")
            time.sleep(0.02)
    finally:
        r.close()


# -- roles (each the body of a child process) ------------------------------------------


def registrar_role(url: str, ready: Any, counters: Any, slot: int, batch_size: int) -> None:
    """Run one Registrar; publish its counters into ``counters[slot]`` every 10 ms."""
    _quiet()
    width = len(REG_FIELDS)

    async def main() -> None:
        reg = Registrar(url, namespace=NS, rebuild_wait=0.2, batch_size=batch_size)
        async with anyio.create_task_group() as tg:
            await tg.start(reg.run)
            ready.set()
            while True:
                s = reg.stats
                values = (
                    s.received,
                    sum(s.applied.values()),
                    s.reaped,
                    s.applied["created"],
                    s.applied["refreshed"],
                    s.applied["stale"],
                    sum(s.rejected.values()),
                )
                for i, v in enumerate(values):
                    counters[slot * width + i] = v
                await anyio.sleep(0.01)

    from saga_events import _loop

    _loop.run(main)  # the loop the CLI's registrar runs on (SAGA_EVENTS_LOOP)


def watcher_role(url: str, idx: int, out: Any, target: str) -> None:
    """A Mirror that reports each change to ``target`` with the time it saw it."""
    _quiet()

    async def main() -> None:
        async with Mirror(url, namespace=NS) as mirror, anyio.create_task_group() as tg:

            async def consume() -> None:
                async for change in mirror.changes():
                    inst = change.instance
                    if inst.service_name != target:
                        continue
                    now = time.monotonic_ns()
                    kind = (
                        "add"
                        if isinstance(change, Added)
                        else "remove"
                        if isinstance(change, Removed)
                        else "update"
                    )
                    out.send((kind, idx, inst.service_id, now))

            tg.start_soon(consume)
            await anyio.sleep(0.05)  # let consume() subscribe to changes()
            out.send(("ready", idx, str(len(mirror)), time.monotonic_ns()))

    anyio.run(main, backend_options=loop_options())


def loop_options() -> dict[str, Any]:
    """uvloop when it is installed (the ``fast`` extra): a mirror process runs on it
    (~10-15 % less CPU per change, measured in docs/BENCHMARKS.md "Feed")."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def stats_mirror_role(url: str, ready: Any, counters: Any) -> None:
    """A Mirror that publishes its stats counters every 50 ms."""
    _quiet()

    async def main() -> None:
        async with Mirror(url, namespace=NS) as mirror:
            ready.set()
            while True:
                s = mirror.stats
                values = (
                    s.record_notifications,
                    s.canary_notifications,
                    s.epoch_notifications,
                    s.gets,
                    s.snapshots,
                    s.resyncs,
                    len(mirror),
                )
                for i, v in enumerate(values):
                    counters[i] = v
                await anyio.sleep(0.05)

    anyio.run(main)


def victim_role(url: str, sids: Iterable[str], ttl: float, ready: Any) -> None:
    """Agents that register, heartbeat, and are then SIGKILLed (no leave)."""
    _quiet()
    sids = list(sids)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            agents = [
                Agent(url, TARGET, instance_url(i + 1), service_id=sid, ttl=ttl, namespace=NS)
                for i, sid in enumerate(sids)
            ]
            for agent in agents:
                await tg.start(agent.run)
            ready.set()
            await anyio.sleep_forever()

    anyio.run(main)


# -- driver-side helpers ---------------------------------------------------------------


def host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


def start_registrars(url: str, n: int, stack: Any, batch_size: int = 512) -> Any:
    """Start ``n`` registrar processes; return their shared counters and processes."""
    import _harness as h

    ctx = h.mp()
    counters = ctx.Array("q", n * len(REG_FIELDS), lock=False)
    procs = []
    for slot in range(n):
        ready = ctx.Event()
        proc = ctx.Process(
            target=registrar_role, args=(url, ready, counters, slot, batch_size), daemon=True
        )
        proc.start()
        procs.append(proc)
        stack.callback(h.stop_processes, [proc])
        if not ready.wait(30):
            raise RuntimeError("registrar did not start")
    wait_epoch_ready(url)
    return counters, procs


def counter(counters: Any, slot: int, name: str) -> int:
    return int(counters[slot * len(REG_FIELDS) + REG_FIELDS.index(name)])


class Gateway:
    """A registrar process serving the HTTP gateway (``saga-events registrar --http``)."""

    def __init__(self, proc: Any, base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url

    def stop(self) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def gateway_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("saga_events.web.server") is None:
        return "saga_events.web.server is not there (the HTTP gateway has not landed)"
    try:
        import httpx  # noqa: F401
    except ImportError:
        return "httpx is not installed"
    return None


def start_gateway(url: str, timeout: float = 30.0) -> Gateway | None:
    """Start ``saga-events registrar --http`` on a free port; None if there is no gateway."""
    import subprocess
    import sys

    import _harness as h
    import httpx

    from saga_events.embedded import free_port

    why = gateway_missing()
    if why is not None:
        h.say(f"no gateway: {why}")
        return None
    import tempfile

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "saga_events",
            "registrar",
            "--redis",
            url,
            "--http",
            f"127.0.0.1:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            h.say(f"gateway exited with {proc.returncode}: {err.strip()[-500:]}")
            return None
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return Gateway(proc, base)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    Gateway(proc, base).stop()
    h.say("gateway did not answer /health in time")
    return None


def publish_paced(
    raw: RawRedis,
    commands: Sequence[bytes],
    counters: Any,
    registrars: int,
    *,
    chunk: int = 1000,
    max_outstanding: int = 10_000,
    bar: Any = None,
) -> None:
    """Publish as fast as the registrars take it, without overflowing their
    subscription's output buffer in Redis (which would cut them off)."""

    def slowest() -> int:
        return min(counter(counters, i, "received") for i in range(registrars))

    start = slowest()
    sent = 0
    while sent < len(commands):
        while True:
            if sent - (slowest() - start) < max_outstanding:
                break
            time.sleep(0.0005)
        part = commands[sent : sent + chunk]
        raw.send(part)
        sent += len(part)
        if bar is not None:
            bar.update(len(part))


def wait_received(counters: Any, registrars: int, total: int, timeout: float = 120) -> None:
    """Wait until every registrar has received and applied ``total`` events (cumulative)."""
    import _harness as h

    h.wait_until(
        lambda: all(
            counter(counters, i, "applied") + counter(counters, i, "rejected") >= total
            for i in range(registrars)
        ),
        timeout,
        f"registrars to apply {total} events",
        0.002,
    )
