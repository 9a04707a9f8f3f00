"""Operator-drained instances in a chaos run, and their invariant: never picked, never lost.

One job: add drained instances to the workload (:func:`start_drains`: two stable agents
of :data:`DRAIN_SERVICE`, one drained through the gateway's ``POST .../drain`` as an
operator would) and check them (:func:`check_drained`, :func:`check_truth`: pure
functions of what a mirror or Redis shows, so a unit test can feed them a broken one).

Contract (the ``drain`` invariant; each breach is a violation of kind ``drain``):

* **never picked**: no ``pick()`` of a mirror returns a drained instance, during a fault
  (``watch_during_fault``) or after it heals, except during the faults of
  :data:`DRAIN_PICKS_EXPECTED`;
* **never lost**: while its agent lives, a drained instance stays in every mirror's
  ``instances()`` and in Redis, draining with its override (who/why), once each fault
  has healed (within ``settle_timeout``); mirror 0 never reports it ``Removed`` (the
  harness's ``pick`` invariant on stable instances covers that during faults).

Drains need the gateway (``ChaosConfig.http_clients``) and ``ChaosConfig.drains``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import anyio
import httpx

from ... import model
from ...errors import ServiceNotFound
from .deployment import AgentSlot, Deployment

#: The service of the drained instances (with one serving instance beside them).
DRAIN_SERVICE: Final = "svc-d"
DRAINED_BY: Final = "chaos-operator"

#: Faults during which a drained instance may be picked for a moment: an empty Redis
#: restart loses the override key with everything else, and an agent's heartbeat may
#: store the instance serving before the rebuild restores the override (a registrar's
#: last view). After the heal it must be drained again ("never lost" holds for all).
DRAIN_PICKS_EXPECTED: Final = frozenset({"redis_restart"})


class Reader(Protocol):
    """What the checks read of a mirror (a :class:`~saga_events.Mirror` is one)."""

    def instances(self, name: str) -> list[model.Instance]: ...

    def pick(self, name: str) -> model.Instance: ...


@dataclass
class Drains:
    """The drained instances of a run: ``{record key: (service, id)}``."""

    drained: dict[str, tuple[str, str]] = field(default_factory=dict)
    serving: list[AgentSlot] = field(default_factory=list)


async def start_drains(dep: Deployment, n: int) -> Drains:
    """Start ``n`` agents of :data:`DRAIN_SERVICE` to drain and one to serve beside them,
    all stable (never crashed, never churned), and drain the ``n`` through the gateway."""
    drains = Drains()
    serving = dep.new_slot(DRAIN_SERVICE, stable=True)
    await dep.start_agent(serving)
    drains.serving.append(serving)
    async with httpx.AsyncClient(base_url=dep.gateway_url, timeout=5.0) as http:
        for _ in range(n):
            slot = dep.new_slot(DRAIN_SERVICE, stable=True)
            await dep.start_agent(slot)
            path = f"/api/v1/services/{DRAIN_SERVICE}/drain"
            body = {"by": DRAINED_BY, "reason": "chaos: never picked, never lost"}
            with anyio.fail_after(dep.config.settle_timeout):
                while True:  # 404 until the gateway's view has the new instance
                    try:
                        resp = await http.post(
                            path, params={"service_id": slot.service_id}, json=body
                        )
                        if resp.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.1)
            drains.drained[dep.keys.inst(DRAIN_SERVICE, slot.service_id)] = (
                DRAIN_SERVICE,
                slot.service_id,
            )
    return drains


def _drained_ok(inst: model.Instance) -> bool:
    return inst.draining and inst.override is not None and inst.override.by == DRAINED_BY


def check_drained(
    mirror: Reader, drained: Mapping[str, tuple[str, str]], *, picks: int = 8
) -> list[str]:
    """What is wrong with the drained instances in ``mirror``: one listed without its
    drain or not listed at all (``lost``), or returned by one of ``picks`` picks of its
    service (``picked``)."""
    problems: list[str] = []
    services: dict[str, set[str]] = {}
    for name, sid in drained.values():
        services.setdefault(name, set()).add(sid)
    for name, ids in sorted(services.items()):
        listed = {i.service_id: i for i in mirror.instances(name)}
        for sid in sorted(ids):
            inst = listed.get(sid)
            if inst is None:
                problems.append(f"lost: drained {name}/{sid} is not listed")
            elif not _drained_ok(inst):
                problems.append(f"lost: {name}/{sid} is listed without its drain")
        problems += check_picks(mirror, name, ids, picks)
    return problems


def check_picks(mirror: Reader, name: str, ids: Iterable[str], picks: int) -> list[str]:
    """``picks`` picks of ``name``: none may return one of ``ids``."""
    wanted = set(ids)
    for _ in range(picks):
        try:
            got = mirror.pick(name).service_id
        except ServiceNotFound:
            return []  # nothing to pick is not a drained pick (the stable checks cover it)
        if got in wanted:
            return [f"picked: pick({name!r}) returned drained {got}"]
    return []


def check_truth(truth: Mapping[str, model.Instance], drained: Iterable[str]) -> list[str]:
    """Each drained record key in Redis's records, draining with its override."""
    problems = []
    for key in sorted(drained):
        inst = truth.get(key)
        if inst is None:
            problems.append(f"lost: drained {key} is not in Redis")
        elif not _drained_ok(inst):
            problems.append(f"lost: {key} is in Redis without its drain")
    return problems
