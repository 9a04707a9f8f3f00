"""Scenario 5: a mirror's cold start and memory for 1k / 10k / 100k instances.

The registry is filled through a registrar (records of the usual shape: URL,
two capabilities, two metadata entries). Each sample is a fresh process
that starts a Mirror and times ``async with Mirror(url)`` up to the first
applied snapshot (subscribe, SMEMBERS, pipelined MGETs, decode), then
measures what the view costs: the growth of its resident set (after a
collection), and, in a separate process, the bytes ``tracemalloc`` sees
allocated by the start (no fragmentation or freed-but-kept arenas).

    python bench/mirror_scale.py [--quick] [--sizes 1000,10000,100000] [--repeats 5]
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _roles

from saga_events.model import new_incarnation


def cold_start_role(url: str, mode: str, queue: Any) -> None:
    """One cold start of a Mirror; put (seconds, rss growth, traced bytes, instances, details).

    ``mode``: ``timed`` (plain), ``traced`` (tracemalloc on: bytes and the top
    allocation sites) or ``profiled`` (cProfile on: the top functions).
    """
    import cProfile
    import gc
    import pstats
    import time
    import tracemalloc

    import anyio
    import psutil

    from saga_events import Mirror

    _roles._quiet()
    proc = psutil.Process()
    details: dict[str, Any] = {}

    async def main() -> None:
        gc.collect()
        rss0 = proc.memory_info().rss
        profiler = cProfile.Profile() if mode == "profiled" else None
        if mode == "traced":
            tracemalloc.start()
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        async with Mirror(url) as mirror:
            elapsed = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
                stats = pstats.Stats(profiler)
                rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
                details["profile_tottime_s"] = [
                    (f"{fn} ({Path(file).name}:{line})", round(tt, 4), round(ct, 4), nc)
                    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows[:15]
                ]
                details["profile_total_s"] = round(sum(v[2] for v in stats.stats.values()), 4)  # type: ignore[attr-defined]
            gc.collect()
            traced_bytes = 0
            if mode == "traced":
                traced_bytes = tracemalloc.get_traced_memory()[0]
                snap = tracemalloc.take_snapshot()
                details["top_allocations"] = [
                    (str(stat.traceback[0]), stat.size, stat.count)
                    for stat in snap.statistics("lineno")[:10]
                ]
                tracemalloc.stop()
            rss1 = proc.memory_info().rss
            queue.put((elapsed, rss1 - rss0, traced_bytes, len(mirror), details))

    anyio.run(main)


def measure(n: int, repeats: int, profile: bool, bar: Any) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(h.redis_server())
        counters, _procs = _roles.start_registrars(server.url, 1, stack)
        raw = _roles.RawRedis(server.host, server.port)
        stack.callback(raw.close)
        inc = new_incarnation()
        bar.set_description(f"N={n}: registering")
        commands = [
            _roles.publish_cmd(
                f"svc-{i % 500}",
                _roles.announce(
                    "register",
                    f"svc-{i % 500}",
                    f"i-{i}",
                    incarnation=inc,
                    seq=1,
                    url=_roles.instance_url(i),
                    ttl_ms=3_600_000,
                ),
            )
            for i in range(n)
        ]
        _roles.publish_paced(raw, commands, counters, 1)
        _roles.wait_received(counters, 1, n)
        h.wait_until(lambda: _roles.index_size(server.url) >= n, 60, "registry")
        bar.set_description(f"N={n}: cold starts")
        q = h.mp().Queue()
        out: list[tuple[float, int, int, int, dict[str, Any]]] = []
        modes = ["timed"] * repeats + ["traced"] + (["profiled"] if profile else [])
        for mode in modes:
            proc = h.mp().Process(target=cold_start_role, args=(server.url, mode, q))
            proc.start()
            out.append(q.get(timeout=300))
            proc.join(30)
            bar.update(1)
    timed = out[:repeats]
    traced = out[repeats]
    return {
        "top_allocations": traced[4].get("top_allocations", []),
        "profile": out[-1][4] if profile else None,
        "n": n,
        "cold_start_ms": [t * 1000 for t, _, _, _, _ in timed],
        "rss_bytes_per_instance": [rss / n for _, rss, _, _, _ in timed],
        "traced_bytes_per_instance": traced[2] / n,
        "instances_seen": [k for _, _, _, k, _ in out],
    }


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated N (default 1000,10000,100000)")
    p.add_argument("--repeats", type=int, default=None, help="cold starts per size (5)")
    p.add_argument("--profile", action="store_true", help="cProfile a cold start at the largest N")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    sizes = [int(x) for x in (args.sizes or ("100,1000" if q else "1000,10000,100000")).split(",")]
    repeats = args.repeats or (2 if q else 5)
    report = h.Report("mirror_scale", {"sizes": sizes, "repeats": repeats, "quick": q})
    results = []
    with h.progress(len(sizes) * (repeats + 2), "mirror scale") as bar:
        for n in sizes:
            results.append(measure(n, repeats, args.profile and n == max(sizes), bar))
    for res in results:
        n = res["n"]
        report.add(
            f"cold start, N={n}",
            "ms",
            res["cold_start_ms"],
            per_1k_instances_ms=h.summarize(res["cold_start_ms"])["median"] * 1000 / n,
        )
        report.add(
            f"memory (RSS growth), N={n}",
            "bytes/instance",
            res["rss_bytes_per_instance"],
            tracemalloc=res["traced_bytes_per_instance"],
        )
        report.data[f"N={n}"] = res
        if any(k != n for k in res["instances_seen"]):
            report.note(f"N={n}: a mirror saw {res['instances_seen']} instances, not {n}")
    ten_k = next((r for r in results if r["n"] == 10_000), None)
    if ten_k is not None:
        med = h.summarize(ten_k["cold_start_ms"])["median"]
        report.target("cold start of 10k instances <= 250 ms (median)", f"{med:.0f} ms", med <= 250)
    big = results[-1]
    rss = h.summarize(big["rss_bytes_per_instance"])["median"]
    traced = big["traced_bytes_per_instance"]
    report.target(
        f"mirror memory <= 1 KiB per instance (N={big['n']:,})",
        f"{rss:.0f} B RSS growth, {traced:.0f} B allocated (tracemalloc)",
        rss <= 1024 and traced <= 1024,
    )
    lines = [f"tracemalloc, top allocation sites at N={big['n']:,} (bytes per instance):"]
    lines += [f"  {size / big['n']:7.1f}  {site}" for site, size, _count in big["top_allocations"]]
    report.note("\n".join(lines))
    if big["profile"]:
        prof = big["profile"]
        lines = [
            f"cProfile of one cold start at N={big['n']:,} "
            f"({prof['profile_total_s']:.2f} s of profiled time), top functions by own time:"
        ]
        lines += [
            f"  {tt:7.3f} s own {ct:7.3f} s cumulative {nc:>8} calls  {fn}"
            for fn, tt, ct, nc in prof["profile_tottime_s"]
        ]
        report.note("\n".join(lines))
    if q:
        report.note("--quick: tiny sizes, the figures mean nothing")
    report.finish(args.out, _plot)
    return 0


def _plot(report: h.Report, fig: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    cold = [r for r in report.rows if r.name.startswith("cold start")]
    mem = [r for r in report.rows if r.name.startswith("memory")]
    ns = [int(r.name.rsplit("=", 1)[1]) for r in cold]
    ax1.plot(ns, [r.stats["median"] for r in cold], marker="o", label="median")
    ax1.plot(ns, [r.stats["max"] for r in cold], marker="x", linestyle="--", label="max")
    ax1.axhline(250, color="grey", linestyle=":", label="target at 10k")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("instances")
    ax1.set_ylabel("cold start, ms")
    ax1.legend(fontsize=7)
    ax1.grid(True, alpha=0.3)
    ax2.plot(ns, [r.stats["median"] for r in mem], marker="o", label="RSS growth")
    ax2.plot(ns, [r.extra["tracemalloc"] for r in mem], marker="s", label="tracemalloc")
    ax2.axhline(1024, color="grey", linestyle=":", label="target 1 KiB")
    ax2.set_xscale("log")
    ax2.set_xlabel("instances")
    ax2.set_ylabel("bytes per instance")
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)


if __name__ == "__main__":
    raise SystemExit(main())
