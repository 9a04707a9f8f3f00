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
  replica is healthy the master is returned (readers keep working).
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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis.asyncio as aioredis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.crc import key_slot
from redis.exceptions import RedisError

from ._redis import TRANSIENT
from .errors import TopologyError, TopologyUnavailable
from .keys import Keys

__all__ = [
    "SCHEMES",
    "Address",
    "ReadFrom",
    "Topology",
    "TopologyURL",
    "connect",
    "is_topology_url",
    "parse_url",
    "slot_of",
]

ReadFrom = Literal["master", "replica"]
Address = tuple[str, int]

#: The schemes this module adds to redis-py's ``redis://``, ``rediss://`` and ``unix://``.
SCHEMES: Final = frozenset({"redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"})
_PLAIN: Final = frozenset({"redis", "rediss", "unix"})
_OURS: Final = frozenset({"read_from", "sentinel_username", "sentinel_password"})
_HOST_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_DEFAULT_PORT: Final = {"sentinel": 26379, "cluster": 6379}
_HOPS: Final = 4  # cluster nodes asked in turn when views disagree (after a migration)


def _redact(url: str) -> str:
    """The URL with its passwords replaced by ``***`` (errors must not leak them)."""
    url = re.sub(r"(//[^:/@?]*:)[^@/?]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&#]*", r"\1***", url)


def _scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_topology_url(url: str) -> bool:
    """True for a URL this module must handle: a new scheme, or a ``read_from`` option."""
    scheme = _scheme_of(url)
    if scheme in SCHEMES:
        return True
    query = url.split("?", 1)[1] if "?" in url else ""
    return scheme in _PLAIN and any(k == "read_from" for k, _ in parse_qsl(query))


def slot_of(namespace: str) -> int:
    """The Cluster slot of namespace's registry (every key carries the ``{ns}`` tag)."""
    return key_slot(Keys(namespace).rev.encode())


@dataclass(frozen=True, slots=True)
class TopologyURL:
    """A parsed Redis URL. ``text`` is the URL with passwords redacted, for messages."""

    kind: Literal["plain", "sentinel", "cluster"]
    text: str
    tls: bool = False
    hosts: tuple[Address, ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    master_name: str | None = None
    db: int = 0
    read_from: ReadFrom = "master"
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()
    #: kind == "plain": redis-py's URL without our options
    plain_url: str | None = field(default=None, repr=False)

    def node_url(self, address: Address) -> str:
        """A ``redis://`` URL for one data node of this topology."""
        user = quote(self.username or "", safe="")
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        if not auth and user:
            auth = f"{user}@"
        return self._url(address, auth, self.db)

    def sentinel_url(self, address: Address) -> str:
        user = quote(self.sentinel_username or "", safe="")
        pw = self.sentinel_password
        auth = f"{user}:{quote(pw, safe='')}@" if pw else (f"{user}@" if user else "")
        return self._url(address, auth, 0)

    def _url(self, address: Address, auth: str, db: int) -> str:
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        query = f"?{urlencode(self.options)}" if self.options else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{host}:{address[1]}/{db}{query}"


def parse_url(url: str) -> TopologyURL:
    """Parse any Redis URL saga-events accepts; raise TopologyError naming the part at fault."""
    if not isinstance(url, str):
        raise TopologyError(repr(url), "URL", "must be a string")
    text = _redact(url)
    scheme = _scheme_of(url)
    if scheme in _PLAIN:
        return _parse_plain(url, text, scheme)
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES | {"redis", "rediss", "unix"}))
        raise TopologyError(text, "scheme", f"{scheme or 'none'!r} is not one of {known}")
    kind: Literal["sentinel", "cluster"] = "sentinel" if scheme.endswith("sentinel") else "cluster"
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise TopologyError(text, "fragment", "a Redis URL has no #fragment")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if password == "":
            raise TopologyError(text, "password", "empty after ':' (drop the ':' or give one)")
    hosts = _parse_hosts(text, hostlist, _DEFAULT_PORT[kind])
    master_name, db = _parse_path(text, kind, path if slash else "")
    opts = _parse_query(text, kind, query)
    read_from = opts.pop("read_from", "master")
    return TopologyURL(
        kind=kind,
        text=text,
        tls=scheme.startswith("rediss"),
        hosts=hosts,
        username=username,
        password=password,
        master_name=master_name,
        db=db,
        read_from=read_from,  # type: ignore[arg-type]  # checked in _parse_query
        sentinel_username=opts.pop("sentinel_username", None),
        sentinel_password=opts.pop("sentinel_password", None),
        options=tuple(sorted(opts.items())),
    )


