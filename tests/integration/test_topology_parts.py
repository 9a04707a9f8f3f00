"""Agent, Registrar and Mirror on a Sentinel URL today (through _redis.connect's delegation)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.embedded_topology import SentinelGroup

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
