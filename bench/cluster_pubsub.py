"""What classic PUBLISH costs on a Cluster's bus, against sharded SPUBLISH (issue 11).

A 3-primary Cluster (a replica each, Debian's redis-server 7); one publisher sends N
200-byte messages on a ``{ns}`` channel to the slot's owner, first with PUBLISH, then
with SPUBLISH, with one subscriber on the owner (as the registrar). Reported per kind:
messages/s seen by the publisher, CPU (user+sys, from INFO) summed over every node and
per node kind (owner, owner's replica, the other four), and the bus messages received by
the others. Run: ``python bench/cluster_pubsub.py [--messages 20000]``. Ratios from one
run on a shared machine; not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from typing import Any

import redis

from saga_events.embedded import RedisServer
from saga_events.embedded_topology import EmbeddedCluster, client
from saga_events.keys import Keys
from saga_events.topology import slot_of


def cpu(node: RedisServer) -> float:
    with client(node) as c:
        stats = c.info("cpu")
    return float(stats["used_cpu_user"]) + float(stats["used_cpu_sys"])


def bus_received(node: RedisServer) -> int:
    with client(node) as c:
        text = str(c.execute_command("CLUSTER", "INFO"))
    stats = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return sum(int(v) for k, v in stats.items() if k.startswith("cluster_stats_messages_publish")
               and k.endswith("_received"))  # fmt: skip


def run(cluster: EmbeddedCluster, command: str, messages: int) -> dict[str, Any]:
    ns = "default"
    owner = cluster.owner(slot_of(ns))
    replica = cluster.replicas_of(owner)[0]
    channel = Keys(ns).prefix + "feed"
    sub = redis.Redis(port=owner.port).pubsub()
    sub.execute_command("SSUBSCRIBE" if command == "SPUBLISH" else "SUBSCRIBE", channel)
    pub = redis.Redis(port=owner.port)
    payload = b"x" * 200
    before = {n.port: (cpu(n), bus_received(n)) for n in cluster.nodes}
    t0 = time.perf_counter()
    pipe = pub.pipeline(transaction=False)
    for i in range(messages):
        pipe.execute_command(command, channel, payload)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    elapsed = time.perf_counter() - t0
    time.sleep(1.0)  # let the bus deliver
    after = {n.port: (cpu(n), bus_received(n)) for n in cluster.nodes}
    sub.close()
    pub.close()
    used = {p: after[p][0] - before[p][0] for p in after}
    others = [n.port for n in cluster.nodes if n not in (owner, replica)]
    return {
        "command": command,
        "messages_per_s": round(messages / elapsed),
        "cpu_all_nodes_us_per_msg": round(sum(used.values()) / messages * 1e6, 2),
        "cpu_owner_us_per_msg": round(used[owner.port] / messages * 1e6, 2),
        "cpu_replica_us_per_msg": round(used[replica.port] / messages * 1e6, 2),
        "cpu_other_nodes_us_per_msg": round(sum(used[p] for p in others) / messages * 1e6, 2),
        "bus_messages_received_by_others": sum(after[p][1] - before[p][1] for p in others),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    ns = parser.parse_args()
    binary = "/usr/bin/redis-server" if shutil.which("/usr/bin/redis-server") else None
    with EmbeddedCluster(primaries=3, replicas=1, binary=binary) as cluster:
        for _ in range(ns.repeats):  # paired: classic then sharded, same cluster, same load
            for command in ("PUBLISH", "SPUBLISH"):
                print(json.dumps(run(cluster, command, ns.messages)))  # noqa: T201


if __name__ == "__main__":
    main()
