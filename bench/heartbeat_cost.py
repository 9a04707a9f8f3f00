"""Scenario 3: what heartbeats cost, for N = 1k, 10k, 100k instances.

N instances are registered, then heartbeat every 20 s (ttl 60 s) for one
full heartbeat period. The agents are simulated: one driver process
publishes the exact events N Agents would, spread evenly over the period
in 1 ms steps (so the registrar sees small batches, as from independent
agents), on a bare socket (so the driver costs little CPU). Measured: the
registrar's CPU share (psutil, per second), Redis's commands per second
and per heartbeat (INFO), and what one mirror process receives and sends
because of the heartbeats (its own counters): the target is zero of both.

    python bench/heartbeat_cost.py [--quick] [--sizes 1000,10000,100000] [--profile]
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _roles

from saga_events.model import new_incarnation


def _info(r: Any) -> tuple[int, dict[str, int]]:
    """Commands processed, and per command its calls and (key ``<cmd>:usec``) the
    µs Redis spent in it (its own clock: less sensitive to a loaded machine
    than the process's CPU time, which also counts the syscalls)."""
    stats = r.info("stats")
    cmd = r.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmd.items()}
    calls.update({f"{k.removeprefix('cmdstat_')}:usec": int(v["usec"]) for k, v in cmd.items()})
    return int(stats["total_commands_processed"]), calls


def run_size(n: int, interval: float, ttl_ms: int, profile: bool, bar: Any) -> dict[str, Any]:
    import psutil
    import redis

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(h.redis_server())
        counters, procs = _roles.start_registrars(server.url, 1, stack)
        raw = _roles.RawRedis(server.host, server.port)
        stack.callback(raw.close)
        inc = new_incarnation()
        ids = [(f"svc-{i % 500}", f"i-{i}") for i in range(n)]
        urls = [_roles.instance_url(i) for i in range(n)]

        def commands(kind: str, seq: int, lo: int, hi: int) -> list[bytes]:
            return [
                _roles.publish_cmd(
                    svc,
                    _roles.announce(
                        kind,
                        svc,
                        sid,
                        incarnation=inc,
                        seq=seq,
                        url=urls[i],
                        ttl_ms=ttl_ms,
                        since=1,  # as an Agent: registered at seq 1, unchanged since
                    ),
                )
                for i, (svc, sid) in enumerate(ids[lo:hi], start=lo)
            ]

        bar.set_description(f"N={n}: registering")
        _roles.publish_paced(raw, commands("register", 1, 0, n), counters, 1)
        _roles.wait_received(counters, 1, n)
        ready = h.mp().Event()
        mcounters = h.mp().Array("q", len(_roles.MIRROR_FIELDS), lock=False)
        mproc = h.mp().Process(
            target=_roles.stats_mirror_role, args=(server.url, ready, mcounters), daemon=True
        )
        mproc.start()
        stack.callback(h.stop_processes, [mproc])
        if not ready.wait(120):
            raise RuntimeError("mirror did not sync")
        h.wait_until(lambda: mcounters[_roles.MIRROR_FIELDS.index("instances")] >= n, 30, "mirror")
        time.sleep(0.5)

        r = redis.Redis(server.host, server.port)
        stack.callback(r.close)
        reg_proc = psutil.Process(procs[0].pid)
        redis_proc = psutil.Process(server.pid)
        m0 = list(mcounters)
        ops0, calls0 = _info(r)
        received0 = _roles.counter(counters, 0, "received")
        sampler = None
        if profile:
            import _profile

            if _profile.py_spy_missing() is None:
                sampler = _profile.Sampler(procs[0].pid, interval)
        bar.set_description(f"N={n}: heartbeating")
        tick = 0.001  # ~5 events a burst at 100k: close to independent agents
        per_tick = n * tick / interval
        t_start = time.monotonic()
        cpu_reg = [sum(reg_proc.cpu_times()[:2])]
        cpu_redis = [sum(redis_proc.cpu_times()[:2])]
        ops = [ops0]
        stamps = [t_start]
        sent = 0
        next_sample = t_start + 1.0
        while sent < n:
            now = time.monotonic()
            due = min(n, int((now - t_start) / tick * per_tick) + 1)
            if due > sent:
                raw.send(commands("heartbeat", 2, sent, due))
                bar.update(due - sent)
                sent = due
            if now >= next_sample:
                next_sample += 1.0
                stamps.append(now)
                cpu_reg.append(sum(reg_proc.cpu_times()[:2]))
                cpu_redis.append(sum(redis_proc.cpu_times()[:2]))
                ops.append(_info(r)[0])
            time.sleep(max(0.0, tick - (time.monotonic() - now)))
        _roles.wait_received(counters, 1, 2 * n)
        elapsed = time.monotonic() - t_start
        stamps.append(time.monotonic())
        cpu_reg.append(sum(reg_proc.cpu_times()[:2]))
        cpu_redis.append(sum(redis_proc.cpu_times()[:2]))
        ops1, calls1 = _info(r)
        ops.append(ops1)
        time.sleep(0.2)  # let the mirror's counters catch up (they publish every 50 ms)
        m1 = list(mcounters)
        heartbeats = _roles.counter(counters, 0, "received") - received0
        summary = sampler.summary() if sampler is not None else None

    def delta(field: str) -> int:
        i = _roles.MIRROR_FIELDS.index(field)
        return int(m1[i] - m0[i])

    def per_second(values: list[float]) -> list[float]:
        return [
            (values[i + 1] - values[i]) / (stamps[i + 1] - stamps[i])
            for i in range(len(values) - 1)
            if stamps[i + 1] - stamps[i] > 0.2
        ]

    calls = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0) > 0}
    # Inside a script each redis.call is counted in its own command's stats, and
    # the script's EVALSHA usec already holds them: the scripts plus the PUBLISHes.
    usec = sum(calls.get(f"{c}:usec", 0) for c in ("evalsha", "eval", "publish"))
    return {
        "n": n,
        "heartbeats": heartbeats,
        "elapsed_s": elapsed,
        "registrar_cpu_pct": [100 * x for x in per_second(cpu_reg)],
        "redis_cpu_pct": [100 * x for x in per_second(cpu_redis)],
        "redis_ops_per_s": per_second([float(x) for x in ops]),
        "redis_commands_per_heartbeat": (ops1 - ops0) / max(1, heartbeats),
        "redis_usec_per_heartbeat": usec / max(1, heartbeats),
        "commandstats": calls,
        "mirror_record_notifications": delta("record_notifications"),
        "mirror_gets": delta("gets"),
        "mirror_snapshots": delta("snapshots"),
        "mirror_canary_notifications": delta("canary_notifications"),
        "profile": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="comma-separated N (default 1000,10000,100000)")
    p.add_argument("--interval", type=float, default=None, help="heartbeat period, s (20)")
    p.add_argument("--profile", action="store_true", help="py-spy the registrar at the largest N")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    sizes = [int(x) for x in (args.sizes or ("30,100" if q else "1000,10000,100000")).split(",")]
    interval = args.interval or (1.0 if q else 20.0)
    ttl_ms = int(interval * 3000)
    report = h.Report(
        "heartbeat_cost",
        {"sizes": sizes, "heartbeat_interval_s": interval, "ttl_ms": ttl_ms, "quick": q},
    )
    results = []
    with h.progress(sum(sizes), "heartbeat cost") as bar:
        for n in sizes:
            results.append(run_size(n, interval, ttl_ms, args.profile and n == max(sizes), bar))
    for res in results:
        n, hb = res["n"], max(1, res["heartbeats"])
        report.add(
            f"registrar CPU, N={n}",
            "% of a core",
            res["registrar_cpu_pct"],
            mean_pct=sum(res["registrar_cpu_pct"]) / max(1, len(res["registrar_cpu_pct"])),
        )
        report.add(f"redis-server CPU, N={n}", "% of a core", res["redis_cpu_pct"])
        report.add(
            f"Redis commands/s, N={n}",
            "ops/s",
            res["redis_ops_per_s"],
            per_heartbeat=res["redis_commands_per_heartbeat"],
        )
        report.add(
            f"Redis time in commands per heartbeat, N={n}",
            "µs",
            [res["redis_usec_per_heartbeat"]],
        )
        report.add(
            f"mirror messages per heartbeat, N={n}",
            "msgs",
            [res["mirror_record_notifications"] / hb],
            heartbeats=res["heartbeats"],
        )
        report.add(
            f"mirror commands per heartbeat, N={n}",
            "cmds",
            [(res["mirror_gets"] + res["mirror_snapshots"]) / hb],
            heartbeats=res["heartbeats"],
        )
        report.data[f"N={n}"] = res
    big = results[-1]
    mean_cpu = sum(big["registrar_cpu_pct"]) / max(1, len(big["registrar_cpu_pct"]))
    report.target(
        f"{big['n']:,} heartbeating instances at <= 15 % of one core (registrar)",
        f"{mean_cpu:.1f} % (mean over {big['elapsed_s']:.0f} s)",
        mean_cpu <= 15,
    )
    msgs = sum(r["mirror_record_notifications"] for r in results)
    cmds = sum(r["mirror_gets"] + r["mirror_snapshots"] for r in results)
    report.target(
        "heartbeats invisible to mirrors: 0 messages and 0 commands per heartbeat",
        f"{msgs} record messages, {cmds} commands over "
        f"{sum(r['heartbeats'] for r in results):,} heartbeats",
        msgs == 0 and cmds == 0,
    )
    if big["profile"]:
        import _profile

        report.note(_profile.format_summary(big["profile"], f"the registrar at N={big['n']}"))
    if q:
        report.note("--quick: tiny sizes, the figures mean nothing")
    report.finish(args.out, _plot)
    return 0


