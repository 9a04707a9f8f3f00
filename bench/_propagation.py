"""Propagation: how long until a change is visible in every one of M watchers.

Shared by ``propagation.py`` (saga-events alone, plus the poll-and-cache
client's staleness) and ``peers.py`` (saga-events, ZooKeeper and etcd in the
same run with the same sample counts).

One sample of ``register`` (or ``leave``) is the time from just before the
writer's call (the PUBLISH of the event, the znode create, the etcd put) to
the moment the last of the M watcher processes has seen the change. One
sample of ``crash`` is the time from SIGKILL of the process holding the
instances (no leave) to the moment the last watcher sees each one go, minus
the TTL (the session timeout or lease TTL), so 0 means "exactly at the
TTL". Each watcher is its own process, as in a real deployment.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue as queue_mod
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from typing import Any, Protocol

import _harness as h
import _roles

from saga_events.model import new_incarnation

WAIT_S = 10.0  # per sample; a change not seen by then counts as lost


class Backend(Protocol):
    name: str
    crash_ttl: float

    def missing(self) -> str | None: ...
    def start(self, stack: contextlib.ExitStack) -> None: ...
    def preload(self, n: int) -> None: ...
    def watcher(self, idx: int, q: Any) -> Any: ...
    def register(self, sid: str) -> int: ...
    def leave(self, sid: str) -> int: ...
    def victim(self, sids: list[str], ready: Any) -> Any: ...


class SagaBackend:
    name = "saga-events"

    def __init__(self, crash_ttl: float) -> None:
        self.crash_ttl = crash_ttl
        self.url = ""
        self._raw: _roles.RawRedis | None = None
        self._inc = 0
        self._seq = 0
        self._procs: list[Any] = []

    def missing(self) -> str | None:
        return None

    def start(self, stack: contextlib.ExitStack) -> None:
        server = stack.enter_context(h.redis_server())
        self.url = server.url
        _roles.start_registrars(self.url, 1, stack)
        self._raw = _roles.RawRedis(server.host, server.port)
        stack.callback(self._raw.close)
        self._inc = new_incarnation()

    def preload(self, n: int) -> None:
        assert self._raw is not None
        _roles.preload(self._raw, n)
        h.wait_until(lambda: _roles.index_size(self.url) >= n, 60, "preloaded instances", 0.05)

    def watcher(self, idx: int, q: Any) -> Any:
        return h.mp().Process(
            target=_roles.watcher_role, args=(self.url, idx, q, _roles.TARGET), daemon=True
        )

    def _send(self, payload: bytes) -> int:
        assert self._raw is not None
        cmd = _roles.publish_cmd(_roles.TARGET, payload)
        t0 = time.monotonic_ns()
        self._raw.send([cmd])
        return t0

    def register(self, sid: str) -> int:
        self._seq += 1
        payload = _roles.announce(
            "register",
            _roles.TARGET,
            sid,
            incarnation=self._inc,
            seq=self._seq,
            url=_roles.instance_url(7),
        )
        return self._send(payload)

    def leave(self, sid: str) -> int:
        self._seq += 1
        return self._send(_roles.leave(_roles.TARGET, sid, incarnation=self._inc, seq=self._seq))

    def victim(self, sids: list[str], ready: Any) -> Any:
        return h.mp().Process(
            target=_roles.victim_role, args=(self.url, sids, self.crash_ttl, ready), daemon=True
        )


class ZooKeeperBackend:
    name = "ZooKeeper"

    def __init__(self, crash_ttl: float) -> None:
        self.crash_ttl = crash_ttl
        self.hosts = ""
        self._zk: Any = None

    def missing(self) -> str | None:
        import _peers

        return _peers.zookeeper_missing()

    def start(self, stack: contextlib.ExitStack) -> None:
        import _peers
        from kazoo.client import KazooClient

        server = _peers.ZooKeeperServer().start()
        stack.callback(server.stop)
        self.hosts = server.hosts
        self._zk = KazooClient(self.hosts, timeout=10.0)
        self._zk.start(timeout=20)
        stack.callback(self._zk.close)
        stack.callback(self._zk.stop)
        self._zk.ensure_path(f"{_peers.ROOT}/{_roles.TARGET}")

    def preload(self, n: int) -> None:
        import _peers

        for s in range(100):
            self._zk.ensure_path(f"{_peers.ROOT}/bg-svc-{s}")
        pending = [
            self._zk.create_async(f"{_peers.ROOT}/bg-svc-{i % 100}/bg-{i}", b"{}", ephemeral=True)
            for i in range(n)
        ]
        for p in pending:
            p.get(timeout=30)

    def watcher(self, idx: int, q: Any) -> Any:
        import _peers

        return h.mp().Process(
            target=_peers.zk_watcher_role, args=(self.hosts, idx, q, _roles.TARGET), daemon=True
        )

    def register(self, sid: str) -> int:
        import _peers

        t0 = time.monotonic_ns()
        self._zk.create(f"{_peers.ROOT}/{_roles.TARGET}/{sid}", b"{}", ephemeral=True)
        return t0

    def leave(self, sid: str) -> int:
        import _peers

        t0 = time.monotonic_ns()
        self._zk.delete(f"{_peers.ROOT}/{_roles.TARGET}/{sid}")
        return t0

    def victim(self, sids: list[str], ready: Any) -> Any:
        import _peers

        return h.mp().Process(
            target=_peers.zk_victim_role,
            args=(self.hosts, _roles.TARGET, sids, self.crash_ttl, ready),
            daemon=True,
        )


class EtcdBackend:
    name = "etcd"

    def __init__(self, crash_ttl: float) -> None:
        self.crash_ttl = crash_ttl
        self.url = ""
        self._client: Any = None
        self._lease = ""

    def missing(self) -> str | None:
        import _peers

        return _peers.etcd_missing()

    def start(self, stack: contextlib.ExitStack) -> None:
        import _peers

        server = _peers.EtcdServer().start()
        stack.callback(server.stop)
        self.url = server.url
        self._client = _peers.EtcdClient(self.url)
        stack.callback(self._client.close)
        self._lease = self._client.grant(3600)

    def preload(self, n: int) -> None:
        import _peers

        for i in range(n):
            self._client.put(f"{_peers.ROOT}/bg-svc-{i % 100}/bg-{i}", "{}", self._lease)

    def watcher(self, idx: int, q: Any) -> Any:
        import _peers

        return h.mp().Process(
            target=_peers.etcd_watcher_role, args=(self.url, idx, q, _roles.TARGET), daemon=True
        )

    def register(self, sid: str) -> int:
        import _peers

        key = f"{_peers.ROOT}/{_roles.TARGET}/{sid}"
        t0 = time.monotonic_ns()
        self._client.put(key, "{}", self._lease)
        return t0

    def leave(self, sid: str) -> int:
        import _peers

        key = f"{_peers.ROOT}/{_roles.TARGET}/{sid}"
        t0 = time.monotonic_ns()
        self._client.delete(key)
        return t0

    def victim(self, sids: list[str], ready: Any) -> Any:
        import _peers

        return h.mp().Process(
            target=_peers.etcd_victim_role,
            args=(self.url, _roles.TARGET, sids, self.crash_ttl, ready),
            daemon=True,
        )


@dataclass
class Samples:
    """Latencies of one (backend, M): to the last watcher, and of every copy."""

    all_ms: dict[str, list[float]] = field(default_factory=dict)  # kind → to every watcher
    copy_ms: dict[str, list[float]] = field(default_factory=dict)  # kind → each watcher
    lost: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_change: list[float] = field(default_factory=list)  # one per watcher
    profile: dict[str, Any] | None = None  # py-spy of watcher 0, when asked


class Collector:
    """Reads watcher reports; waits until M watchers have reported one change."""

    def __init__(self, readers: list[Any]) -> None:
        # One pipe per watcher: a send is one write(2), no feeder thread to
        # wake (a multiprocessing.Queue would add a thread switch per report
        # to the very processes being measured).
        self.readers = readers
        self.buffered: collections.deque[Any] = collections.deque()
        self.pids: list[int] = []
        self.early: dict[tuple[str, str], dict[int, int]] = {}

    def ready(self, m: int, timeout: float) -> list[str]:
        seen: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < m:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"only {len(seen)} of {m} watchers became ready")
            try:
                kind, idx, info, _t = self._get(left)
            except queue_mod.Empty:
                continue
            if kind == "ready":
                seen[idx] = info
        return [seen[i] for i in sorted(seen)]

    def _get(self, timeout: float) -> Any:
        """The next report from any watcher; raises queue.Empty after ``timeout``."""
        if not self.buffered:
            ready: list[Any] = mp_connection.wait(self.readers, timeout)
            for r in ready:
                try:
                    while r.poll():
                        self.buffered.append(r.recv())
                except EOFError:
                    self.readers.remove(r)  # that watcher died; its copies count as lost
        if not self.buffered:
            raise queue_mod.Empty
        return self.buffered.popleft()

    def wait(self, kinds: set[str], sids: set[str], m: int, timeout: float) -> dict[str, list[int]]:
        """Times at which each watcher saw each of ``sids`` change (kind in ``kinds``)."""
        got: dict[str, dict[int, int]] = {sid: {} for sid in sids}
        for (kind, sid), times in list(self.early.items()):
            if kind in kinds and sid in got:
                got[sid].update(times)
                del self.early[(kind, sid)]
        deadline = time.monotonic() + timeout
        while any(len(v) < m for v in got.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                kind, idx, sid, t = self._get(min(left, 0.5))
            except queue_mod.Empty:
                continue
            if kind in kinds and sid in got:
                got[sid].setdefault(idx, t)
            elif kind != "ready":
                self.early.setdefault((kind, sid), {}).setdefault(idx, t)
        return {sid: list(times.values()) for sid, times in got.items()}


@contextlib.contextmanager
def watchers(backend: Backend, m: int) -> Iterator[Collector]:
    pipes = [h.mp().Pipe(duplex=False) for _ in range(m)]
    procs = [backend.watcher(i, w) for i, (_r, w) in enumerate(pipes)]
    try:
        for p in procs:
            p.start()
        for _r, w in pipes:
            w.close()  # the child has its copy
        collector = Collector([r for r, _w in pipes])
        collector.pids = [p.pid for p in procs]
        collector.ready(m, timeout=60 + 2 * m)
        yield collector
    finally:
        h.stop_processes(procs)
        for r, _w in pipes:
            r.close()


def measure(
    backend: Backend,
    m: int,
    pairs: int,
    crash_rounds: int,
    crash_victims: int,
    bar: Any,
    tag: str,
    profile: bool = False,
) -> Samples:
    """Register/leave ``pairs`` instances one at a time, then crash some; M watchers."""
    import psutil

    out = Samples()
    for kind in ("register", "leave", "crash"):
        out.all_ms[kind], out.copy_ms[kind], out.lost[kind] = [], [], 0
    with watchers(backend, m) as col:
        procs = [psutil.Process(pid) for pid in col.pids]
        cpu0 = [sum(p.cpu_times()[:2]) for p in procs]
        sampler = None
        if profile:
            import _profile

            if _profile.py_spy_missing() is None:
                sampler = _profile.Sampler(col.pids[0], 5)
        for i in range(pairs):
            sid = f"{tag}-m{m}-{i}"
            for kind, call, seen in (
                ("register", backend.register, {"add"}),
                ("leave", backend.leave, {"remove"}),
            ):
                t0 = call(sid)
                times = col.wait(seen, {sid}, m, WAIT_S)[sid]
                _record(out, kind, t0, times, m)
                time.sleep(random.uniform(0.001, 0.004))
            bar.update(1)
        cpu1 = [sum(p.cpu_times()[:2]) for p in procs]
        out.cpu_ms_per_change = [
            (b - a) * 1000 / (2 * pairs) for a, b in zip(cpu0, cpu1, strict=True)
        ]
        if sampler is not None:
            out.profile = sampler.summary()
        ttl_ns = int(backend.crash_ttl * 1e9)
        for r in range(crash_rounds):
            sids = [f"{tag}-m{m}-crash{r}-{k}" for k in range(crash_victims)]
            ready = h.mp().Event()
            proc = backend.victim(sids, ready)
            proc.start()
            try:
                if not ready.wait(60):
                    raise RuntimeError(f"{backend.name}: crash victim did not start")
                col.wait({"add"}, set(sids), m, WAIT_S)
                # Let the agents settle into their heartbeat (or ping) rhythm.
                time.sleep(backend.crash_ttl * random.uniform(0.5, 1.0))
                t_kill = time.monotonic_ns()
                os.kill(proc.pid, signal.SIGKILL)
                got = col.wait({"remove"}, set(sids), m, backend.crash_ttl + WAIT_S)
                for times in got.values():
                    _record(out, "crash", t_kill + ttl_ns, times, m)
            finally:
                h.stop_processes([proc])
            bar.update(1)
    return out


def _record(out: Samples, kind: str, t0: int, times: list[int], m: int) -> None:
    if len(times) < m:
        out.lost[kind] += 1
        return
    out.all_ms[kind].append((max(times) - t0) / 1e6)
    out.copy_ms[kind].extend((t - t0) / 1e6 for t in times)


def run_backend(
    backend: Backend,
    m_values: list[int],
    background: int,
    pairs: int,
    crash_rounds: int,
    crash_victims: int,
    bar: Any,
    profile: bool = False,
) -> dict[int, Samples]:
    results: dict[int, Samples] = {}
    with contextlib.ExitStack() as stack:
        backend.start(stack)
        backend.preload(background)
        for m in m_values:
            bar.set_description(f"{backend.name}, M={m}")
            results[m] = measure(
                backend,
                m,
                pairs,
                crash_rounds,
                crash_victims,
                bar,
                tag=backend.name.lower().replace("-", ""),
                profile=profile and m == max(m_values),
            )
    return results


def add_rows(report: h.Report, backend: str, results: dict[int, Samples]) -> None:
    for m, s in results.items():
        for kind in ("register", "leave", "crash"):
            unit = "ms over ttl" if kind == "crash" else "ms"
            report.add(
                f"{backend} {kind} M={m}",
                unit,
                s.all_ms[kind],
                lost=s.lost[kind],
                per_copy_median=h.summarize(s.copy_ms[kind])["median"],
            )
        # CPU a watcher process spends per change (register or leave): load-independent.
        report.add(f"{backend} watcher CPU per change M={m}", "ms CPU", s.cpu_ms_per_change)
        if s.profile:
            import _profile

            report.note(_profile.format_summary(s.profile, f"a {backend} watcher at M={m}"))


def plot(report: h.Report, fig: Any, backends: list[str]) -> None:
    """Median and p99 to every watcher, by M, for register and leave (and crash)."""
    kinds = ["register", "leave", "crash"]
    axes = fig.subplots(1, len(kinds))
    for ax, kind in zip(axes, kinds, strict=True):
        for b in backends:
            rows = [r for r in report.rows if r.name.startswith(f"{b} {kind} M=")]
            if not rows:
                continue
            ms = [int(r.name.rsplit("=", 1)[1]) for r in rows]
            med = [r.stats["median"] for r in rows]
            p99 = [r.stats["p99"] for r in rows]
            (line,) = ax.plot(ms, med, marker="o", label=f"{b} p50")
            ax.plot(ms, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{b} p99")
        ax.set_title(kind if kind != "crash" else "crash (over TTL)")
        ax.set_xlabel("mirrors / watchers (M)")
        ax.set_ylabel("ms" if kind != "crash" else "ms after TTL")
        if kind != "crash":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=6)
