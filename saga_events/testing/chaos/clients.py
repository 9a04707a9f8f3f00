"""The clients and hazards a chaos run adds beside its agents: REST clients, pick() threads,
a hostile publisher and CPU hogs.

Contract: each is started by the harness only when its switch in
:class:`~.config.ChaosConfig` is on; each counts what it did in
``report.clients`` and reports what it saw go wrong through the ``violation``
callback it is given (never by raising into the run).
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import httpx
import redis.asyncio as aioredis

from ... import model
from ...errors import ServiceNotFound
from ...mirror import Mirror
from .config import HOSTILE_SERVICE
from .deployment import AgentSlot, Deployment

Report = Callable[[str, str], None]  # violation(kind, detail)


# -- seed-style REST clients ---------------------------------------------------------------


def lapsed(slot: AgentSlot, now: float, ttl: float) -> str | None:
    """Why the reaper may remove the REST client ``slot``'s instance at ``now`` (the
    harness's clock, when its removal was seen), or None when it may not.

    A seed-style client heartbeats every ttl/2 and does not retry before its next tick,
    so one heartbeat lost (a timeout under load, a 503 while Redis is away) leaves its
    instance a full ttl without a heartbeat: the reaper is right to remove it, and the
    client registers again on the next 404. Allowed only when no request answered 200
    was *sent* within the ttl before ``now``: such a request moved the deadline to at
    least its send time + ttl, so a removal seen earlier is a real early reap.
    """
    if slot.kind != "http" or slot.confirmed is None:
        return None
    since = now - slot.confirmed
    if since < ttl:
        return None
    return f"no heartbeat confirmed for {since:.1f} s (ttl {ttl:g} s)"


async def http_client(
    dep: Deployment,
    slot: AgentSlot,
    counts: Counter[str],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The seed's heartbeat loop over REST: register; heartbeat every ttl/2; on a 404
    register again; on any other trouble try again at the next tick. Runs until cancelled;
    ``task_status`` is set once the first registration is confirmed."""
    ttl = dep.config.http_ttl
    body = {"service_name": slot.service, "service_url": slot.url,
            "service_id": slot.service_id, "ttl_seconds": ttl}  # fmt: skip
    registered = started = False
    async with httpx.AsyncClient(base_url=dep.gateway_url, timeout=3.0) as http:
        while True:
            sent = anyio.current_time()
            try:
                if not registered:
                    r = await http.post("/api/v1/services/register", json=body)
                    registered = r.status_code == 200
                    if registered:
                        slot.confirmed = sent
                    counts["http register" if registered else f"http register {r.status_code}"] += 1
                    if registered and not started:
                        started = True
                        task_status.started()
                else:
                    r = await http.post(
                        f"/api/v1/services/{slot.service}/heartbeat",
                        params={"service_id": slot.service_id},
                    )
                    if r.status_code == 404:
                        registered = False
                        counts["http re-register on 404"] += 1
                        continue
                    ok = r.status_code == 200
                    if ok:
                        slot.confirmed = sent
                    counts["http heartbeat" if ok else f"http {r.status_code}"] += 1
            except httpx.HTTPError:
                counts["http error"] += 1
            await anyio.sleep(ttl / 2 if registered else 0.5)


# -- threads reading pick() -----------------------------------------------------------------


