"""The chaos run's drain invariant catches what it claims to: a drained instance picked
(a deliberately broken pick) or lost (not listed, or listed without its drain)."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from saga_events import model
from saga_events.errors import ServiceNotFound
from saga_events.keys import Keys
from saga_events.testing.chaos.drains import (
    DRAIN_SERVICE,
    DRAINED_BY,
    check_drained,
    check_truth,
)
from saga_events.view import View

KEYS = Keys("chaos")
DRAINED = {KEYS.inst(DRAIN_SERVICE, "out"): (DRAIN_SERVICE, "out")}


def inst(sid: str, *, drained: bool) -> model.Instance:
    return model.Instance(
        incarnation=1,
        seq=1,
        registered_at_ms=0,
        service_name=DRAIN_SERVICE,
        service_id=sid,
        service_url=f"http://{sid}:80",
        draining=drained,
        override=model.DrainOverride(by=DRAINED_BY) if drained else None,
    )


class ViewReader:
    """A mirror's reads over a real View (the mirror's store and pick policy)."""

    def __init__(self, *insts: model.Instance) -> None:
        self.view = View()
        for i in insts:
            self.view.put(KEYS.inst(i.service_name, i.service_id), i)
        self.view.publish()

    def instances(self, name: str) -> list[model.Instance]:
        return self.view.instances(name)

    def pick(self, name: str) -> model.Instance:
        got = self.view.pick(name)
        if got is None:
            raise ServiceNotFound(name)
        return got


class BrokenPick(ViewReader):
    """A pick that forgets drains: every instance in turn, drained or not."""

    def __init__(self, *insts: model.Instance) -> None:
        super().__init__(*insts)
        self._turn = itertools.count()

    def pick(self, name: str) -> model.Instance:
        insts = self.view.instances(name)
        return insts[next(self._turn) % len(insts)]


def test_a_right_mirror_passes() -> None:
    reader = ViewReader(inst("live", drained=False), inst("out", drained=True))
    assert check_drained(reader, DRAINED) == []


def test_a_broken_pick_is_caught() -> None:
    reader = BrokenPick(inst("live", drained=False), inst("out", drained=True))
    (problem,) = check_drained(reader, DRAINED)
    assert problem.startswith("picked:") and "out" in problem


@pytest.mark.parametrize(
    ("insts", "says"),
    [
        ((inst("live", drained=False),), "is not listed"),
        ((inst("live", drained=False), inst("out", drained=False)), "without its drain"),
    ],
)
def test_a_lost_drain_is_caught(insts: tuple[model.Instance, ...], says: str) -> None:
    problems = check_drained(ViewReader(*insts), DRAINED)
    assert any(p.startswith("lost:") and says in p for p in problems), problems


def test_redis_truth_is_checked_the_same_way() -> None:
    key = KEYS.inst(DRAIN_SERVICE, "out")
    good = inst("out", drained=True)
    assert check_truth({key: good}, DRAINED) == []
    assert "not in Redis" in check_truth({}, DRAINED)[0]
    undrained = msgspec.structs.replace(good, override=None)
    assert "without its drain" in check_truth({key: undrained}, DRAINED)[0]
    other = msgspec.structs.replace(good, override=model.DrainOverride(by="someone else"))
    assert "without its drain" in check_truth({key: other}, DRAINED)[0]
