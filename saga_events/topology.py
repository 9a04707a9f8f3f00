"""Where the registry lives: Redis URLs for one node, Sentinel and Cluster, resolved to nodes.

One job: turn a URL into the address of the node a part must talk to, and
find it again after a fault. Nothing here subscribes, retries or sleeps; the
connection layer does, and calls :meth:`Topology.refresh` after an error.

URLs (``rediss`` forms use TLS for every node, Sentinels included)::

    redis://[user:pw@]host:port[/db]                       one node (redis-py's URL)
    redis+sentinel://[user:pw@]h:p[,h:p...]/<master>[/<db>][?sentinel_password=...]
    redis+cluster://[user:pw@]h:p[,h:p...]                 any nodes as seeds, db 0

``user:pw`` authenticate to the data nodes; the Sentinels' own credentials are
the ``sentinel_username`` / ``sentinel_password`` query options. ``read_from``
(``master``, the default, or ``replica``) picks where a reader goes; it is
refused on a one-node URL, which has no replica. Other query options are
redis-py's (``socket_timeout``, ``ssl_ca_certs``...) and apply to every node.

Contract of :class:`Topology`:

- ``master()`` is a node that answered ROLE = master when it was resolved
  (Sentinel: the address the Sentinels give, checked on the node itself).
- ``registry_node(ns)`` is the node that serves the slot of the ``{ns}`` hash
  tag (Cluster: the primary whose own slot table says so; else the master);
  keyspace notifications and classic pub/sub subscriptions belong there.
- ``replica()`` / ``registry_node(ns, role="replica")`` is a replica linked to
  that master or owner, chosen at random so that readers spread; when no
  replica is healthy the master is returned (readers keep working). On a
  Cluster, while the owner migrates the slot (MIGRATING), the replica role is
  :class:`TopologyUnavailable`: a replica knows nothing of the migration and
  answers nil for moved keys; :meth:`Topology.settled` tells a reader whether
  what it read from a replica was whole.
- ``replica_addresses()`` (Sentinel) lists every replica the Sentinels see up,
  for settings each node needs (CONFIG is not replicated); ``node_client()``
  is a new client on one of them that the caller closes.
- Answers are cached until :meth:`Topology.refresh` (no I/O: the next call
  asks the topology again; ``generation`` counts refreshes). A part calls it
  after a connection error, READONLY, MOVED, ASK, TRYAGAIN or CLUSTERDOWN.
  During a Sentinel failover or a slot migration the answer may be
  :class:`TopologyUnavailable` for a while: it is a ConnectionError, to be
  retried with backoff.
- Returned clients belong to the Topology (one per node, reused); close the
  Topology, never the clients.

:func:`connect` builds a client whose connections resolve through a Topology
each time they (re)connect and turn READONLY / MOVED / ASK into a
ConnectionError, so a part's existing reconnect loop follows a failover.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError
from redis.retry import Retry

from ._cluster_nodes import _ClusterView, _parse_cluster_nodes
from ._pubsub_route import (
    PublishCommand,
    SubscribeCommand,
    feed_commands,
    publish,
    pubsub_commands,
)
from ._redis import TRANSIENT, closing
from ._topology_url import (
    SCHEMES,
    Address,
    ReadFrom,
    TopologyURL,
    is_topology_url,
    parse_url,
)
from .errors import TopologyError, TopologyUnavailable
from .keys import Keys

__all__ = [
    "SCHEMES",
    "Address",
    "PublishCommand",
    "ReadFrom",
    "SubscribeCommand",
    "Topology",
    "TopologyURL",
    "connect",
    "feed_commands",
    "is_topology_url",
    "parse_url",
    "publish",
    "pubsub_commands",
    "slot_of",
]


_HOPS: Final = 4  # cluster nodes asked in turn when views disagree (after a migration)


def slot_of(namespace: str) -> int:
    """The Cluster slot of namespace's registry (every key carries the ``{ns}`` tag)."""
    return key_slot(Keys(namespace).rev.encode())


