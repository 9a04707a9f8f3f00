"""Replicas and keyspace notifications: CONFIG is not replicated, so each node needs the flags.

A replica emits keyspace notifications for the writes it replays only if
notify-keyspace-events is set on the replica itself. The registrar must set
the flags on every node that mirrors read from, and again on a promoted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
import redis.asyncio as aioredis

from saga_events.embedded import RedisServer
from saga_events.embedded_topology import client, info, wait_for
from saga_events.keys import Keys

pytestmark = pytest.mark.anyio
K = Keys()
MARKER = b"saga-test-marker"


@pytest.fixture
def pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    """A master and one linked replica."""
    with RedisServer() as master, RedisServer() as replica:
        with client(replica) as c:
            c.replicaof(master.host, master.port)
        wait_for(lambda: info(replica, "replication")["master_link_status"] == "up", 20,
                 "replica linked")  # fmt: skip
        yield master, replica


async def notified_before_marker(pubsub: aioredis.client.PubSub) -> list[bytes]:
    """Keyspace channels received before the marker. PUBLISH is replicated, so the marker
    published on the master after a write arrives on the replica after that write."""
    seen: list[bytes] = []
    with anyio.fail_after(10):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is None:
                continue
            if message["channel"] == MARKER:
                return seen
            seen.append(message["channel"])


async def test_replica_notifies_only_with_its_own_flags(
    pair: tuple[RedisServer, RedisServer],
) -> None:
    """Flags on the master only: the replica replays the write silently. Flags set on the
    replica too: the same replayed write is notified there."""
    master, replica = pair
    channel = f"__keyspace@0__:{K.rev}".encode()
    async with (
        aioredis.Redis(port=master.port) as on_master,
        aioredis.Redis(port=replica.port) as on_replica,
        on_replica.pubsub() as sub,
    ):
        await on_master.config_set("notify-keyspace-events", "K$gx")
        flags = await on_replica.config_get("notify-keyspace-events")
        assert len(flags) == 1 and not any(flags.values())  # CONFIG SET is not replicated
        await sub.psubscribe(f"__keyspace@0__:{K.prefix}*")
        await sub.subscribe(MARKER)

        await on_master.set(K.rev, 1)
        await on_master.publish(MARKER, b"")
        assert await notified_before_marker(sub) == []
        assert await on_replica.get(K.rev) == b"1"  # replayed, just not notified

        await on_replica.config_set("notify-keyspace-events", "K$gx")
        await on_master.set(K.rev, 2)
        await on_master.publish(MARKER, b"")
        assert await notified_before_marker(sub) == [channel]
