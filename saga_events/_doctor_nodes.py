"""``doctor`` on a topology URL: one finding per node it can discover.

One job: list the nodes behind a ``redis+sentinel://`` or ``redis+cluster://`` URL and check
each one directly. Sentinel: every Sentinel of the URL (reachable, monitors the master name,
version), the master the Sentinels name and every replica they list. Cluster: the primary
that serves the namespace's slot (``{ns}`` hash tag) and its replicas. Per data node: its
ROLE (against what the topology says it should be), its version, and the notification
flags (CONFIG is not replicated: a promoted replica, or a replica that mirrors with
``read_from=replica`` read from, needs them set on itself). A one-node URL yields nothing
here (the main checks cover it). Never raises for a broken node: it is a ``fail`` finding.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ._cluster_nodes import _parse_cluster_nodes
from ._redis import TRANSIENT
from ._topology_url import Address, TopologyURL, parse_url
from .doctor import MIN_VERSION, Finding
from .notify import NOTIFY_SETTING, REQUIRED_FLAGS, flags_cover
from .topology import slot_of

_FIX_FLAGS = (f"CONFIG SET {NOTIFY_SETTING} {REQUIRED_FLAGS} on this node, or in its "
              "redis.conf (CONFIG is not replicated; a registrar with CONFIG rights sets it "
              "on a Sentinel master and its replicas every 5 s, on a Cluster on the slot's "
              "owner only)")  # fmt: skip


async def _ask(url: str, *command: Any) -> Any:
    async with aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0,
                                       decode_responses=True) as client:  # fmt: skip
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]


def _name(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


def _version_of(info: Any) -> tuple[str, bool]:
    """The version in an INFO reply (redis-py parses it into a dict), and if it is recent."""
    version = str(info.get("redis_version", "?")) if isinstance(info, dict) else "?"
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return version, len(parts) != 2 or parts >= MIN_VERSION


async def _data_node(url: TopologyURL, address: Address, want: str) -> Finding:
    """ROLE, version and flags of one data node; ``want``: "master" or "replica"."""
    check = f"node {_name(address)} ({want})"
    node = url.node_url(address)
    try:
        role = await _ask(node, "ROLE")
        version, recent = _version_of(await _ask(node, "INFO", "server"))
    except (*TRANSIENT, RedisError) as exc:
        return Finding(check, "fail", f"unreachable: {exc}", "start it, or remove it from the "
                       "topology (SENTINEL RESET / CLUSTER FORGET)")  # fmt: skip
    actual = "master" if role[0] == "master" else "replica"
    problems: list[str] = []
    fixes: list[str] = []
    status = "ok"
    if actual != want:
        status = "fail"
        problems.append(f"answers ROLE {role[0]}, the topology says {want}")
        fixes.append("wait for the failover to finish, then run doctor again")
    if not recent:
        status = "fail"
        problems.append(f"Redis {version} is older than {'.'.join(map(str, MIN_VERSION))}")
        fixes.append("upgrade this node")
    try:
        got = await _ask(node, "CONFIG", "GET", NOTIFY_SETTING)
        flags = str(got[1]) if isinstance(got, list) and len(got) > 1 else str(
            next(iter(dict(got).values()), "") if isinstance(got, dict) else "")  # fmt: skip
        if not flags_cover(flags):
            # On the master a registrar puts them back; a replica keeps them missing.
            status = "fail" if want == "master" or status == "fail" else "warn"
            problems.append(f"{NOTIFY_SETTING}={flags!r} lacks {REQUIRED_FLAGS!r}")
            fixes.append(_FIX_FLAGS)
    except ResponseError as exc:
        status = "warn" if status == "ok" else status
        problems.append(f"cannot read {NOTIFY_SETTING}: {exc}")
        fixes.append("run doctor as a user that may run CONFIG GET, or check it in the console")
    detail = f"{actual}, Redis {version}" + ("; " + "; ".join(problems) if problems else "")
    return Finding(check, status, detail, "; ".join(fixes))


async def _sentinels(url: TopologyURL) -> tuple[list[Finding], Address | None, list[Address]]:
    findings: list[Finding] = []
    master: Address | None = None
    replicas: list[Address] = []
    for host in url.hosts:
        check = f"sentinel {_name(host)}"
        where = url.sentinel_url(host)
        try:
            reply = await _ask(where, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", url.master_name)
            version, _ = _version_of(await _ask(where, "INFO", "server"))
            if not reply:
                findings.append(Finding(check, "fail", f"does not monitor {url.master_name!r}",
                                        "SENTINEL MONITOR it, or fix the master name in the "
                                        "URL"))  # fmt: skip
                continue
            named = (str(reply[0]), int(reply[1]))
            listed = await _ask(where, "SENTINEL", "REPLICAS", url.master_name)
        except (*TRANSIENT, RedisError) as exc:
            findings.append(Finding(check, "fail", f"unreachable: {exc}",
                                    "start it: with fewer Sentinels than the quorum there is "
                                    "no failover"))  # fmt: skip
            continue
        if master is not None and named != master:
            findings.append(Finding(check, "warn", f"names master {_name(named)}, another "
                                    f"Sentinel names {_name(master)}", "wait for the "
                                    "failover to finish"))  # fmt: skip
            continue
        master = named
        for entry in listed:
            info = entry if isinstance(entry, dict) else dict(zip(*[iter(entry)] * 2, strict=True))
            address = (str(info["ip"]), int(info["port"]))
            if address not in replicas:
                replicas.append(address)
        findings.append(Finding(check, "ok", f"Redis {version}; master {_name(named)}, "
                                f"{len(listed)} replicas listed"))  # fmt: skip
    return findings, master, replicas


async def _cluster(url: TopologyURL, namespace: str) -> tuple[list[Finding], Address | None,
                                                              list[Address]]:  # fmt: skip
    slot = slot_of(namespace)
    for seed in url.hosts:
        try:
            view = _parse_cluster_nodes(await _ask(url.node_url(seed), "CLUSTER", "NODES"),
                                        slot, seed)  # fmt: skip
        except (*TRANSIENT, RedisError):
            continue
        if view.owner is None:
            continue
        if view.owner != view.myself:  # the owner's own table is the one that counts
            try:
                owner = view.owner
                view = _parse_cluster_nodes(await _ask(url.node_url(owner), "CLUSTER", "NODES"),
                                            slot, owner)  # fmt: skip
            except (*TRANSIENT, RedisError):
                continue
        served = f"{_name(view.owner or seed)} with {len(view.replicas)} replicas"
        note = Finding(f"cluster slot {slot}", "ok", f"namespace {namespace!r} on {served}")
        return [note], view.owner, list(view.replicas)
    return [Finding(f"cluster slot {slot}", "fail", f"no seed of {url.text} names the owner of "
                    f"slot {slot}", "check the seeds and CLUSTER INFO")], None, []  # fmt: skip


async def node_findings(redis: str, namespace: str = "default") -> list[Finding]:
    """One finding per node discoverable behind ``redis``; [] for a one-node URL."""
    url = parse_url(redis)
    if url.kind == "plain":
        return []
    if url.kind == "sentinel":
        findings, master, replicas = await _sentinels(url)
    else:
        findings, master, replicas = await _cluster(url, namespace)
    if master is not None:
        findings.append(await _data_node(url, master, "master"))
    for replica in replicas:
        findings.append(await _data_node(url, replica, "replica"))
    return findings
