"""Malformed events are rejected, counted and logged; the registry is unchanged."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from saga_events import Agent, Mirror, Registrar
from saga_events.keys import Keys
from saga_events.testing import eventually, registry_truth, wait_mirror_matches

pytestmark = pytest.mark.anyio
K = Keys()


def event(**fields: object) -> bytes:
    import json

    base: dict[str, object] = {
        "type": "register",
        "service_name": "pay",
        "service_id": "p1",
        "incarnation": 1,
        "seq": 1,
        "service_url": "http://10.0.0.1:80",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


BAD = [
    ("bad_json", "pay", b"{not json"),
    ("bad_json", "pay", b"\xff\xfe\x00"),
    ("invalid", "pay", event(service_url=None)),  # missing field
    ("invalid", "pay", event(seq="7")),  # wrong type
    ("invalid", "pay", event(seq=-1)),
    ("invalid", "pay", event(capabilities="rest")),
    ("bad_name", "pay", event(service_id="has space")),
    ("bad_name", "pay", event(service_id="a:b")),
    ("bad_name", "bad*name", event(service_name="bad*name")),
    ("bad_url", "pay", event(service_url="ftp://10.0.0.1/")),
    ("bad_url", "pay", event(service_url="javascript:alert(1)")),
    ("bad_url", "pay", event(service_url="http://")),
    ("bad_ttl", "pay", event(ttl_ms=10)),
    ("bad_ttl", "pay", event(ttl_ms=10**9)),
    ("unknown_type", "pay", event(type="explode")),
    ("channel_mismatch", "other", event()),
    ("oversized", "pay", event(metadata={"k": "x" * 17_000})),
]


async def test_malformed_events_are_rejected_counted_and_logged(
    redis_url: str, registrar: Registrar, mirror: Mirror, caplog: pytest.LogCaptureFixture
) -> None:
    """Each bad event gets its reason; nothing reaches Redis; the registrar keeps running."""
    caplog.set_level(logging.WARNING, logger="saga_events.registrar")
    async with Agent(redis_url, "keep", "http://10.0.0.9:80", service_id="k"):
        before = await wait_mirror_matches(mirror, redis_url, expected={K.inst("keep", "k")})
        client = aioredis.Redis.from_url(redis_url)
        try:
            received = registrar.stats.received
            for _reason, channel_service, payload in BAD:
                assert await client.publish(K.events(channel_service), payload) == 1
            await eventually(lambda: registrar.stats.received == received + len(BAD), 5)
            expected: dict[str, int] = {}
            for reason, _, _ in BAD:
                expected[reason] = expected.get(reason, 0) + 1
            assert dict(registrar.stats.rejected) == expected
            assert await registry_truth(redis_url) == before
            assert not await client.exists(K.tomb("pay", "p1"))
            # Still alive: a valid event after the garbage is applied.
            assert await client.publish(K.events("pay"), event()) == 1
            await mirror.wait_for("pay", 2)
            await wait_mirror_matches(mirror, redis_url)
        finally:
            await client.aclose()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in expected:
        assert f"({reason})" in logged
    assert "is not one of" in logged  # the URL rejection says what is allowed
