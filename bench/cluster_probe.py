"""What a subscription's periodic node check costs: the old one against the probe (issue 11).

A subscribed connection cannot be answered MOVED or READONLY, so each subscription checks
now and then that its node is still the right one. Before: a fresh ``CLUSTER NODES`` on
short-lived connections (``Topology.verify``: the seed asked, then the owner), every 10 s,
per subscription; on Sentinel, ``ROLE`` on a short-lived connection after a refresh only.
Now: one command on a connection the client already holds (``EXISTS`` of a key in the
slot, ``ROLE``), every 5 s. Reported per check: wall time seen by the client and CPU
(user+sys from INFO) summed over every node of a 3-primary Cluster (one replica each),
and the load 10k subscriptions put on the Cluster at each kind's interval.
Run: ``python bench/cluster_probe.py [--checks 2000]``. Ratios from one run on a
shared machine; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from saga_events._redis import connect
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import EmbeddedCluster, client
from saga_events.keys import Keys
from saga_events.topology import Topology, slot_of

CLIENTS = 10_000


def cpu(node: RedisServer) -> float:
    with client(node) as c:
        stats = c.info("cpu")
    return float(stats["used_cpu_user"]) + float(stats["used_cpu_sys"])


async def measure(
    cluster: EmbeddedCluster, name: str, check: Callable[[], Awaitable[Any]], n: int,
    interval: float,
) -> dict[str, Any]:  # fmt: skip
    before = sum(cpu(node) for node in cluster.nodes)
    t0 = time.perf_counter()
    for _ in range(n):
        await check()
    wall = (time.perf_counter() - t0) / n
    used = (sum(cpu(node) for node in cluster.nodes) - before) / n
    return {
        "check": name,
        "interval_s": interval,
        "client_wall_us": round(wall * 1e6, 1),
        "server_cpu_us_all_nodes": round(used * 1e6, 2),
        f"server_cores_for_{CLIENTS}_subscriptions": round(used * CLIENTS / interval, 4),
    }


async def bench(cluster: EmbeddedCluster, checks: int) -> list[dict[str, Any]]:
    ns = "default"
    slot = slot_of(ns)
    owner = cluster.owner(slot)
    seed = next(n for n in cluster.nodes if n is not owner)
    out = []
    async with Topology(cluster.seed_url(seed)) as topology:
        await topology.slot_address(slot)
        out.append(await measure(cluster, "CLUSTER NODES, short-lived connections (before)",
                                 lambda: topology.verify(slot), checks, 10.0))  # fmt: skip
        out.append(await measure(cluster, "ROLE, short-lived connection (Sentinel, before)",
                                 lambda: topology._role((owner.host, owner.port)), checks,
                                 5.0))  # fmt: skip
    redis = connect(cluster.url, namespace=ns)
    key = Keys(ns).rev
    await redis.exists(key)
    n = checks * 10
    out.append(await measure(cluster, "EXISTS on a held connection (probe, Cluster)",
                             lambda: redis.exists(key), n, 5.0))  # fmt: skip
    out.append(await measure(cluster, "ROLE on a held connection (probe, Sentinel)",
                             lambda: redis.execute_command("ROLE"), n, 5.0))  # fmt: skip
    await redis.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checks", type=int, default=2000)
    args = parser.parse_args()
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps({"loadavg": os.getloadavg(), "at": at}))  # noqa: T201
    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        for row in asyncio.run(bench(cluster, args.checks)):
            print(json.dumps(row))  # noqa: T201


if __name__ == "__main__":
    main()
