"""A redis-py client whose connections find their node through a Topology (internal).

Each new connection asks :meth:`Topology.address` where to go (cached there
until a refresh); a pooled connection made before the last refresh reconnects
when it is next checked out. A reply that says the node is no longer the right one
(READONLY on a master, MOVED, ASK, TRYAGAIN, CLUSTERDOWN) or a broken
connection refreshes the Topology, drops the connection and surfaces as a
ConnectionError: the caller's reconnect loop then lands on the new node.

A subscribed connection sends no commands that could be answered MOVED or
READONLY, so :func:`check_node` (called by a subscription's health check)
makes sure its node is still the right one, cheaply:

- every ``PROBE_INTERVAL`` s (jittered), one command on a connection the client
  already holds to the same node (its pool's command connection: no new
  connection, no extra round trip to a third node): ``ROLE`` on a Sentinel
  master-role subscription (a demoted master that kept its subscribers is left
  within that bound), ``EXISTS`` of a key in the registry's slot on a Cluster
  (answered MOVED by a node that no longer serves the slot, which refreshes
  the Topology);
- at once when the Topology was refreshed since the connection was made (a
  MOVED or a broken connection elsewhere in the process, an unconfirmed
  PUBLISH): one fresh ``CLUSTER NODES``;
- every ``VERIFY_INTERVAL`` s a fresh ``CLUSTER NODES`` on a short-lived
  connection, only for a Cluster subscription without a namespace (no probe
  key).

A node that no longer serves the target (a primary demoted after a failover,
a slot migrated away) ends the connection: the session subscribes again on
the right node and resyncs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, parse_url
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ._redis import TRANSIENT

if TYPE_CHECKING:
    from .topology import Topology

_MOVED = (ReadOnlyError, MovedError, AskError, TryAgainError, ClusterDownError)

#: Seconds (jittered by +-20 %) between two probes of a subscription's node on a command
#: connection the client already has (ROLE on Sentinel, EXISTS on a Cluster).
PROBE_INTERVAL: Final = 5.0
#: Seconds between two fresh CLUSTER NODES for a Cluster subscription that has no probe
#: key (a client made without a namespace).
VERIFY_INTERVAL: Final = 30.0


@dataclass(slots=True)
class Target:
    """What a pool's connections follow: on a Cluster, a slot (shared by the pool)."""

    slot: int | None
    follow_moved: bool  # no namespace given: the slot of the last MOVED wins
    #: a key in ``slot`` (Cluster, a namespace given): what a probe asks EXISTS of
    probe_key: str | None = None
    #: the client's pool: a probe borrows a command connection from it
    pool: ConnectionPool | None = None


def _jittered(interval: float) -> float:
    return interval * random.uniform(0.8, 1.2)


