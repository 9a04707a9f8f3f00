"""Scenario: the HTTP gateway's own latency, and its watch stream fanned out to many readers.

* ``register``: ``POST /api/v1/services/register`` answered, read-your-writes
  kept (the answer comes once the gateway's own mirror shows the change).
  Every request changes the instance (the URL alternates), so each one waits
  for the mirror; p50 and p99.
* ``GET /api/v1/services/{name}`` on one keep-alive connection; p50 and p99.
* ``GET /api/v1/services`` (the list, 100 instances) the same way.
* SSE fan-out: ``--watchers`` (1,000 by default) ``GET /api/v1/watch``
  streams on the one gateway, held by two client processes (asyncio
  protocols doing nothing but scan the bytes, so the client is not the
  bottleneck). Each change is an agent's heartbeat with a new URL published
  to Redis; per change: the time until the *last* watcher has the event
  (p50/p99 over changes), the time to every watcher (all samples), and the
  gateway process's CPU per change (total, and per watcher after the same
  changes with no watcher are subtracted).

The HTTP client is a bare blocking socket (a few µs per request), so the
figures are the gateway's, not an HTTP library's. redis-server and the
gateway (``saga-events registrar --http``) are separate processes.
``--pythonpath DIR`` runs the gateway from another checkout (a paired
before/after run on the same load).

    python bench/gateway_latency.py [--quick] [--samples N] [--watchers N] [--changes N]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _roles

SERVICE = "gw-bench"
LISTED = "gw-list"
WATCHED = "gw-watch"
WATCHED_IDS = 20


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=None, help="requests timed per row")
    p.add_argument("--watchers", type=int, default=None, help="SSE watchers (default 1000)")
    p.add_argument("--changes", type=int, default=None, help="changes fanned out")
    p.add_argument("--pythonpath", default=None, help="run the gateway from this source tree")
    p.add_argument("--no-sse", action="store_true", help="skip the SSE fan-out part")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    n = args.samples or (200 if q else 3000)
    watchers = args.watchers if args.watchers is not None else (20 if q else 1000)
    changes = args.changes or (10 if q else 100)
    report = h.Report(
        "gateway_latency",
        {
            "samples": n,
            "watchers": watchers,
            "changes": changes,
            "gateway_source": args.pythonpath or "installed",
            "quick": q,
        },
    )
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(h.redis_server())
        gw = _start_gateway(server.url, args.pythonpath)
        stack.callback(gw.stop)
        port = int(gw.base_url.rsplit(":", 1)[1])
        client = HttpClient("127.0.0.1", port)
        stack.callback(client.close)
        bar = h.progress(3 * n, "gateway requests")
        with bar:
            _requests(report, client, n, bar, _cpu_of(gw.proc.pid))
        if not args.no_sse and watchers > 0:
            # The gateway holds at most 1,000 connections: this one must not count.
            client.close()
            _fanout(report, server.url, gw, port, watchers, changes)
    reg = report.row("register (answered once visible)").stats["median"]
    get = report.row("GET /api/v1/services/{name}").stats["median"]
    report.target("register answered (read-your-writes) p50 <= 1 ms", f"{reg:.3f} ms", reg <= 1.0)
    report.target("GET /api/v1/services/{name} p50 <= 0.3 ms", f"{get:.3f} ms", get <= 0.3)
    return h.finish(report, args, _plot)


def _plot(report: h.Report, fig: Any) -> None:
    ax = fig.subplots()
    names = [r.name for r in report.rows]
    med = [r.stats["median"] for r in report.rows]
    p99 = [r.stats["p99"] for r in report.rows]
    y = list(range(len(names)))
    ax.barh(y, med, color="#4c72b0", label="median")
    ax.scatter(p99, y, color="#c44e52", marker="|", s=200, label="p99", zorder=3)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("HTTP gateway: requests and the watch stream's fan-out")
    ax.grid(True, axis="x", alpha=0.3)


# -- a bare HTTP/1.1 keep-alive client ----------------------------------------------------


class HttpClient:
    """One keep-alive connection; requests are sent and read with plain socket calls."""

    def __init__(self, host: str, port: int) -> None:
        self.host = f"{host}:{port}"
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))
        while b"\r\n\r\n" not in self.buf:
            self._more()
        raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(self.buf) < length:
            self._more()
        out, self.buf = self.buf[:length], self.buf[length:]
        return status, out

    def _more(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def _start_gateway(url: str, pythonpath: str | None) -> _roles.Gateway:
    port = _free_port()
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    log = tempfile.TemporaryFile()
    address = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "saga_events", "registrar", "--redis", url, "--http", address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
        cwd=pythonpath or None,  # ``-m`` puts the working directory first on sys.path
    )
    gw = _roles.Gateway(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"gateway exited: {log.read().decode(errors='replace')[-800:]}")
        try:
            c = HttpClient("127.0.0.1", port)
        except OSError:
            time.sleep(0.1)
            continue
        try:
            if c.request("GET", "/health")[0] == 200:
                return gw
        except (OSError, ValueError, IndexError):
            pass
        finally:
            c.close()
        time.sleep(0.1)
    gw.stop()
    raise RuntimeError("the gateway did not answer /health in time")


def _free_port() -> int:
    from saga_events.embedded import free_port

    return free_port()


def _register_body(name: str, sid: str, url: str) -> bytes:
    return json.dumps(
        {
            "service_name": name,
            "service_id": sid,
            "service_url": url,
            "capabilities": ["rest"],
            "metadata": {"zone": "z1"},
        }
    ).encode()


def _cpu_of(pid: int) -> Any:
    """The CPU seconds (user + system) a process has used so far, as a function."""
    import psutil

    proc = psutil.Process(pid)

    def cpu() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    return cpu


def _requests(report: h.Report, c: HttpClient, n: int, bar: Any, cpu: Any) -> None:
    """The request rows; each also says the gateway's CPU per request (load-independent)."""
    perf = time.perf_counter_ns
    for i in range(100):
        status, _ = c.request(
            "POST",
            "/api/v1/services/register",
            _register_body(LISTED, f"l{i}", _roles.instance_url(i)),
        )
        assert status == 200, status
    ids = [f"r{i}" for i in range(8)]
    for sid in ids:
        body = _register_body(SERVICE, sid, "http://a:1")
        assert c.request("POST", "/api/v1/services/register", body)[0] == 200
    # register: each request changes the instance (the URL alternates), so each waits.
    values = []
    c0 = cpu()
    for i in range(n):
        body = _register_body(SERVICE, ids[i % len(ids)], f"http://h{i % 2}:{8000 + i}")
        t0 = perf()
        status, _ = c.request("POST", "/api/v1/services/register", body)
        values.append(perf() - t0)
        assert status == 200, status
        bar.update(1)
    spent = (cpu() - c0) / n * 1e6
    report.add(
        "register (answered once visible)",
        "ms",
        h.ns_to(values, "ms"),
        gateway_cpu_us=round(spent, 1),
    )
    for label, path in (
        ("GET /api/v1/services/{name}", f"/api/v1/services/{SERVICE}"),
        ("GET /api/v1/services (108 instances)", "/api/v1/services"),
    ):
        for _ in range(50):
            c.request("GET", path)
        values = []
        c0 = cpu()
        for _ in range(n):
            t0 = perf()
            status, _ = c.request("GET", path)
            values.append(perf() - t0)
            assert status == 200, status
            bar.update(1)
        spent = (cpu() - c0) / n * 1e6
        report.add(label, "ms", h.ns_to(values, "ms"), gateway_cpu_us=round(spent, 1))


