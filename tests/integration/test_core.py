"""End to end on a real redis-server: agent → registrar → Redis → mirror."""

from __future__ import annotations

import anyio
import pytest

from saga_events import Added, Agent, Mirror, Registrar, Removed, ServiceNotFound
from saga_events.testing import wait_mirror_matches

pytestmark = pytest.mark.anyio


async def test_registered_instance_is_visible_in_mirror(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """A registration reaches a running mirror well under a second, and leave removes it."""
    async with Agent(redis_url, "payment", "http://10.0.0.5:8002", capabilities=["rest"]) as agent:
        assert agent.registered
        with anyio.fail_after(1):
            inst = await mirror.wait_for("payment")
        assert inst.service_url == "http://10.0.0.5:8002"
        assert inst.capabilities == ("rest",)
        assert mirror.pick("payment").service_id == agent.service_id
        await wait_mirror_matches(mirror, redis_url, expected={agent.keys.inst("payment", agent.service_id)})
    with anyio.fail_after(1):
        while mirror.instances("payment"):
            await anyio.sleep(0.005)
    with pytest.raises(ServiceNotFound):
        mirror.pick("payment")
    await wait_mirror_matches(mirror, redis_url, expected=set())
