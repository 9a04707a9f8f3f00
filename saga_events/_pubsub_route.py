"""Which pub/sub commands reach the registry's node, and a PUBLISH that follows it (internal;
re-exported by :mod:`saga_events.topology`).

One job: route the project's pub/sub so that a receiver count means what the
agent takes it to mean ("a registrar received it"), on every topology.

Contract:

* Events (agent → registrar) are classic ``PUBLISH`` on the namespace's slot
  owner (a Cluster) or the master, and the registrar ``PSUBSCRIBE``\\s there:
  classic pub/sub counts only the subscribers of the node the command ran on,
  so both ends must be on the same node. Sharded pub/sub does not replace it
  for events: its count is also node-local (Redis 7.0: ``SPUBLISH`` returns the
  subscribers of the node it ran on, not of the shard), and it has no pattern
  subscription, which the per-service event channels (one ACL grant per
  service) need.
* :func:`publish` is that ``PUBLISH``; a count of 0 on a topology URL refreshes
  the Topology, so the next attempt resolves the node again (after a failover
  or a migration the old node may still accept PUBLISH, and count nobody).
* :func:`pubsub_commands` / :func:`feed_commands`: the commands for a
  namespace's single, exact channels such as the change feed ``saga:{ns}:feed``
  (same ``{ns}`` slot as the keys): ``("SPUBLISH", "SSUBSCRIBE")`` on a Cluster
  whose nodes run Redis >= 7 (the message stays in the owner's shard: the owner
  and its replicas receive it, no other node), else ``("PUBLISH", "SUBSCRIBE")``
  (on a Cluster every node receives it over the bus). A Lua script calls the
  first with the channel in ``KEYS`` (so a Cluster checks its slot) and the
  command name in ``ARGV``: ``redis.call(ARGV[1], KEYS[n], payload)``.
  Verified on Debian's redis-server 7.0.15: ``SPUBLISH`` inside ``EVAL`` on
  the owner reaches ``SSUBSCRIBE``\\s on the owner and on its replica (the
  count is the owner's own); a channel of another slot is dropped silently
  (count 0, no error), hence the channel in ``KEYS``. When the slot migrates
  away, Redis 7 sends every ``SSUBSCRIBE``\r of it (owner and replicas) a
  ``sunsubscribe`` reply with count 0: a feed subscriber treats that as a lost
  connection and subscribes again on the new owner. A subscriber also needs
  ``b"ssubscribe"`` among its confirmations and gets ``[b"smessage", channel,
  data]`` messages.
"""

from __future__ import annotations

from typing import Literal

import redis.asyncio as aioredis

from ._topology_pool import topology_of

PublishCommand = Literal["PUBLISH", "SPUBLISH"]
SubscribeCommand = Literal["SUBSCRIBE", "SSUBSCRIBE"]


async def publish(client: aioredis.Redis, channel: str, message: bytes) -> int:
    """PUBLISH and return the receiver count; a count of 0 on a topology URL refreshes
    the Topology (the next call lands on the node that serves the registry now)."""
    receivers = int(await client.publish(channel, message))
    if receivers == 0:
        topology = topology_of(client)
        if topology is not None:
            topology.refresh()
    return receivers


def pubsub_commands(kind: str, redis_version: str) -> tuple[PublishCommand, SubscribeCommand]:
    """The (publish, subscribe) pair for an exact ``{ns}`` channel: sharded on a Cluster
    (``kind == "cluster"``) of Redis >= 7, classic elsewhere."""
    major = redis_version.split(".", 1)[0]
    if kind == "cluster" and major.isdigit() and int(major) >= 7:
        return "SPUBLISH", "SSUBSCRIBE"
    return "PUBLISH", "SUBSCRIBE"


async def feed_commands(client: aioredis.Redis) -> tuple[PublishCommand, SubscribeCommand]:
    """:func:`pubsub_commands` for the node ``client`` reaches (one ``INFO server`` on a
    Cluster; no I/O elsewhere)."""
    topology = topology_of(client)
    if topology is None or topology.url.kind != "cluster":
        return "PUBLISH", "SUBSCRIBE"
    server = await client.info("server")
    return pubsub_commands("cluster", str(server.get("redis_version", "0")))