# -- SSE fan-out ------------------------------------------------------------------------


_ROUND = re.compile(rb'"service_url":"http://10\.9\.1\.\d+:(\d+)"')


def sse_clients_role(port: int, count: int, ready: Any, conn: Any) -> None:
    """Hold ``count`` watch streams; report each change's arrival time at every one."""
    import asyncio

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        arrived: dict[int, list[float]] = {}
        synced = [0]
        all_synced = asyncio.Event()
        mono = time.monotonic

        class Watch(asyncio.Protocol):
            def __init__(self) -> None:
                self.buf = b""
                self.snap = False

            def connection_made(self, transport: Any) -> None:
                transport.write(
                    b"GET /api/v1/watch?service=" + WATCHED.encode() + b" HTTP/1.1\r\n"
                    b"Host: 127.0.0.1:" + str(port).encode() + b"\r\n\r\n"
                )

            def data_received(self, data: bytes) -> None:
                now = mono()
                if not self.snap:
                    self.buf += data
                    at = self.buf.find(b"event: snapshot")
                    if at >= 0 and self.buf.find(b"\n\n", at) >= 0:  # chunked: not at the end
                        self.snap = True
                        self.buf = b""
                        synced[0] += 1
                        if synced[0] == count:
                            all_synced.set()
                    return
                for m in _ROUND.finditer(data):
                    r = int(m.group(1)) - 8000
                    got = arrived.setdefault(r, [])
                    got.append(now)
                    if len(got) == count:
                        conn.send((r, got))

        transports = []
        for i in range(count):
            tr, _ = await loop.create_connection(Watch, "127.0.0.1", port)
            transports.append(tr)
            if i % 50 == 49:
                await asyncio.sleep(0)
        await asyncio.wait_for(all_synced.wait(), 120)
        ready.set()
        await loop.run_in_executor(None, conn.recv)  # told to stop
        for tr in transports:
            tr.close()

    asyncio.run(main())


