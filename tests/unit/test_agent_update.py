"""Agent.update checks a change by the same rules as the constructor (no server needed)."""

from __future__ import annotations

import pytest

from saga_events import Agent, InvalidEvent

pytestmark = pytest.mark.anyio

# Nothing listens on port 1: an announcement fails at once, as a Redis outage.
_NO_REDIS = "redis://127.0.0.1:1/0"


async def test_update_refuses_a_bad_capability_and_changes_nothing() -> None:
    """A capability the registrar would reject is refused; URL and capabilities stay."""
    agent = Agent(_NO_REDIS, "svc", "http://a:1", capabilities=["rest"])
    try:
        with pytest.raises(InvalidEvent) as err:
            await agent.update(service_url="http://b:2", capabilities=["has space"])
        assert err.value.reason == "invalid"
        assert agent.service_url == "http://a:1"
        assert agent.capabilities == ("rest",)
        assert agent.seq == 0  # nothing was announced
    finally:
        await agent.aclose()


async def test_update_accepts_the_agents_own_url_schemes() -> None:
    """A URL in the agent's allow-list is accepted on update, as in the constructor."""
    schemes = frozenset({"amqp"})
    agent = Agent(_NO_REDIS, "svc", "amqp://a:1", url_schemes=schemes)
    try:
        assert not await agent.update(service_url="amqp://b:2")  # Redis is down: not confirmed
        assert agent.service_url == "amqp://b:2"
        with pytest.raises(InvalidEvent) as err:
            await agent.update(service_url="http://c:3")
        assert err.value.reason == "bad_url"
        assert agent.service_url == "amqp://b:2"
    finally:
        await agent.aclose()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"metadata": {"k" * 200: "v"}}, "invalid"),
        ({"metadata": {"k": "v" * 20_000}}, "oversized"),
        ({"ttl": 0.5}, "bad_ttl"),
        ({"service_id": "a:b"}, "bad_name"),
        ({"capabilities": ["a b"]}, "invalid"),
    ],
)
def test_constructor_refuses_what_the_registrar_would_drop(
    kwargs: dict[str, object], reason: str
) -> None:
    """An agent never publishes a record the registrar would reject: metadata included."""
    with pytest.raises(InvalidEvent) as err:
        Agent(_NO_REDIS, "svc", "http://a:1", **kwargs)  # type: ignore[arg-type]
    assert err.value.reason == reason