def _parse_plain(url: str, text: str, scheme: str) -> TopologyURL:
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    read_from = "master"
    kept = []
    for key, value in pairs:
        if key == "read_from":
            read_from = _check_read_from(text, value)
        elif key in ("sentinel_username", "sentinel_password"):
            raise TopologyError(
                text, f"query {key}", f"only for redis+sentinel://, not {scheme}://"
            )
        else:
            kept.append((key, value))
    if read_from == "replica":
        raise TopologyError(
            text,
            "query read_from",
            f"'replica' needs a topology that knows its replicas (redis+sentinel:// or "
            f"redis+cluster://); {scheme}:// names one node",
        )
    plain = base + (f"?{urlencode(kept)}" if kept else "")
    return TopologyURL(kind="plain", text=text, tls=scheme == "rediss", plain_url=plain)


def _parse_hosts(text: str, hostlist: str, default_port: int) -> tuple[Address, ...]:
    if not hostlist:
        raise TopologyError(text, "host list", "empty: give at least one host:port")
    hosts: list[Address] = []
    for item in hostlist.split(","):
        if not item:
            raise TopologyError(text, "host list", "an empty entry (two commas, or a trailing one)")
        if item.startswith("["):
            host, bracket, port_text = item[1:].partition("]")
            if not bracket or (port_text and not port_text.startswith(":")):
                raise TopologyError(text, f"host {item!r}", "an IPv6 address is [addr]:port")
            port_text = port_text[1:]
        else:
            host, _, port_text = item.partition(":")
            if not _HOST_RE.match(host or "-!"):
                raise TopologyError(text, f"host {item!r}", "not a host name or IPv4 address")
        port = default_port
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise TopologyError(text, f"port in {item!r}", "must be a number in 1..65535")
            port = int(port_text)
        if (host, port) in hosts:
            raise TopologyError(text, f"host {item!r}", "listed twice")
        hosts.append((host, port))
    return tuple(hosts)


