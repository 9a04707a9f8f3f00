"""Refusals Redis answers to PUBLISH (READONLY, MOVED, NOPERM, anything) never raise (issue 8).

The real-server cases (ACL, replica) are in tests/integration/test_agent_refusals.py;
here a refusal the test server cannot produce (a cluster's MOVED) is injected.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import NoPermissionError, ReadOnlyError, RedisError, ResponseError

from saga_events import Agent
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio

_NO_REDIS = "redis://127.0.0.1:1/0"  # nothing listens: TIME and SUBSCRIBE fail as an outage


@pytest.mark.parametrize(
    "refusal",
    [
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("MOVED 3999 127.0.0.1:6381"),
        NoPermissionError("this user has no permissions to access the channel"),
        RedisError("something else"),
    ],
    ids=["readonly", "moved", "noperm", "other"],
)
async def test_a_refused_publish_is_reported_and_retried_not_raised(refusal: RedisError) -> None:
    agent = Agent(_NO_REDIS, "svc", "http://a:1", first_announce_timeout=1)
    calls: list[bytes] = []

    async def publish(channel: str, data: bytes) -> int:
        calls.append(data)
        if len(calls) == 1:
            raise refusal
        return 1  # then a registrar hears it

    agent._redis.publish = publish  # type: ignore[method-assign]
    async with agent:
        assert not agent.registered
        assert agent.last_error is not None
        assert agent.last_error.startswith("publish: Redis refused PUBLISH")
        assert type(refusal).__name__ in agent.last_error
        assert await agent.announce()  # what works again is reported at once
        assert agent.registered
        assert agent.last_error is None
    assert len(calls) >= 3  # register, announce, leave


async def test_an_unexpected_error_in_publish_does_not_end_the_host() -> None:
    """A bug (not a Redis error) in the heartbeat path is logged and retried."""
    agent = Agent(_NO_REDIS, "svc", "http://a:1", ttl=1.0, first_announce_timeout=1)
    failures = 0

    async def publish(channel: str, data: Any) -> int:
        nonlocal failures
        failures += 1
        raise TypeError("a bug")

    agent._redis.publish = publish  # type: ignore[method-assign]
    with pytest.raises(TypeError):  # a direct call is the caller's: it sees the bug
        await agent.announce()
    async with agent:
        await eventually(lambda: failures >= 3, 10, what="the loop retried")  # ttl/3 apart
        assert not agent.registered
        assert agent.last_error is not None and "TypeError" in agent.last_error