def _fanout(
    report: h.Report, url: str, gw: _roles.Gateway, port: int, watchers: int, changes: int
) -> None:
    import psutil

    proc = psutil.Process(gw.proc.pid)
    raw = _roles.RawRedis(*_roles.host_port(url))
    seq = [1]
    incarnation = int(time.time() * 1000)

    def move(i: int) -> None:
        # Round-robin over WATCHED_IDS instances: the registrar's per-instance flood
        # guard (60 events, then 20/s) must not drop a change.
        seq[0] += 1
        payload = _roles.announce(
            "heartbeat",
            WATCHED,
            f"w{i % WATCHED_IDS}",
            incarnation=incarnation,
            seq=seq[0],
            url=f"http://10.9.1.{i % 250}:{8000 + i}",
        )
        raw.send([_roles.publish_cmd(WATCHED, payload)])

    client = HttpClient("127.0.0.1", port)
    for k in range(WATCHED_IDS):
        move(10_000 + k)  # registers them (before any watcher)
    h.wait_until(
        lambda: (
            client.request("GET", "/api/v1/services")[1].count(b'"service_url":"http://10.9.')
            == WATCHED_IDS
        ),
        10,
        "the watched instances in the gateway",
    )
    client.close()

    def cpu() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    def rounds(k: int, first: int) -> tuple[list[float], list[float], float]:
        """``changes`` changes fanned out to ``k`` watchers: the last arrival and every
        arrival per change, and the gateway's CPU per change (s)."""
        ctx = h.mp()
        per = [k // 2, k - k // 2] if k > 1 else [k]
        procs, conns, readies = [], [], []
        for part in per:
            ready = ctx.Event()
            parent, child = ctx.Pipe()
            p = ctx.Process(target=sse_clients_role, args=(port, part, ready, child), daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
            readies.append(ready)
        last: list[float] = []
        every: list[float] = []
        try:
            for r in readies:
                if not r.wait(180):
                    raise TimeoutError("the watchers did not all get their snapshot")
            time.sleep(0.5)
            bar = h.progress(changes, f"{k} SSE watchers")
            with bar:
                c0 = cpu()
                for i in range(first, first + changes):
                    t0 = time.monotonic()
                    move(i)
                    times: list[float] = []
                    for c in conns:
                        if not c.poll(30):
                            raise TimeoutError(f"change {i} did not reach every watcher")
                        r, got = c.recv()
                        assert r == i, (r, i)
                        times.extend(got)
                    last.append(max(times) - t0)
                    every.extend(t - t0 for t in times)
                    bar.update(1)
                    time.sleep(0.01)  # the gateway settles (writes flushed) before the next
                spent = (cpu() - c0) / changes
        finally:
            for c in conns:
                with contextlib.suppress(OSError):
                    c.send("stop")
            h.stop_processes(procs)
        return last, every, spent

    try:
        _last1, _every1, base = rounds(1, 0)
        time.sleep(0.5)  # the gateway sees that watcher's connection close (the cap)
        last, every, spent = rounds(watchers, changes)
    finally:
        raw.close()
    base_ms, total_ms = base * 1000, spent * 1000
    per_watcher_us = (total_ms - base_ms) / max(1, watchers - 1) * 1000
    report.add(f"change -> last of {watchers} SSE watchers", "ms", [x * 1000 for x in last])
    report.add(f"change -> each of {watchers} SSE watchers", "ms", [x * 1000 for x in every])
    report.data["sse"] = {
        "gateway_cpu_ms_per_change_one_watcher": round(base_ms, 3),
        "gateway_cpu_ms_per_change": round(total_ms, 3),
        "gateway_cpu_us_per_change_per_watcher": round(per_watcher_us, 2),
    }
    report.note(
        f"gateway CPU per change: {total_ms:.2f} ms with {watchers} watchers, {base_ms:.2f} ms "
        f"with one: {per_watcher_us:.1f} µs per change per added watcher"
    )


if __name__ == "__main__":
    raise SystemExit(main())
