"""Agents never raise into their host (issue 8): Redis refusals on a real redis-server.

An ACL that refuses the control channel or PUBLISH, and a replica, each leave
the host's ``async with`` intact; the agent reports the problem through
``registered`` and ``last_error``, keeps what still works, and recovers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ReadOnlyError

from saga_events import (
    Agent,
    AsyncSagaServiceDiscovery,
    Mirror,
    Registrar,
    RegistryUnavailable,
    SagaServiceDiscovery,
)
from saga_events.embedded import RedisServer
from saga_events.keys import Keys
from saga_events.testing import SagaTestRegistry, eventually

pytestmark = pytest.mark.anyio
K = Keys("default")


async def make_user(redis_url: str, user: str, rules: Sequence[str]) -> str:
    """Create ``user`` (password ``pw``) with ``rules``; return its URL."""
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *rules)
    finally:
        await admin.aclose()
    return redis_url.replace("redis://", f"redis://{user}:pw@")


async def test_agent_whose_control_subscribe_is_refused_keeps_heartbeating(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """SUBSCRIBE to control refused: no exception; registered, reason given, heartbeats go on."""
    url = await make_user(
        redis_url, "nocontrol", ["resetchannels", f"&{K.events('svc')}", "+@all", "~*"]
    )
    async with Agent(url, "svc", "http://10.0.0.60:80", ttl=3.0) as agent:
        await mirror.wait_for("svc", 10)
        await eventually(lambda: agent.last_error is not None, 10, what="control reported")
        assert agent.last_error is not None
        assert agent.last_error.startswith("control: ")
        assert "NoPermissionError" in agent.last_error
        refreshed = registrar.stats.applied["refreshed"]
        await eventually(lambda: registrar.stats.applied["refreshed"] >= refreshed + 2, 15)
        assert agent.registered
    # Leaving the block still says leave.
    await mirror.wait_until(lambda m: not m.instances("svc"), timeout=10)


async def test_agent_whose_publish_is_refused_reports_it_and_recovers_when_granted(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """PUBLISH refused: not registered, the reason says so; granted later, it gets through."""
    url = await make_user(redis_url, "nopub", ["allchannels", "~*", "+@all", "-publish"])
    async with Agent(url, "muted", "http://10.0.0.61:80", first_announce_timeout=2) as agent:
        assert not agent.registered
        assert agent.last_error is not None
        assert agent.last_error.startswith("publish: Redis refused PUBLISH (NoPermissionError")
        await make_user(redis_url, "nopub", ["allchannels", "~*", "+@all"])
        await mirror.wait_for("muted", 40)  # the agent retries with backoff (1 s, 2 s, ...)
        await eventually(lambda: agent.registered, 10)
        assert agent.last_error is None


@pytest.fixture
def replica_of(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A second redis-server, REPLICAOF the test server (read-only, as replicas are)."""
    with RedisServer() as replica:
        yield replica


async def test_agent_and_client_on_a_replica_never_raise(
    redis_server: RedisServer, replica_of: RedisServer, registrar: Registrar
) -> None:
    """Pointed at a read-only replica: nothing raises; not registered, and the reason says
    why (its PUBLISH reaches no registrar: they listen on the primary)."""
    replica = aioredis.Redis.from_url(replica_of.url)
    try:
        await replica.execute_command("REPLICAOF", "127.0.0.1", str(redis_server.port))

        async def linked() -> bool:
            info = await replica.info("replication")
            return bool(info.get("master_link_status") == "up")

        await eventually(linked, 15, what="replica linked")
        with pytest.raises(ReadOnlyError):
            await replica.set("probe", "1")  # it is a real read-only replica
    finally:
        await replica.aclose()
    async with Agent(replica_of.url, "svc", "http://10.0.0.62:80", first_announce_timeout=2) as a:
        assert not a.registered
        assert a.last_error == "publish: no registrar is listening"
    async with AsyncSagaServiceDiscovery(redis_url=replica_of.url, timeout=1) as saga:
        info = await saga.register_service("svc", "http://10.0.0.62:80")
        assert info.source == "local"
        assert not saga.is_registered("svc")
        assert not await saga.refresh_registration("svc")


def test_sync_client_whose_user_may_not_subscribe_registers_and_falls_back(
    saga_registry: SagaTestRegistry,
) -> None:
    """The blocking client on a user with no SUBSCRIBE rights on control nor the keyspace
    channels: registration works (PUBLISH), discovery falls back; nothing raises."""
    url = anyio.run(
        make_user,
        saga_registry.redis_url,
        "pubonly",
        ["resetchannels", f"&{K.events('svc')}", "+@all", "~*"],
    )
    saga = SagaServiceDiscovery(
        redis_url=url, fallbacks={"other": "http://10.0.0.63:80"}, discovery_timeout=0.5
    )
    try:
        info = saga.register_service("svc", "http://10.0.0.64:80")
        assert info.source == "registry"
        assert saga.is_registered("svc")
        assert saga.refresh_registration("svc")
        assert saga.discover_service("other").source == "fallback"
        with pytest.raises(RegistryUnavailable):
            saga.discover_service("svc")  # the client's mirror cannot subscribe: no answer
    finally:
        saga.close()
