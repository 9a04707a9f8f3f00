"""Fan-out on a Sentinel topology: mirrors on the master vs on two replicas, and failovers.

One job: measure, on real redis-server processes (a master, two replicas, three
Sentinels), (1) the master's CPU per registry change with M mirrors subscribed on the
master, then with the same M mirrors on ``?read_from=replica`` (spread over the two
replicas), (2) register -> visible p50/p99 in each case, and (3) failovers: kill -9 of
the master -> first write accepted -> a new registration in every mirror, over repeats.
CONFIG is not replicated: the registrar sets the notification flags on every node
within its config check interval (5 s); the setup sets them itself on every node (and
again on a node that comes back), so that the figures do not include that interval.

    python bench/fanout_replicas.py --quick        # M=10, < 2 min
    python bench/fanout_replicas.py                # M=50, the issue's figure

Prints a table and writes ``bench/results/fanout_replicas.json``. The registrar and the
mirrors run in this process (the master's CPU is read from the master's INFO, so they do
not count in it); the agents are in-process too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from saga_events import Agent, Mirror, Registrar
from saga_events._redis import connect
from saga_events._wait import eventually
from saga_events.embedded_topology import SentinelGroup, client, info

OUT = Path(__file__).resolve().parent / "results"
FLAGS = "KEg$xe"


def set_flags(group: SentinelGroup) -> None:
    for node in group.nodes:
        if node.process is not None:
            with client(node) as c:
                c.config_set("notify-keyspace-events", FLAGS)


def cpu_seconds(group: SentinelGroup) -> float:
    cpu = info(group.master(), "cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def visible_everywhere(mirrors: list[Mirror], key: str, since: float) -> list[float]:
    """Seconds from ``since`` until ``key`` is in each mirror (polled every ms, bounded:
    after 30 s, TimeoutError naming the mirrors that still miss it)."""
    seen: dict[int, float] = {}
    with anyio.move_on_after(30):
        while len(seen) < len(mirrors):
            for i, m in enumerate(mirrors):
                if i not in seen and key in m.snapshot():
                    seen[i] = time.monotonic() - since
            await anyio.sleep(0.001)
    if len(seen) < len(mirrors):
        missing = [f"{i} ({'stale' if mirrors[i].stale else 'fresh'})"
                   for i in range(len(mirrors)) if i not in seen]  # fmt: skip
        raise TimeoutError(f"{key} missing after 30 s in mirrors {', '.join(missing)}")
    return list(seen.values())


async def fanout(group: SentinelGroup, m: int, changes: int, read_from: str) -> dict[str, Any]:
    url = group.url + ("?read_from=replica" if read_from == "replica" else "")
    mirrors = [Mirror(url) for _ in range(m)]
    per_mirror: list[float] = []
    last: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(Registrar(group.url, rebuild_wait=0.2))
        for mirror in mirrors:
            await stack.enter_async_context(mirror)
        cpu0 = cpu_seconds(group)
        wall0 = time.monotonic()
        for i in range(changes):
            agent = Agent(group.url, "bench", f"http://10.2.0.{i % 250}:80",
                          service_id=f"{read_from}-{i}", ttl=120)  # fmt: skip
            t0 = time.monotonic()
            await stack.enter_async_context(agent)
            times = await visible_everywhere(mirrors, _key(agent), t0)
            per_mirror += times
            last.append(max(times))
        cpu = cpu_seconds(group) - cpu0
        wall = time.monotonic() - wall0
    return {
        "mirrors": m, "read_from": read_from, "changes": changes,
        "master_cpu_ms_per_change": 1000 * cpu / changes,
        "master_cpu_share": cpu / wall,
        "visible_p50_ms": 1000 * statistics.median(per_mirror),
        "visible_p99_ms": 1000 * pct(per_mirror, 0.99),
        "all_mirrors_p50_ms": 1000 * statistics.median(last),
        "all_mirrors_p99_ms": 1000 * pct(last, 0.99),
    }  # fmt: skip


def _key(agent: Agent) -> str:
    return agent.keys.inst(agent.service_name, agent.service_id)


async def failovers(group: SentinelGroup, m: int, repeats: int) -> dict[str, Any]:
    mirrors = [Mirror(group.url + ("?read_from=replica" if i % 2 else "")) for i in range(m)]
    write: list[float] = []
    visible: list[float] = []
    lost: list[str] = []
    probe = connect(group.url)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(probe.aclose)
        await stack.enter_async_context(Registrar(group.url, rebuild_wait=0.2))
        for mirror in mirrors:
            await stack.enter_async_context(mirror)
        for r in range(repeats):
            old = await anyio.to_thread.run_sync(group.kill_master)
            t0 = time.monotonic()

            async def accepted() -> bool:
                try:
                    await probe.set("bench:probe", b"1")
                except Exception:  # any refusal (down, READONLY): not yet
                    return False
                return True

            await eventually(accepted, 60, interval=0.01, what="a write accepted")
            write.append(time.monotonic() - t0)
            agent = Agent(group.url, "after", "http://10.3.0.1:80",
                              service_id=f"after-{r}", ttl=120)  # fmt: skip
            done = anyio.Event()

            async def hold(agent: Agent = agent, done: anyio.Event = done) -> None:
                async with agent:
                    await done.wait()

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(hold)
                    try:
                        times = await visible_everywhere(mirrors, _key(agent), t0)
                    finally:
                        done.set()
            except* TimeoutError as group:
                # A finding, not a crash of the bench: say it and stop failing over.
                odd = "odd mirrors read from replicas"
                lost.append(f"failover {r + 1}: {group.exceptions[0]} ({odd})")
            if lost:
                break
            visible.append(max(times))
            await anyio.to_thread.run_sync(old.start)
            await anyio.to_thread.run_sync(group.wait_settled)
            await anyio.to_thread.run_sync(set_flags, group)
    return {
        "mirrors": m, "repeats": repeats, "half_on_replicas": True,
        "kill_to_write_s": write, "kill_to_every_mirror_s": visible, "not_converged": lost,
        "kill_to_write_median_s": statistics.median(write), "kill_to_write_worst_s": max(write),
        "kill_to_every_mirror_median_s": statistics.median(visible) if visible else None,
        "kill_to_every_mirror_worst_s": max(visible) if visible else None,
    }  # fmt: skip


async def main(quick: bool) -> dict[str, Any]:
    m, changes, repeats = (10, 40, 3) if quick else (50, 200, 5)
    result: dict[str, Any] = {"quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                        time.gmtime())}  # fmt: skip
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as group:
        set_flags(group)
        result["fanout"] = [await fanout(group, m, changes, where)
                            for where in ("master", "replica")]  # fmt: skip
        result["failover"] = await failovers(group, m, repeats)
    return result


def report(result: dict[str, Any]) -> None:
    print(f"fanout_replicas ({'quick' if result['quick'] else 'full'}, {result['started']})")  # noqa: T201
    for row in result["fanout"]:
        print(  # noqa: T201
            f"  M={row['mirrors']} on {row['read_from']:7}: master CPU "
            f"{row['master_cpu_ms_per_change']:.3f} ms/change; register->visible p50 "
            f"{row['visible_p50_ms']:.1f} ms p99 {row['visible_p99_ms']:.1f} ms; in every "
            f"mirror p50 {row['all_mirrors_p50_ms']:.1f} ms p99 {row['all_mirrors_p99_ms']:.1f} ms"
        )
    f = result["failover"]
    write, seen = f["kill_to_write_s"], f["kill_to_every_mirror_s"]
    print(  # noqa: T201
        f"  failover x{len(write)} (M={f['mirrors']}, half on replicas): kill->write accepted "
        f"median {statistics.median(write):.2f} s worst {max(write):.2f} s; kill->every mirror "
        + (f"median {statistics.median(seen):.2f} s worst {max(seen):.2f} s" if seen else "-")
    )
    for line in f["not_converged"]:
        print(f"  NOT CONVERGED: {line}")  # noqa: T201


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M=10, 40 changes, 3 failovers")
    parser.add_argument("--out", type=Path, default=OUT)
    ns = parser.parse_args()
    res = anyio.run(main, ns.quick)
    report(res)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "fanout_replicas.json").write_text(json.dumps(res, indent=2))
