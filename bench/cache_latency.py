"""Scenario 1: the cost of one discovery call, four ways, in the same run.

* ``mirror.pick()``: the in-process view kept current by push;
* a direct Redis GET of the record (redis.asyncio with hiredis);
* ``GET /api/v1/services/{name}`` on the HTTP gateway (httpx, keep-alive);
* a poll-and-cache client (30 s cache, as the seed recommends): a hit, and
  a miss (one gateway GET, or one Redis GET when there is no gateway);
* routing: ``pick()`` and ``pick(where={"zone": ...})`` over 1,000 instances
  of one service (4 zones), and the ratio of the two.

redis-server and the registrar (serving the gateway) are separate processes;
the caller and its mirror share one process, as in an application. Each
call is timed on its own with ``perf_counter_ns`` (the ~50 ns of the timer
itself is included, which only makes the fast paths look slower).

    python bench/cache_latency.py [--quick] [--samples N]
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _roles

from saga_events.model import new_incarnation

SERVICE = "checkout"
ROUTED = "routed"
ROUTED_N = 1000
ZONES = 4


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=None, help="calls timed for the fast paths")
    p.add_argument("--background", type=int, default=None, help="instances registered")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    fast_n = args.samples or (2_000 if q else 200_000)
    slow_n = max(50, fast_n // 20) if not q else 100
    background = args.background if args.background is not None else (50 if q else 1000)
    report = h.Report(
        "cache_latency",
        {
            "fast_samples": fast_n,
            "round_trip_samples": slow_n,
            "background_instances": background,
            "quick": q,
        },
    )
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(h.redis_server())
        gateway = _roles.start_gateway(server.url)
        if gateway is None:
            _roles.start_registrars(server.url, 1, stack)
            report.note(f"gateway column missing: {_roles.gateway_missing() or 'did not start'}")
        else:
            stack.callback(gateway.stop)
            _roles.wait_epoch_ready(server.url)
        raw = _roles.RawRedis(server.host, server.port)
        stack.callback(raw.close)
        _roles.preload(raw, background)
        inc = new_incarnation()
        raw.send(
            [
                _roles.publish_cmd(
                    SERVICE,
                    _roles.announce(
                        "register",
                        SERVICE,
                        f"{SERVICE}-{i}",
                        incarnation=inc,
                        seq=1,
                        url=_roles.instance_url(60000 + i),
                        ttl_ms=3_600_000,
                    ),
                )
                for i in range(3)
            ]
        )
        raw.send(
            [
                _roles.publish_cmd(
                    ROUTED,
                    _roles.announce(
                        "register",
                        ROUTED,
                        f"{ROUTED}-{i}",
                        incarnation=inc,
                        seq=1,
                        url=_roles.instance_url(10000 + i),
                        ttl_ms=3_600_000,
                        metadata={"zone": f"z{i % ZONES}"},
                    ),
                )
                for i in range(ROUTED_N)
            ]
        )
        want = background + 3 + ROUTED_N
        h.wait_until(lambda: _roles.index_size(server.url) >= want, 60, "preload")
        total = 4 * fast_n + 3 * slow_n
        with h.progress(total, "cache latency") as bar:
            columns = _measure(server.url, gateway, fast_n, slow_n, bar)
    base = None
    for name, values, extra in columns:
        row = report.add(name, "us", values, **extra)
        if base is None:
            base = row.stats["median"]
        row.extra["x_mirror"] = row.stats["median"] / base if base else float("nan")
    pick = report.row("mirror.pick()").stats["median"]
    get = report.row("Redis GET").stats["median"]
    report.target(
        "mirror pick() >= 100x faster than a Redis GET round trip, median",
        f"{get / pick:.0f}x ({pick * 1000:.0f} ns vs {get:.0f} us)",
        get / pick >= 100,
    )
    plain = report.row("routed pick()").stats["median"]
    where = report.row("routed pick(where=)").stats["median"]
    report.data["where_to_plain_ratio"] = where / plain if plain else float("nan")
    report.target(
        "pick(where=) over 1,000 instances stays a lookup: <= 5x plain pick, median",
        f"{where / plain:.2f}x ({where * 1000:.0f} ns vs {plain * 1000:.0f} ns)",
        where / plain <= 5,
    )
    report.data["medians_us"] = {name: float(h.summarize(v)["median"]) for name, v, _ in columns}
    if q:
        report.note("--quick: tiny sizes, the figures mean nothing")
    report.finish(args.out, _plot)
    return 0


def _measure(url: str, gateway: Any, fast_n: int, slow_n: int, bar: Any) -> list[Any]:
    import _pollcache
    import anyio
    import redis.asyncio as aioredis

    from saga_events import Mirror

    async def run() -> list[Any]:
        out: list[Any] = []
        r = aioredis.Redis.from_url(url)
        key = _roles.KEYS.inst(SERVICE, f"{SERVICE}-0")
        http = None
        async with Mirror(url) as mirror:
            with anyio.fail_after(10):
                await mirror.wait_for(SERVICE)
            perf = time.perf_counter_ns
            # 1. mirror.pick(): a dictionary lookup and a round-robin step.
            pick = mirror.pick
            values = []
            gc.collect()
            for i in range(fast_n):
                t0 = perf()
                pick(SERVICE)
                values.append(perf() - t0)
                if i % 1000 == 999:
                    bar.update(1000)
            out.append(("mirror.pick()", h.ns_to(values, "us"), {}))
            # 1b. routing: plain pick and pick(where=) over 1,000 instances of one service.
            with anyio.fail_after(30):
                await mirror.wait_until(lambda m: len(m.instances(ROUTED)) >= ROUTED_N)
            where = {"zone": "z1"}
            for label, kw in (("routed pick()", {}), ("routed pick(where=)", {"where": where})):
                values = []
                gc.collect()
                for i in range(fast_n):
                    t0 = perf()
                    pick(ROUTED, **kw)
                    values.append(perf() - t0)
                    if i % 1000 == 999:
                        bar.update(1000)
                out.append((label, h.ns_to(values, "us"), {}))
            # 2. a direct GET of the record.
            values = []
            for _ in range(slow_n):
                t0 = perf()
                await r.get(key)
                values.append(perf() - t0)
                bar.update(1)
            out.append(("Redis GET", h.ns_to(values, "us"), {}))
            # 3. the HTTP gateway.
            if gateway is not None:
                import httpx

                http = httpx.AsyncClient(base_url=gateway.base_url)
                path = f"/api/v1/services/{SERVICE}"
                (await http.get(path)).raise_for_status()
                values = []
                for _ in range(slow_n):
                    t0 = perf()
                    resp = await http.get(path)
                    resp.json()
                    values.append(perf() - t0)
                    bar.update(1)
                out.append(("gateway GET /api/v1/services/{name}", h.ns_to(values, "us"), {}))
                fetch = _pollcache.http_fetch(http)
                miss_via = "gateway"
            else:
                fetch = _pollcache.redis_fetch(r, lambda _n: key)
                miss_via = "Redis GET"
            # 4. poll-and-cache: hits, then misses.
            client = _pollcache.PollCacheClient(fetch, cache_ttl=30.0)
            await client.discover(SERVICE)
            values = []
            for i in range(fast_n):
                t0 = perf()
                await client.discover(SERVICE)
                values.append(perf() - t0)
                if i % 1000 == 999:
                    bar.update(1000)
            out.append(("poll-and-cache hit (30 s TTL)", h.ns_to(values, "us"), {}))
            cold = _pollcache.PollCacheClient(fetch, cache_ttl=0.0)
            values = []
            for _ in range(slow_n):
                t0 = perf()
                await cold.discover(SERVICE)
                values.append(perf() - t0)
                bar.update(1)
            out.append((f"poll-and-cache miss ({miss_via})", h.ns_to(values, "us"), {}))
        if http is not None:
            await http.aclose()
        await r.aclose()
        return out

    return anyio.run(run)


def _plot(report: h.Report, fig: Any) -> None:
    ax = fig.subplots()
    names = [r.name for r in report.rows]
    med = [r.stats["median"] for r in report.rows]
    p99 = [r.stats["p99"] for r in report.rows]
    y = range(len(names))
    ax.barh(list(y), med, color="#4c72b0", label="median")
    ax.scatter(p99, list(y), color="#c44e52", marker="|", s=200, label="p99", zorder=3)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("µs per discovery call (log scale)")
    for yi, m in zip(y, med, strict=True):
        ax.text(m * 1.1, yi, f"{h.fmt(m)} µs", va="center", fontsize=7)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("Cost of one discovery call")
    ax.grid(True, axis="x", alpha=0.3)


if __name__ == "__main__":
    raise SystemExit(main())