class Topology:
    """Resolve a URL to the nodes a part needs, and again after :meth:`refresh`.

    See the module docstring for the contract. ``client_kwargs`` go to every client it
    makes (redis-py's; by default they fail fast, without retries). Not thread-safe: one
    event loop.
    """

    def __init__(self, url: str | TopologyURL, **client_kwargs: Any) -> None:
        self.url = url if isinstance(url, TopologyURL) else parse_url(url)
        # Fail fast, as _redis.connect's clients do: the caller's session retries.
        self._client_kwargs: dict[str, Any] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry": Retry(NoBackoff(), 0),
            **client_kwargs,
        }
        self._cache: dict[tuple[str, str], Address] = {}
        self._views: dict[int, _ClusterView] = {}  # Cluster: the owner's view of each slot
        self._clients: dict[tuple[Address, bool], aioredis.Redis] = {}
        self._known: list[Address] = list(self.url.hosts)  # seeds, then nodes seen since
        #: Incremented by every refresh(); a connection made before it reconnects.
        self.generation = 0

    @property
    def kind(self) -> str:
        return self.url.kind

    def refresh(self) -> None:
        """Forget every resolved address: the next call asks Sentinels or Cluster nodes again."""
        self._cache.clear()
        self._views.clear()
        self.generation += 1

    async def serves(self, slot: int, address: Address, role: ReadFrom = "master") -> bool:
        """Cluster: whether ``address`` is still the right node for ``slot`` (``role``
        master: its owner; replica: the owner or one of its healthy replicas), by the
        cached view (resolved if there is none)."""
        view = self._views.get(slot)
        if view is None:
            await self.slot_address(slot, role="master")
            view = self._views.get(slot)
        if view is None or view.owner is None:
            return False
        return address == view.owner or (role == "replica" and address in view.replicas)

    async def verify(self, slot: int) -> bool:
        """Cluster: ask the slot's owner again, ignoring the cache; if the owner changed
        (a failover, a migration), :meth:`refresh` and return False."""
        cached = self._views.get(slot)
        fresh = await self._cluster_view(slot)
        if cached is not None and cached.owner == fresh.owner:
            return True
        if cached is not None:
            self.refresh()
        self._views[slot] = fresh
        return cached is None

    async def settled(self, slot: int, role: ReadFrom = "replica") -> bool:
        """Cluster: whether what was just read for ``slot`` through the node this Topology
        resolved (``role``) is whole: the owner, asked now (one ``CLUSTER NODES``), still
        owns it, is not migrating it, and the node is it or one of its replicas. A replica
        of a migrating owner knows nothing of the migration: a key MIGRATE moved answers
        nil there (ASK on the owner). False also when the Topology was refreshed since
        that node was resolved (what was read may come from an older one); False
        :meth:`refresh`-es."""
        address = self._cache.get((f"slot:{slot}", role))
        cached = self._views.get(slot)
        if address is None or cached is None:
            return False  # refreshed since the read: cannot vouch for it
        fresh = await self._cluster_view(slot)
        whole = (
            not fresh.moving
            and fresh.owner == cached.owner
            and (address == fresh.owner or address in fresh.replicas)
        )
        if not whole:
            self.refresh()
        return whole

    async def master(self) -> aioredis.Redis:
        """A client on the current master (one-node URL: that node). Not for a Cluster."""
        if self.url.kind == "cluster":
            raise TopologyError(self.url.text, "scheme", "a Cluster has no one master: use "
                                "registry_node(namespace)")  # fmt: skip
        if self.url.kind == "plain":
            return self._client(("", 0), readonly=False)
        return self._client(await self.address(), readonly=False)

    async def replica(self) -> aioredis.Redis:
        """A client on a healthy replica of the master (the master if none is healthy)."""
        if self.url.kind == "plain":
            raise TopologyError(self.url.text, "scheme", "a one-node URL knows no replica: use "
                                "redis+sentinel:// or redis+cluster://")  # fmt: skip
        if self.url.kind == "cluster":
            raise TopologyError(self.url.text, "scheme", "a Cluster has no one master: use "
                                "registry_node(namespace, role='replica')")  # fmt: skip
        return self._client(await self.address(role="replica"), readonly=False)

    async def replica_addresses(self, slot: int | None = None) -> list[Address]:
        """Sentinel: every replica the Sentinels list as up (linked or still syncing);
        Cluster (given the registry's ``slot``): the healthy replicas of its owner. For
        what must be set on each node (CONFIG is not replicated); empty for other
        topologies or when no node answers. Not cached."""
        if self.url.kind == "cluster" and slot is not None:
            try:
                return list((await self._cluster_view(slot)).replicas)
            except TopologyUnavailable:
                return []
        if self.url.kind != "sentinel":
            return []
        for sentinel in self.url.hosts:
            try:
                replies = await self._ask(sentinel, "SENTINEL", "REPLICAS", self.url.master_name,
                                          sentinel=True)  # fmt: skip
            except (*TRANSIENT, RedisError):
                continue
            found: list[Address] = []
            for info in map(_as_dict, replies):
                flags = set(str(info.get("flags", "")).split(","))
                if not flags & {"s_down", "o_down", "disconnected"}:
                    found.append((str(info["ip"]), int(info["port"])))
            return found
        return []

    def node_client(self, address: Address) -> aioredis.Redis:
        """A new client on one node of this topology (its credentials and options); the
        caller closes it (``async with``)."""
        return self._new_client(address, readonly=False)

    async def registry_node(
        self, namespace: str = "default", *, role: ReadFrom = "master"
    ) -> aioredis.Redis:
        """A client on the node that serves namespace's registry (``role``: it or a replica)."""
        if self.url.kind != "cluster":
            return await (self.master() if role == "master" else self.replica())
        address = await self.address(namespace, role=role)
        readonly = self.url.kind == "cluster" and role == "replica"
        return self._client(address, readonly=readonly)

    async def address(self, namespace: str = "default", *, role: ReadFrom = "master") -> Address:
        """The (host, port) behind :meth:`registry_node`; cached until :meth:`refresh`."""
        if self.url.kind == "plain":
            raise TopologyError(self.url.text, "scheme", "a one-node URL needs no resolution")
        key = ("", role)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self.url.kind == "cluster":
            return await self.slot_address(slot_of(namespace), role=role)
        if self.url.kind == "sentinel":
            found = await (
                self._sentinel_master() if role == "master" else self._sentinel_replica()
            )
        self._cache[key] = found
        return found

    async def slot_address(self, slot: int, *, role: ReadFrom = "master") -> Address:
        """Cluster: the (host, port) of the node serving ``slot`` (or of a replica of it)."""
        if self.url.kind != "cluster":
            raise TopologyError(self.url.text, "scheme", "only a Cluster has slots")
        key = (f"slot:{slot}", role)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = await self._cluster_node(slot, role)
        return cached

    async def aclose(self) -> None:
        """Close every client this Topology returned."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> Topology:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    def _client(self, address: Address, *, readonly: bool) -> aioredis.Redis:
        if self.url.kind == "plain":
            address = ("", 0)
        client = self._clients.get((address, readonly))
        if client is None:
            client = self._new_client(address, readonly=readonly)
            self._clients[(address, readonly)] = client
        return client

    def _new_client(self, address: Address, *, readonly: bool) -> aioredis.Redis:
        if self.url.kind == "plain":
            assert self.url.plain_url is not None
            return aioredis.Redis.from_url(self.url.plain_url, **self._client_kwargs)
        kwargs = dict(self._client_kwargs)
        if readonly:
            kwargs["redis_connect_func"] = _readonly_on_connect
        return aioredis.Redis.from_url(self.url.node_url(address), **kwargs)

    async def _ask(self, address: Address, *command: Any, sentinel: bool = False) -> Any:
        """One command on a short-lived connection (resolution holds nothing open)."""
        url = self.url.sentinel_url(address) if sentinel else self.url.node_url(address)
        kwargs = {k: v for k, v in self._client_kwargs.items() if k != "client_name"}
        kwargs.setdefault("socket_connect_timeout", 1.0)
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs["decode_responses"] = True
        async with closing(aioredis.Redis.from_url(url, **kwargs)) as client:
            return await client.execute_command(*command)  # type: ignore[no-untyped-call]

    async def _role(self, address: Address) -> list[Any]:
        reply = await self._ask(address, "ROLE")
        return list(reply)

    async def _sentinel_master(self) -> Address:
        name = self.url.master_name
        problems: list[str] = []
        for sentinel in self.url.hosts:
            where = f"{sentinel[0]}:{sentinel[1]}"
            try:
                reply = await self._ask(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", name,
                                        sentinel=True)  # fmt: skip
            except (*TRANSIENT, RedisError) as exc:
                problems.append(f"Sentinel {where}: {exc}")
                continue
            if not reply:
                problems.append(f"Sentinel {where} does not monitor {name!r}")
                continue
            address = (str(reply[0]), int(reply[1]))
            try:
                role = await self._role(address)
            except (*TRANSIENT, RedisError) as exc:
                problems.append(f"master {address[0]}:{address[1]} (from {where}): {exc}")
                continue
            if role and role[0] == "master":
                return address
            problems.append(f"{address[0]}:{address[1]} (from {where}) is a {role[0]}")
        unknown = all("does not monitor" in p for p in problems)
        part = f"master name {name!r}" if unknown else "sentinels"
        raise TopologyUnavailable(self.url.text, part, "; ".join(problems) or "none listed")

    async def _sentinel_replica(self) -> Address:
        master = await self._sentinel_master()
        candidates: list[Address] = []
        for sentinel in self.url.hosts:
            try:
                replies = await self._ask(sentinel, "SENTINEL", "REPLICAS", self.url.master_name,
                                          sentinel=True)  # fmt: skip
            except (*TRANSIENT, RedisError):
                continue
            for info in map(_as_dict, replies):
                flags = set(str(info.get("flags", "")).split(","))
                if flags & {"s_down", "o_down", "disconnected"}:
                    continue
                if info.get("master-link-status") == "ok":
                    candidates.append((str(info["ip"]), int(info["port"])))
            break
        return await self._pick_replica(candidates, master)

    async def _pick_replica(self, candidates: list[Address], master: Address) -> Address:
        random.shuffle(candidates)
        for address in candidates:
            try:
                role = await self._role(address)
            except (*TRANSIENT, RedisError):
                continue
            if role[0] == "slave" and role[3] == "connected":
                return address
        return master  # no healthy replica: readers keep working on the master

    async def _cluster_node(self, slot: int, role: ReadFrom) -> Address:
        view = await self._cluster_view(slot)
        self._views[slot] = view
        assert view.owner is not None
        if role == "master":
            return view.owner
        if view.moving:
            # The owner's replicas know nothing of the migration: a moved key reads nil
            # there. Readers wait (retrying) rather than list half a registry.
            host, port = view.owner
            why = f"slot {slot} is migrating from {host}:{port}: its replicas miss moved keys"
            raise TopologyUnavailable(self.url.text, "host list", why)
        return await self._pick_replica(list(view.replicas), view.owner)

    async def _cluster_view(self, slot: int) -> _ClusterView:
        """The slot owner's own CLUSTER NODES (asked of the seeds and nodes seen, in turn).

        A node's claim to own the slot counts once another node names it too: a primary
        restarted after its replica was promoted claims its old slots from its
        nodes.conf until the bus tells it otherwise. An unconfirmed claim is used only
        when no reachable node names another owner (a one-node Cluster)."""
        problems: list[str] = []
        named: set[Address] = set()  # owners named by a node other than themselves
        claims: dict[Address, _ClusterView] = {}
        for seed in list(self._known):
            address: Address | None = seed
            for _ in range(_HOPS):
                assert address is not None
                try:
                    view = _parse_cluster_nodes(
                        await self._ask(address, "CLUSTER", "NODES"), slot, address
                    )
                except (*TRANSIENT, RedisError) as exc:
                    problems.append(f"node {address[0]}:{address[1]}: {exc}")
                    break
                self._learn(view.nodes)
                if view.owner is None:
                    problems.append(f"node {address[0]}:{address[1]} knows no owner of slot {slot}")
                    break
                if view.owner != view.myself:
                    named.add(view.owner)
                    if view.owner in claims:
                        return claims[view.owner]
                    address = view.owner
                    continue
                # The owner's own table is the one that counts, once another node agrees.
                if view.owner in named:
                    return view
                claims[view.owner] = view
                problems.append(f"node {address[0]}:{address[1]} claims slot {slot} alone")
                break
        unopposed = [view for owner, view in claims.items() if not named - {owner}]
        if unopposed:
            return unopposed[0]
        raise TopologyUnavailable(self.url.text, "host list", "; ".join(problems[-4:]))

    def _learn(self, nodes: Iterable[Address]) -> None:
        for node in nodes:
            if node not in self._known:
                self._known.append(node)


def _as_dict(reply: Any) -> dict[str, Any]:
    """One entry of SENTINEL REPLICAS (a dict in RESP3, a flat list in RESP2)."""
    return reply if isinstance(reply, dict) else dict(zip(*[iter(reply)] * 2, strict=True))


async def _readonly_on_connect(connection: Any) -> None:
    """Cluster replicas serve reads only after READONLY (per connection)."""
    await connection.on_connect()
    await connection.send_command("READONLY")
    await connection.read_response()


def connect(url: str, *, namespace: str | None = None, **kwargs: Any) -> aioredis.Redis:
    """A client for any accepted URL whose connections follow the topology.

    One-node URLs get redis-py's client. Sentinel and Cluster URLs get a client
    whose every new connection resolves through a :class:`Topology` (the node
    for ``namespace``; ``read_from`` picks master or replica) and whose
    READONLY, MOVED, ASK, TRYAGAIN and CLUSTERDOWN replies become a
    ConnectionError after a :meth:`Topology.refresh`: a reconnect loop that
    retries connection errors follows a failover or a migration by itself.
    On a Cluster, ``namespace`` names the slot to follow; without it the client
    starts at the ``default`` namespace's slot and moves to the slot of the
    last MOVED it received, so a client used for one namespace lands on its
    owner after one retry (a client used for several would go back and forth:
    give the namespace).
    """
    from ._topology_pool import open_resolving_client

    parsed = parse_url(url)
    if parsed.kind == "plain":
        assert parsed.plain_url is not None
        return aioredis.Redis.from_url(parsed.plain_url, **kwargs)
    return open_resolving_client(Topology(parsed, **kwargs), namespace, kwargs)
