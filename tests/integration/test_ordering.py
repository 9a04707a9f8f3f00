"""Ordering: duplicated, reordered and stale events change nothing (two registrars)."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_events import Registrar, model
from saga_events.embedded import RedisServer
from saga_events.keys import Keys

K = Keys()
NAME, SID = "orders", "o1"
URLS = ["http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80"]


@dataclass(frozen=True)
class Step:
    kind: str  # register | heartbeat | drain | leave
    url: int


def build_events(incarnations: list[list[Step]]) -> list[model.AnyEvent]:
    """The events two successive runs of one agent would publish, in publish order."""
    events: list[model.AnyEvent] = []
    for n, steps in enumerate(incarnations):
        inc = (1_700_000_000_000 + n) * 1000
        for seq, step in enumerate(steps, start=1):
            common = {"service_name": NAME, "service_id": SID, "incarnation": inc, "seq": seq}
            if step.kind == "leave":
                events.append(model.Leave(**common))  # type: ignore[arg-type]
                continue
            cls = {"register": model.Register, "heartbeat": model.Heartbeat, "drain": model.Drain}
            events.append(cls[step.kind](**common, service_url=URLS[step.url], ttl_ms=60_000))  # type: ignore[arg-type]
    return events


steps = st.builds(
    Step,
    st.sampled_from(["register", "heartbeat", "heartbeat", "drain", "leave"]),
    st.integers(0, 2),
)
runs = st.lists(st.lists(steps, min_size=1, max_size=6), min_size=1, max_size=2)


@pytest.fixture(scope="module")
def shared_redis() -> object:
    with RedisServer() as server:
        yield server


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(runs=runs, data=st.data())
def test_any_interleaving_converges_to_the_newest_event(
    shared_redis: RedisServer, runs: list[list[Step]], data: st.DataObject
) -> None:
    """Whatever subset, duplication and order two registrars apply, the record ends as the
    newest delivered event says: a register delivered after a leave never resurrects."""
    events = build_events(runs)
    delivered = data.draw(
        st.lists(st.integers(0, len(events) - 1), min_size=1, max_size=3 * len(events)),
        label="delivered event indexes, in order, with duplicates",
    )
    split = data.draw(st.lists(st.booleans(), min_size=len(delivered), max_size=len(delivered)))
    newest = max((events[i] for i in delivered), key=lambda e: (e.incarnation, e.seq))

    url = shared_redis.url
    sync = redis.Redis.from_url(url)
    sync.flushall()

    async def apply_all() -> None:
        regs = [Registrar(url), Registrar(url)]
        try:
            queues: list[list[model.AnyEvent]] = [[], []]
            for i, to_second in zip(delivered, split, strict=True):
                queues[int(to_second)].append(events[i])

            async def drive(reg: Registrar, queue: list[model.AnyEvent]) -> None:
                for event in queue:
                    await reg.apply(event)
                    await anyio.lowlevel.checkpoint()

            async with anyio.create_task_group() as tg:
                for reg, queue in zip(regs, queues, strict=True):
                    tg.start_soon(drive, reg, queue)
        finally:
            for reg in regs:
                await reg.aclose()

    anyio.run(apply_all)
    key = K.inst(NAME, SID)
    raw = sync.get(key)
    in_index = sync.sismember(K.index, key)
    deadline = sync.zscore(K.deadlines, key)
    sync.close()
    if isinstance(newest, model.Leave):
        assert raw is None, f"resurrected after leave: {raw!r}"
        assert not in_index and deadline is None
    else:
        assert raw is not None, "the newest event announces the instance, but it is gone"
        inst = model.decode_instance(raw)
        assert inst.incarnation == newest.incarnation
        assert inst.service_url == newest.service_url
        assert inst.draining == isinstance(newest, model.Drain)
        assert in_index and deadline is not None


def test_stale_and_duplicate_events_report_themselves(redis_server: RedisServer) -> None:
    """The apply script says what it did: created, refreshed, stale, removed, absent."""
    events = build_events(
        [[Step("register", 0), Step("heartbeat", 0), Step("heartbeat", 1), Step("leave", 0)]]
    )

    async def run() -> list[str]:
        async with Registrar(redis_server.url, rebuild_wait=0.1) as reg:
            order = [0, 0, 1, 2, 1, 0, 3, 0, 2, 3]
            return [(await reg.apply(events[i])).status for i in order]

    assert anyio.run(run) == [
        "created",  # register
        "refreshed",  # duplicate register, same record: liveness only
        "refreshed",  # heartbeat, unchanged
        "updated",  # heartbeat with a new URL
        "stale",  # older heartbeat after the change
        "stale",  # older register
        "removed",  # leave
        "stale",  # register after leave: the tombstone holds it back
        "stale",
        "stale",  # duplicate leave
    ]
