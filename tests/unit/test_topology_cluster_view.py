"""Cluster resolution without I/O: whose claim to a slot counts (canned CLUSTER NODES)."""

from __future__ import annotations

from typing import Any

import pytest

from saga_events.errors import TopologyUnavailable
from saga_events.topology import Topology, pubsub_commands

pytestmark = pytest.mark.anyio

A, B, C = ("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003)


def line(node_id: str, address: tuple[str, int], flags: str, master: str = "-",
         slots: str = "") -> str:  # fmt: skip
    host, port = address
    return f"{node_id} {host}:{port}@{port + 10000} {flags} {master} 0 0 1 connected {slots}"


def cluster_nodes(views: dict[tuple[str, int], str]) -> Topology:
    topology = Topology("redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003")

    async def ask(address: tuple[str, int], *command: Any, sentinel: bool = False) -> Any:
        if address not in views:
            raise ConnectionRefusedError(f"{address} is down")
        return views[address]

    topology._ask = ask  # type: ignore[method-assign]
    return topology


async def test_a_restarted_primary_claiming_its_old_slots_is_not_believed() -> None:
    """A primary back from kill -9 claims its slots from nodes.conf for a moment, while
    every other node names the promoted replica: resolution goes to the promoted one (the
    agent's PUBLISH on the stale node would count nobody, for good once it is a replica)."""
    stale = "\n".join([line("a", A, "myself,master", slots="0-16383"),
                       line("b", B, "master"), line("c", C, "master")])  # fmt: skip
    current = "\n".join([line("a", A, "master"), line("c", C, "master"),
                         line("b", B, "myself,master", slots="0-16383")])  # fmt: skip
    other = "\n".join([line("a", A, "master"), line("c", C, "myself,master"),
                       line("b", B, "master", slots="0-16383")])  # fmt: skip
    topology = cluster_nodes({A: stale, B: current, C: other})
    assert await topology.slot_address(5718) == B


async def test_a_lone_owner_is_believed_when_nobody_names_another() -> None:
    """A one-node Cluster (or every other node down): the owner's own claim is used."""
    alone = line("a", A, "myself,master", slots="0-16383")
    topology = cluster_nodes({A: alone})
    assert await topology.slot_address(5718) == A


async def test_no_owner_anywhere_is_unavailable() -> None:
    topology = cluster_nodes({A: line("a", A, "myself,master")})
    with pytest.raises(TopologyUnavailable, match="knows no owner"):
        await topology.slot_address(5718)


def test_pubsub_commands() -> None:
    """Sharded pub/sub for exact {ns} channels on a Cluster of Redis >= 7 only."""
    assert pubsub_commands("cluster", "7.0.15") == ("SPUBLISH", "SSUBSCRIBE")
    assert pubsub_commands("cluster", "6.2.14") == ("PUBLISH", "SUBSCRIBE")
    assert pubsub_commands("sentinel", "7.2.0") == ("PUBLISH", "SUBSCRIBE")
    assert pubsub_commands("plain", "7.2.0") == ("PUBLISH", "SUBSCRIBE")
