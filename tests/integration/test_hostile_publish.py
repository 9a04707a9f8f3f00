"""Hostile input on a real Redis: the registrar survives it and stores only valid records."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_events import Registrar, model
from saga_events.embedded import RedisServer
from saga_events.keys import NAME_RE, Keys
from saga_events.testing import eventually, registry_truth

KEYS = Keys("default")
_ids = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "register",
        "service_name": "payment",
        "service_id": "p-1",
        "incarnation": 1,
        "seq": 1,
        "service_url": "http://10.0.0.5:8002",
        "ttl_ms": 30_000,
    }
    base.update(overrides)
    return base


hostile_strings = st.one_of(
    st.sampled_from(
        ["pay:ment", "*", "{default}", "payment\n", "pay ment", "\u0440ayment", "a" * 10_240]
    ),
    st.text(max_size=20),
    st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
)
values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**66), max_value=2**66),
    hostile_strings,
    st.sampled_from(["javascript:alert(1)", "file:///etc/passwd", "http://h:99999", "tcp://h:1"]),
    st.lists(hostile_strings, max_size=3),
    st.dictionaries(hostile_strings, hostile_strings, max_size=2),
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    ev = event(
        type=draw(st.sampled_from(["register", "heartbeat", "drain", "leave"])),
        service_name=draw(st.sampled_from(["payment", "billing"])),
        service_id=draw(st.sampled_from(["p-1", "p-2", "p-3"])),
        incarnation=draw(st.integers(min_value=0, max_value=3)),
        seq=draw(st.integers(min_value=0, max_value=50)),
    )
    if kind == "mutated":
        for name in draw(
            st.lists(st.sampled_from(sorted(ev)), min_size=1, max_size=3, unique=True)
        ):
            ev[name] = draw(values)
    return json.dumps(ev).encode()


channels = st.one_of(
    st.sampled_from(["payment", "billing", "pay:ment", "*", "payment\n", "{x}"]).map(KEYS.events),
    st.binary(max_size=30).map(lambda b: KEYS.events_prefix.encode() + b),
)


def assert_valid_record(key: str, inst: model.Instance) -> None:
    assert KEYS.parse_inst(key) == (inst.service_name, inst.service_id), key
    assert NAME_RE.fullmatch(inst.service_name) and NAME_RE.fullmatch(inst.service_id)
    model.check_url(inst.service_url)
    assert model.MIN_TTL_MS <= inst.ttl_ms <= model.MAX_TTL_MS
    assert all(NAME_RE.fullmatch(c) for c in inst.capabilities)


@dataclass
class Live:
    """One registrar for the whole module, on an event loop in a background thread."""

    portal: BlockingPortal
    client: aioredis.Redis
    registrar: Registrar


@pytest.fixture(scope="module")
def live(server: RedisServer) -> Iterator[Live]:
    # One loop for every example: a loop per example would leave connections to
    # be collected after their loop closed.
    with start_blocking_portal("asyncio") as portal:
        client = portal.call(lambda: aioredis.Redis.from_url(server.url))
        registrar = Registrar(client, rebuild_wait=0.05)
        try:
            with portal.wrap_async_context_manager(registrar):
                yield Live(portal, client, registrar)
        finally:
            portal.call(client.aclose)


async def publish_and_check(live: Live, messages: list[tuple[bytes | str, bytes]]) -> None:
    client, stats = live.client, live.registrar.stats
    received = stats.received
    for channel, data in messages:
        await client.publish(channel, data)
    # A sentinel after the barrage: the registrar is alive and still applying.
    sid = f"sentinel-{next(_ids)}"
    sentinel = event(service_name="sentinel", service_id=sid)
    await client.publish(KEYS.events("sentinel"), json.dumps(sentinel).encode())
    await eventually(lambda: client.exists(KEYS.inst("sentinel", sid)), 10)
    # The record is in Redis before the registrar has read the script's reply and
    # counted it: wait for the count (a count that never adds up times out).
    await eventually(
        lambda: stats.received == sum(stats.applied.values()) + sum(stats.rejected.values()),
        10,
        what="every received event counted as applied or rejected",
    )
    assert stats.received == received + len(messages) + 1
    for key, inst in (await registry_truth(client)).items():
        assert_valid_record(key, inst)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.tuples(channels, payloads()), min_size=1, max_size=40))
def test_registrar_applies_or_rejects_anything_published(
    live: Live, messages: list[tuple[bytes | str, bytes]]
) -> None:
    """Any bytes on any events channel are applied or rejected; the registrar never dies
    and never writes a record that fails validation."""
    live.portal.call(publish_and_check, live, messages)


@pytest.mark.anyio
async def test_a_flood_from_one_publisher_is_rate_limited(redis_url: str) -> None:
    """A flood of events for one instance is cut to its rate; other instances are unaffected."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with Registrar(client, rebuild_wait=0.05, rate_limit=10, rate_burst=20) as reg:
            channel = KEYS.events("payment")
            pipe = client.pipeline(transaction=False)
            for seq in range(1, 2001):
                pipe.publish(channel, json.dumps(event(type="heartbeat", seq=seq)).encode())
            pipe.publish(channel, json.dumps(event(service_id="p-2")).encode())
            await pipe.execute()
            stats = reg.stats
            # Received is counted on arrival, applied once the batch is applied.
            await eventually(
                lambda: (
                    stats.received >= 2001
                    and stats.received == sum(stats.applied.values()) + sum(stats.rejected.values())
                ),
                10,
            )
            assert reg.stats.rejected["rate_limited"] >= 1900
            truth = await registry_truth(client)
            assert set(truth) == {KEYS.inst("payment", "p-1"), KEYS.inst("payment", "p-2")}
            # What was applied of the flood is its head: the record's seq stays low.
            assert truth[KEYS.inst("payment", "p-1")].seq < 100
    finally:
        await client.aclose()