class _Resolving:
    """Mixin over redis-py's Connection: resolve on connect, re-resolve after a move."""

    host: str
    port: int

    def __init__(self, *, saga_topology: Topology, saga_target: Target, **kwargs: Any) -> None:
        self._topology = saga_topology
        self._target = saga_target
        self._role: Any = saga_topology.url.read_from
        self._generation = -1
        self._resolved = False
        self._confirmed = -1
        self._verified = time.monotonic()
        self._next_probe = self._verified + _jittered(PROBE_INTERVAL)
        super().__init__(**kwargs)

    async def connect(self) -> None:
        # The pool calls this on every checkout: a connection made before the last
        # refresh may sit on a demoted master (graceful failover), so it goes again.
        if self.is_connected and self._generation != self._topology.generation:  # type: ignore[attr-defined]
            await self.disconnect()  # type: ignore[attr-defined]
        await super().connect()  # type: ignore[misc]

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        # A connection held outside the pool (the registrar's apply pipe) is never
        # checked out again: check it here. Idle since before a refresh, or closed by
        # its node meanwhile (killed, or demoted), it resolves and connects again
        # instead of sending into a dead socket: else the first batch after a failover
        # is lost. A subscription is left alone: it cannot move silently (what was
        # published meanwhile would be missed); its session checks its node instead.
        if self.is_connected and not getattr(self, "_connect_callbacks", None):  # type: ignore[attr-defined]
            if self._closed_by_peer():
                self._topology.refresh()
                await self.disconnect()  # type: ignore[attr-defined]
            elif self._generation != self._topology.generation:
                await self.disconnect()  # type: ignore[attr-defined]
        await super().send_packed_command(command, check_health)  # type: ignore[misc]

    def _closed_by_peer(self) -> bool:
        reader = getattr(self, "_reader", None)
        writer = getattr(self, "_writer", None)
        if reader is not None and reader.at_eof():
            return True
        return writer is not None and writer.transport.is_closing()

    async def confirm_role(self) -> None:
        """Sentinel, master role: ask the node this connection is on for its ROLE and
        raise a ConnectionError (after a refresh) when it is no longer the master. A
        subscription calls it after connecting and after each refresh of the topology:
        Redis closes a demoted master's connections in the versions tested, but
        PUBLISH counts only the master's own subscribers, so one left on a replica
        would listen to nothing for good."""
        topology = self._topology
        self._confirmed = topology.generation
        if topology.url.kind != "sentinel" or self._role != "master":
            return
        try:
            role = await topology._role((self.host, self.port))
        except TRANSIENT:
            topology.refresh()
            raise
        if not role or role[0] != "master":
            topology.refresh()
            await self.disconnect()  # type: ignore[attr-defined]
            raise RedisConnectionError(
                f"{self.host}:{self.port} is a {role[0] if role else '?'} now, not the master; "
                "resolving again"
            )

    def needs_confirmation(self) -> bool:
        """True when the topology was refreshed since :meth:`confirm_role` last ran."""
        return self._confirmed != self._topology.generation

    async def _connect(self) -> None:
        topology = self._topology
        self._generation = topology.generation
        slot = self._target.slot
        self._resolved = False
        if slot is None:
            self.host, self.port = await topology.address(role=self._role)
        else:
            self.host, self.port = await topology.slot_address(slot, role=self._role)
        self._resolved = True
        try:
            await super()._connect()  # type: ignore[misc]
        except TRANSIENT:
            topology.refresh()
            raise

    def _host_error(self) -> str:
        # redis-py names host:port in a connection error; before resolution succeeded
        # those are its defaults (localhost:6379), not where the part was going.
        if self._resolved:
            return f"{self.host}:{self.port}"
        return f"the node of {self._topology.url.text}"

    async def check_node(self) -> None:
        """Raise ConnectionError (and disconnect) if the node no longer serves the target
        (Cluster) or is no longer the master (Sentinel, master role); see the module
        docstring for when it asks and what."""
        topology, slot = self._topology, self._target.slot
        if not self.is_connected:  # type: ignore[attr-defined]
            return
        kind = topology.url.kind
        if kind == "sentinel":
            if self._role == "master" and await self._probe_due():
                await self._probe_role()
            return
        if kind != "cluster" or slot is None:
            return
        if self._generation == topology.generation:
            if self._target.probe_key is not None:
                if not await self._probe_due() or await self._probe_slot():
                    return
            else:
                now = time.monotonic()
                if now - self._verified < VERIFY_INTERVAL:
                    return
                self._verified = now
                if await topology.verify(slot):
                    return
        self._generation = topology.generation
        if await topology.serves(slot, (self.host, self.port), self._role):
            return
        await self.disconnect()  # type: ignore[attr-defined]
        raise RedisConnectionError(
            f"{self.host}:{self.port} no longer serves the registry's slot {slot}; "
            "subscribing again on its owner"
        )

    async def _probe_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_probe or self._target.pool is None:
            return False
        self._next_probe = now + _jittered(PROBE_INTERVAL)
        return True

    async def _probe(self, *command: str) -> Any:
        """``command`` on a command connection of this client's pool that is on this
        connection's node; None when the pool's connection is elsewhere now (the Topology
        moved on: the caller's check then resolves)."""
        pool = self._target.pool
        assert pool is not None
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            if not conn.is_connected:
                await conn.connect()
            if (getattr(conn, "host", None), getattr(conn, "port", None)) != (self.host, self.port):
                return None
            await conn.send_command(*command)
            return await conn.read_response()
        finally:
            await pool.release(conn)

    async def _probe_slot(self) -> bool:
        """Cluster: True when this node still answers for the slot (EXISTS of a key in
        it, without MOVED); a MOVED or ASK refreshes the Topology (read_response)."""
        assert self._target.probe_key is not None
        try:
            return await self._probe("EXISTS", self._target.probe_key) is not None
        except RedisConnectionError:
            return False  # MOVED, ASK...: the caller asks the refreshed Topology

    async def _probe_role(self) -> None:
        """Sentinel: raise ConnectionError (after a refresh) when this node no longer
        answers ROLE master."""
        role = await self._probe("ROLE")
        kind = role[0] if role else None
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "master":
            return
        self._topology.refresh()
        await self.disconnect()  # type: ignore[attr-defined]
        raise RedisConnectionError(
            f"{self.host}:{self.port} is a {kind or 'node the client left'} now, not the "
            "master; resolving again"
        )

    async def on_connect(self) -> None:  # redis-py 5 and 6 call this on connect
        await super().on_connect()  # type: ignore[misc]
        if not hasattr(super(), "on_connect_check_health"):
            await self._readonly()

    async def on_connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        # redis-py 7+ calls this, not on_connect(), from connect(): a replica read
        # without READONLY is answered MOVED on a Cluster.
        await super().on_connect_check_health(*args, **kwargs)  # type: ignore[misc]
        await self._readonly()

    async def _readonly(self) -> None:
        """Cluster replicas serve reads only after READONLY (per connection)."""
        if self._topology.url.kind == "cluster" and self._role == "replica":
            await self.send_command("READONLY")  # type: ignore[attr-defined]
            await super().read_response()  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except _MOVED as exc:
            if isinstance(exc, MovedError) and self._target.follow_moved:
                self._target.slot = exc.slot_id
            self._topology.refresh()
            await self.disconnect()  # type: ignore[attr-defined]
            raise RedisConnectionError(
                f"the registry's node changed ({exc}); resolving again"
            ) from exc
        except TRANSIENT:
            self._topology.refresh()
            raise