class PickThreads:
    """OS threads reading every mirror in a tight loop: ``services()``, ``snapshot()`` and
    ``pick()`` of every service listed. Any exception is recorded (first of each kind per
    fault), except ServiceNotFound for a service that may have just gone."""

    def __init__(
        self,
        mirrors: list[Mirror],
        services: Callable[[], set[str]],
        n: int,
        where: Callable[[], str],
    ) -> None:
        self._mirrors, self._services, self._where = mirrors, services, where
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, name=f"chaos-pick-{i}", daemon=True)
            for i in range(n)
        ]
        self._lock = threading.Lock()
        self.picks = 0
        self.errors: list[tuple[str, str]] = []  # (fault, detail), drained by the harness
        self._seen: set[tuple[str, str]] = set()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            for i, mirror in enumerate(self._mirrors):
                stable = self._services()
                try:
                    # Every read the docs call thread-safe: services(), then pick() of each
                    # (a name that vanished in between may raise ServiceNotFound, unless it
                    # is one that always has a live instance), and the snapshot.
                    names = set(mirror.services()) | stable
                    mirror.snapshot()
                except Exception as exc:
                    self._record(i, "services()/snapshot()", exc)
                    continue
                for name in sorted(names):
                    try:
                        mirror.pick(name)
                        n += 1
                    except ServiceNotFound as exc:
                        if name in stable:
                            self._record(i, f"pick({name!r})", exc)
                    except Exception as exc:  # any other exception is a violation
                        self._record(i, f"pick({name!r})", exc)
            if n >= 1000:
                with self._lock:
                    self.picks += n
                n = 0
            time.sleep(0)  # let the event loop's thread in

    def _record(self, i: int, call: str, exc: Exception) -> None:
        fault = self._where()
        key = (fault, f"{type(exc).__name__}:{i}:{call}")
        with self._lock:
            if key not in self._seen:
                self._seen.add(key)
                self.errors.append((fault, f"mirror {i} {call} raised {exc!r} in a thread"))

    def drain(self) -> list[tuple[str, str]]:
        with self._lock:
            errors, self.errors = self.errors, []
        return errors

    def __enter__(self) -> PickThreads:
        # Switch threads 50x more often than CPython's default: a reader then lands
        # inside a writer's multi-step update far more often (races show in seconds).
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        sys.setswitchinterval(self._interval)


# -- the hostile publisher --------------------------------------------------------------------


def _bombs() -> Iterator[tuple[str, bytes]]:
    """(what, payload) pairs a hostile or broken publisher sends, in a fixed cycle."""
    nested_list = b"[" * 5_000 + b"]" * 5_000  # 10 KB, 5000 levels deep
    nested_obj = b'{"a":' * 1_800 + b"1" + b"}" * 1_800  # ~10 KB, 1800 levels deep
    huge = model.encode(
        {"type": "register", "service_name": "svc-a", "service_id": "svc-a-huge",
         "incarnation": 1, "seq": 1, "service_url": "http://h/" + "a" * (1 << 20)}
    )  # fmt: skip
    return itertools.cycle(
        [("json bomb (list)", nested_list), ("json bomb (object)", nested_obj),
         ("oversized 1 MB", huge[: 1 << 20]), ("not json", b"\xff\xfe{")]
    )  # fmt: skip


async def hostile_publisher(
    dep: Deployment, counts: Counter[str], rounds: Iterator[int], *, bombs: bool = True
) -> None:
    """Beside the faults: JSON bombs and oversized messages on live services' channels,
    floods of fresh ids (valid, short-lived, under fresh service names starting with
    :data:`HOSTILE_SERVICE`, so readers meet names appearing) and leaves for unknown ids
    of live services. Connection trouble (a fault) is ignored."""
    client = aioredis.Redis.from_url(dep.url, socket_timeout=5)
    payloads = _bombs()
    keys = dep.keys
    try:
        for n in rounds:
            try:
                if bombs:
                    what, payload = next(payloads)
                    await client.publish(keys.events("svc-a"), payload)
                    counts[f"hostile {what}"] += 1
                pipe = client.pipeline(transaction=False)
                for i in range(100):
                    event = model.Register(
                        service_name=f"{HOSTILE_SERVICE}-{n}-{i % 10}", service_id=f"flood-{i}",
                        incarnation=1, seq=1, service_url=f"http://10.66.{n % 250}.{i}:1",
                        ttl_ms=model.MIN_TTL_MS,
                    )  # fmt: skip
                    pipe.publish(keys.events(event.service_name), model.encode(event))
                for i in range(20):
                    leave = model.Leave(
                        service_name="svc-b", service_id=f"unknown-{n}-{i}", incarnation=1, seq=1
                    )
                    pipe.publish(keys.events("svc-b"), model.encode(leave))
                await pipe.execute()
                counts["hostile fresh ids"] += 100
                counts["hostile unknown leaves"] += 20
            except Exception:
                counts["hostile publish failed"] += 1
            await anyio.sleep(0.5)
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


# -- CPU hogs -----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cpu_hogs(n: int, seconds: float, counts: Counter[str]) -> Any:
    """``n`` busy-loop processes for ``seconds`` (or until the block ends, if sooner)."""
    argv = [sys.executable, "-c", "while 1: pass"]
    procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL) for _ in range(n)]  # noqa: ASYNC220
    counts["cpu hogs started"] += n

    def stop() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    try:
        async with anyio.create_task_group() as tg:

            async def later() -> None:
                await anyio.sleep(seconds)
                stop()

            tg.start_soon(later)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    finally:
        stop()