def _parse_path(text: str, kind: str, path: str) -> tuple[str | None, int]:
    parts = [unquote(p) for p in path.split("/")] if path else []
    if parts and parts[-1] == "":
        parts.pop()  # one trailing slash is harmless
    if kind == "cluster":
        if parts not in ([], ["0"]):
            raise TopologyError(
                text, "path", "a Cluster has only db 0; put nothing after the hosts"
            )
        return None, 0
    if not parts or not parts[0]:
        raise TopologyError(text, "master name", "missing: the path is /<master-name>[/<db>]")
    if len(parts) > 2:
        raise TopologyError(text, "path", "too many segments: the path is /<master-name>[/<db>]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise TopologyError(text, "db", f"{parts[1]!r} is not a database number")
        db = int(parts[1])
    return parts[0], db


def _check_read_from(text: str, value: str) -> ReadFrom:
    if value == "master":
        return "master"
    if value == "replica":
        return "replica"
    raise TopologyError(text, "query read_from", f"{value!r} is not 'master' or 'replica'")


def _parse_query(text: str, kind: str, query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise TopologyError(text, "query", "not name=value pairs joined by '&'") from None
    opts: dict[str, str] = {}
    for key, value in pairs:
        if key in opts:
            raise TopologyError(text, f"query {key}", "given twice")
        if key == "read_from":
            _check_read_from(text, value)
        elif key.startswith("sentinel_") and kind != "sentinel":
            raise TopologyError(text, f"query {key}", "only for redis+sentinel://")
        elif key in ("db", "host", "port", "username", "password"):
            raise TopologyError(text, f"query {key}", "goes in the URL itself, not the query")
        elif key not in _OURS and key not in URL_QUERY_ARGUMENT_PARSERS:
            if not key.startswith("ssl_") and key != "client_name":
                raise TopologyError(text, f"query {key}", "unknown option")
        elif key in URL_QUERY_ARGUMENT_PARSERS:
            try:
                URL_QUERY_ARGUMENT_PARSERS[key](value)
            except (TypeError, ValueError):
                raise TopologyError(text, f"query {key}", f"{value!r} is not valid") from None
        opts[key] = value
    return opts


@dataclass(slots=True)
class _ClusterView:
    """One node's ``CLUSTER NODES``: who serves ``slot``, and its healthy replicas."""

    owner: Address | None = None
    owner_id: str = ""
    myself: Address | None = None
    replicas: list[Address] = field(default_factory=list)
    nodes: list[Address] = field(default_factory=list)


def _parse_cluster_nodes(raw: str, slot: int, asked: Address) -> _ClusterView:
    view = _ClusterView()
    lines = [line.split() for line in raw.splitlines() if line.strip()]
    links: dict[str, tuple[Address, list[str], str, str]] = {}
    for fields in lines:
        node_id, endpoint, flags = fields[0], fields[1], fields[2].split(",")
        hostport = endpoint.split("@", 1)[0]
        host, _, port = hostport.rpartition(":")
        address = (host or asked[0], int(port)) if port.isdigit() else asked
        if "myself" in flags:
            address = asked  # a node may not know its own announced address
            view.myself = address
        links[node_id] = (address, flags, fields[3], fields[7])
        if "noaddr" not in flags and "handshake" not in flags:
            view.nodes.append(address)
        if "master" in flags and "fail" not in flags and _owns(fields[8:], slot):
            view.owner, view.owner_id = address, node_id
    for address, flags, master_id, link in links.values():
        healthy = not {"fail", "fail?", "noaddr", "handshake"} & set(flags)
        if master_id == view.owner_id and healthy and link == "connected" and "slave" in flags:
            view.replicas.append(address)
    return view


def _owns(ranges: Iterable[str], slot: int) -> bool:
    for item in ranges:
        if item.startswith("["):
            continue  # a migration marker ([slot->-id] / [slot-<-id]) is not ownership
        low, _, high = item.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False


class Topology:
    """Resolve a URL to the nodes a part needs, and again after :meth:`refresh`.

    See the module docstring for the contract. Not thread-safe: one event loop.
    """

    def __init__(self, url: str | TopologyURL, **client_kwargs: Any) -> None:
        self.url = url if isinstance(url, TopologyURL) else parse_url(url)
        self._client_kwargs = client_kwargs
        self._cache: dict[tuple[str, str], Address] = {}
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
        self.generation += 1

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
        key = (namespace if self.url.kind == "cluster" else "", role)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self.url.kind == "sentinel":
            found = await (
                self._sentinel_master() if role == "master" else self._sentinel_replica()
            )
        else:
            found = await self._cluster_node(slot_of(namespace), role)
        self._cache[key] = found
        return found

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
        async with aioredis.Redis.from_url(url, **kwargs) as client:
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
            for reply in replies:
                info = (
                    reply if isinstance(reply, dict) else dict(zip(*[iter(reply)] * 2, strict=True))
                )
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
        problems: list[str] = []
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
                if view.owner == view.myself:  # the owner's own table is the one that counts
                    if role == "master":
                        return view.owner
                    return await self._pick_replica(view.replicas, view.owner)
                address = view.owner
        raise TopologyUnavailable(self.url.text, "host list", "; ".join(problems[-4:]))

    def _learn(self, nodes: Iterable[Address]) -> None:
        for node in nodes:
            if node not in self._known:
                self._known.append(node)


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
    A Cluster URL needs ``namespace`` (the slot to follow).
    """
    from ._topology_pool import open_resolving_client

    parsed = parse_url(url)
    if parsed.kind == "plain":
        assert parsed.plain_url is not None
        return aioredis.Redis.from_url(parsed.plain_url, **kwargs)
    if parsed.kind == "cluster" and namespace is None:
        raise TopologyError(parsed.text, "scheme", "redis+cluster:// needs the namespace whose "
                            "slot to follow; this caller gives none")  # fmt: skip
    return open_resolving_client(Topology(parsed, **kwargs), namespace or "default", kwargs)
