"""The chaos run's ``pick`` invariant and REST clients: a stable REST client's instance
removed after a full ttl without a confirmed heartbeat is a lapse its client caused (a
seed-style client loses half its ttl per lost heartbeat), not a registry fault; removed
earlier, it is still a violation."""

from __future__ import annotations

from saga_events.testing.chaos.clients import lapsed
from saga_events.testing.chaos.deployment import AgentSlot

TTL = 20.0


def http_slot(confirmed: float | None) -> AgentSlot:
    slot = AgentSlot("svc-h", "svc-h-14", "http://10.1.0.14:8014", stable=True, kind="http")
    slot.confirmed = confirmed
    return slot


def test_removal_a_ttl_after_the_last_confirmed_heartbeat_is_a_lapse() -> None:
    why = lapsed(http_slot(100.0), 100.0 + TTL + 0.5, TTL)
    assert why is not None and "20.5 s" in why and "ttl 20 s" in why


def test_removal_within_the_ttl_of_a_confirmed_heartbeat_is_not() -> None:
    # A heartbeat sent at 100 s and answered 200 moved the deadline to >= 120 s.
    assert lapsed(http_slot(100.0), 100.0 + TTL - 0.1, TTL) is None
    assert lapsed(http_slot(100.0), 101.0, TTL) is None


def test_agents_and_unconfirmed_clients_never_lapse() -> None:
    agent = AgentSlot("svc-a", "svc-a-1", "http://10.1.0.1:8001", stable=True)
    agent.confirmed = 0.0  # only REST clients are judged by their heartbeats
    assert lapsed(agent, 1000.0, TTL) is None
    assert lapsed(http_slot(None), 1000.0, TTL) is None
