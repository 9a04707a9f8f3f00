"""One node's ``CLUSTER NODES`` read for one slot (internal, used by :mod:`.topology`).

One job: parse the text a Cluster node answers into who serves a slot, that owner's
healthy replicas, every node named, and whether the asked node is migrating the slot
(the ``[slot->-id]`` / ``[slot-<-id]`` markers on its own line). No I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ._topology_url import Address


@dataclass(slots=True)
class _ClusterView:
    """One node's ``CLUSTER NODES``: who serves ``slot``, and its healthy replicas."""

    owner: Address | None = None
    owner_id: str = ""
    myself: Address | None = None
    replicas: list[Address] = field(default_factory=list)
    nodes: list[Address] = field(default_factory=list)
    #: the asked node is moving ``slot`` out (MIGRATING) or in (IMPORTING): its keys are
    #: on two nodes until the migration ends, and a replica of either knows nothing of it
    moving: bool = False


def _parse_cluster_nodes(raw: str, slot: int, asked: Address) -> _ClusterView:
    view = _ClusterView()
    lines = [line.split() for line in raw.splitlines() if line.strip()]
    links: dict[str, tuple[Address, list[str], str, str]] = {}
    for fields in lines:
        node_id, endpoint, flags = fields[0], fields[1], fields[2].split(",")
        hostport = endpoint.split("@", 1)[0]
        host, _, port = hostport.rpartition(":")
        address = (host or asked[0], int(port)) if port.isdigit() else asked
        if "myself" in flags:
            address = asked  # a node may not know its own announced address
            view.myself = address
            view.moving = _moving(fields[8:], slot)
        links[node_id] = (address, flags, fields[3], fields[7])
        if "noaddr" not in flags and "handshake" not in flags:
            view.nodes.append(address)
        if "master" in flags and "fail" not in flags and _owns(fields[8:], slot):
            view.owner, view.owner_id = address, node_id
    for address, flags, master_id, link in links.values():
        healthy = not {"fail", "fail?", "noaddr", "handshake"} & set(flags)
        if master_id == view.owner_id and healthy and link == "connected" and "slave" in flags:
            view.replicas.append(address)
    return view


def _moving(ranges: Iterable[str], slot: int) -> bool:
    """A migration marker for ``slot`` (``[slot->-id]`` out, ``[slot-<-id]`` in)."""
    return any(item.startswith((f"[{slot}->-", f"[{slot}-<-")) for item in ranges)


def _owns(ranges: Iterable[str], slot: int) -> bool:
    for item in ranges:
        if item.startswith("["):
            continue  # a migration marker ([slot->-id] / [slot-<-id]) is not ownership
        low, _, high = item.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False
