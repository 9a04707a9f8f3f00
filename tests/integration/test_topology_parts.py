"""Agent, Registrar and Mirror on a Sentinel URL today (through _redis.connect's delegation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded import RedisServer
from saga_events.embedded_topology import SentinelGroup, client

pytestmark = pytest.mark.anyio


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup(replicas=2, sentinels=3, down_after_ms=1000) as g:
        yield g


async def test_parts_follow_a_sentinel_failover(group: SentinelGroup) -> None:
    """Registrar, mirror and agents given the Sentinel URL work, and after kill -9 of the
    master a new registration reaches the mirror through the promoted replica, with the
    instance registered before the kill still there."""
    url = group.url
    async with (
        Registrar(url, rebuild_wait=0.2),
        Mirror(url) as mirror,
        Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30),
    ):
        await mirror.wait_until(lambda m: bool(m.instances("alpha")), timeout=10)
        old = group.kill_master()
        async with Agent(url, "beta", "http://10.0.0.2:80", service_id="b1", ttl=30):
            await mirror.wait_until(lambda m: bool(m.instances("beta")), timeout=60)
        assert [i.service_id for i in mirror.instances("alpha")] == ["a1"]
        assert group.wait_settled().port != old.port


async def test_mirror_reads_from_a_replica(group: SentinelGroup) -> None:
    """Mirror(url?read_from=replica) subscribes on a replica and follows registrations
    through the replica's own notifications (flags set on the replicas here: the registrar
    does not set them there yet)."""
    for replica in group.nodes[1:]:
        with client(replica) as c:
            c.config_set("notify-keyspace-events", "KEg$xe")
    url = group.url
    async with (
        Registrar(url, rebuild_wait=0.2),
        Mirror(f"{url}?read_from=replica") as mirror,
        Agent(url, "alpha", "http://10.0.0.1:80", service_id="a1", ttl=30),
    ):
        await mirror.wait_until(lambda m: bool(m.instances("alpha")), timeout=10)
        subscribed = [
            node for node in group.nodes[1:] if any(_is_subscriber(c) for c in _clients(node))
        ]
        # Registrar and agents stay on the master: a subscriber on a replica is the mirror.
        assert len(subscribed) == 1


def _clients(node: RedisServer) -> list[dict[str, Any]]:
    with client(node) as c:
        return list(c.client_list())


def _is_subscriber(entry: dict[str, Any]) -> bool:
    # Sentinels hold a pub/sub connection on every node too; they name their clients.
    return int(entry.get("psub", 0)) > 0 and not str(entry.get("name", "")).startswith("sentinel")


@pytest.mark.parametrize("scheme", ["redis+sentinel", "redis+cluster"])
async def test_an_unreachable_topology_is_named_in_the_error(scheme: str) -> None:
    """No node answers (nothing listens on the ports): the client's ConnectionError names
    the URL given (password redacted) and what failed, never redis-py's default
    localhost:6379 (the address a connection has before it is resolved)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from saga_events._redis import connect
    from saga_events.embedded import free_port

    ports = [free_port(), free_port()]
    path = "/registry" if scheme == "redis+sentinel" else ""
    url = f"{scheme}://user:secret@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}{path}"
    redis = connect(url)
    try:
        with pytest.raises(RedisConnectionError) as caught:
            await redis.ping()
    finally:
        await redis.aclose()
    message = str(caught.value)
    assert "localhost:6379" not in message and "6379" not in message, message
    assert f"127.0.0.1:{ports[0]}" in message and "secret" not in message, message