async def check_slot(client: aioredis.Redis) -> None:
    """Raise ConnectionError unless what ``client`` just read of its registry slot is
    whole (:meth:`Topology.settled`). Only a Cluster client that reads from replicas asks
    (one ``CLUSTER NODES`` to the owner): on the owner itself a moved key answers ASK or
    TRYAGAIN, never nil. For a snapshot, and before a removal no change-feed message
    explains (MIGRATE deletes each key on the source, and its replica replays the DEL)."""
    topology = topology_of(client)
    if topology is None or topology.url.kind != "cluster" or topology.url.read_from != "replica":
        return
    target = client.connection_pool.connection_kwargs.get("saga_target")
    slot = target.slot if isinstance(target, Target) else None
    if slot is None:
        return
    try:
        settled = await topology.settled(slot, "replica")
    except TRANSIENT:
        topology.refresh()
        raise
    if not settled:
        raise RedisConnectionError(
            f"the registry's slot {slot} is migrating or moved; keeping the last view "
            "and reading again from its owner"
        )


async def check_node(connection: object) -> None:
    """:meth:`_Resolving.check_node` for a connection that resolves; nothing for others."""
    if isinstance(connection, _Resolving):
        await connection.check_node()


class ResolvingConnection(_Resolving, Connection):
    pass


class ResolvingSSLConnection(_Resolving, SSLConnection):
    pass


def open_resolving_client(
    topology: Topology, namespace: str | None, kwargs: dict[str, Any]
) -> aioredis.Redis:
    """A client (owning its pool) for ``namespace``'s node in ``topology``."""
    from .keys import Keys
    from .topology import slot_of

    target = Target(None, follow_moved=False)
    if topology.url.kind == "cluster":
        target = Target(slot_of(namespace or "default"), follow_moved=namespace is None)
        if namespace is not None:
            target.probe_key = Keys(namespace).rev
    url = topology.url
    node: dict[str, Any] = dict(parse_url(url.node_url(url.hosts[0])))
    for key in ("host", "port", "connection_class"):
        node.pop(key, None)
    node.update(kwargs)
    pool = ConnectionPool(
        connection_class=ResolvingSSLConnection if url.tls else ResolvingConnection,
        saga_topology=topology,
        saga_target=target,
        **node,
    )
    target.pool = pool
    return aioredis.Redis.from_pool(pool)


def topology_of(client: aioredis.Redis) -> Topology | None:
    """The Topology a client from :func:`open_resolving_client` follows (None otherwise)."""
    found = client.connection_pool.connection_kwargs.get("saga_topology")
    from .topology import Topology

    return found if isinstance(found, Topology) else None