def _plot(report: h.Report, fig: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    rows = [r for r in report.rows if r.name.startswith("registrar CPU")]
    ns = [int(r.name.rsplit("=", 1)[1]) for r in rows]
    ax1.plot(ns, [r.extra["mean_pct"] for r in rows], marker="o", label="registrar")
    red = [r for r in report.rows if r.name.startswith("redis-server CPU")]
    ax1.plot(ns, [r.stats["mean"] for r in red], marker="s", label="redis-server")
    ax1.axhline(15, color="grey", linestyle=":", label="target (registrar)")
    ax1.set_xscale("log")
    ax1.set_xlabel("instances heartbeating every 20 s")
    ax1.set_ylabel("% of one core")
    ax1.legend(fontsize=7)
    ax1.grid(True, alpha=0.3)
    msgs = [r.stats["median"] for r in report.rows if r.name.startswith("mirror messages")]
    cmds = [r.stats["median"] for r in report.rows if r.name.startswith("mirror commands")]
    x = range(len(ns))
    ax2.bar([i - 0.2 for i in x], msgs, width=0.4, label="messages received")
    ax2.bar([i + 0.2 for i in x], cmds, width=0.4, label="commands sent")
    ax2.set_xticks(list(x), [f"{n:,}" for n in ns])
    ax2.set_ylim(0, 1)
    ax2.set_title("per heartbeat, one mirror", fontsize=9)
    ax2.legend(fontsize=7)


if __name__ == "__main__":
    raise SystemExit(main())
