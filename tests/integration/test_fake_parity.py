"""The test fake picks as the real Mirror does: the same instances (weights, zones,
capabilities, an operator's drain) give the same sequences of picks, per strategy."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import pytest

from saga_events import Mirror, Registrar, model
from saga_events.testing import FakeRegistry
from tests.gateway_helpers import serve_gateway

pytestmark = pytest.mark.anyio

#: id -> (capabilities, metadata); "f" is drained by an operator, "e" has weight 0
INSTANCES: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "a": ((), {"zone": "eu-1", "weight": "3"}),
    "b": ((), {"zone": "eu-1", "weight": "1"}),
    "c": (("gpu",), {"zone": "us-1", "weight": "2"}),
    "d": (("gpu",), {"zone": "us-1"}),
    "e": ((), {"zone": "eu-1", "weight": "0"}),
    "f": (("gpu",), {"zone": "us-1", "weight": "5"}),
}

SELECTORS: list[tuple[str | None, dict[str, str] | None, dict[str, str] | None]] = [
    (None, None, None),
    (None, {"zone": "eu-1"}, None),
    (None, None, {"zone": "us-1"}),
    ("gpu", None, None),
    (None, {"zone": "eu-1"}, {"weight": "1"}),
    (None, None, {"zone": "mars"}),  # nothing preferred: the rest
]


@pytest.mark.parametrize("strategy", ["round_robin", "random", "least_recently_picked"])
async def test_fake_and_mirror_pick_the_same_sequences(redis_url: str, strategy: str) -> None:
    fake = FakeRegistry(strategy=strategy)
    async with AsyncExitStack() as stack:
        registrar = await stack.enter_async_context(Registrar(redis_url, rebuild_wait=0.1))
        for sid, (caps, meta) in INSTANCES.items():
            url = f"http://{sid}:80"
            await registrar.apply(
                model.Register(
                    service_name="api",
                    service_id=sid,
                    incarnation=1,
                    seq=1,
                    service_url=url,
                    capabilities=caps,
                    metadata=meta,
                    ttl_ms=60_000,
                )
            )
            fake.add("api", url, caps, service_id=sid, metadata=meta)
        mirror = await stack.enter_async_context(Mirror(redis_url, strategy=strategy))
        served = await stack.enter_async_context(serve_gateway(registrar, mirror, redis_url))
        resp = await served.client.post("/api/v1/services/api/drain?service_id=f", json={})
        assert resp.status_code == 200, resp.text
        fake.drain("api", "f", by="test")
        await mirror.wait_until(
            lambda m: (
                len(m.instances("api")) == len(INSTANCES)
                and [i.service_id for i in m.instances("api") if i.draining] == ["f"]
            ),
            10,
        )
        assert [i.service_id for i in fake.instances("api") if i.draining] == ["f"]

        for capability, where, prefer in SELECTORS:
            random.seed(14)  # the random strategy draws from the module's generator
            real = [
                mirror.pick("api", capability, where=where, prefer=prefer).service_id
                for _ in range(60)
            ]
            random.seed(14)
            faked = [
                fake.pick("api", capability=capability, where=where, prefer=prefer).service_id
                for _ in range(60)
            ]
            assert faked == real, (capability, where, prefer)
            assert "f" not in real and "e" not in real  # drained; weight 0 among positives
        # The fake's client takes the same path.
        random.seed(3)
        real = [mirror.pick("api", where={"zone": "us-1"}).service_id for _ in range(20)]
        random.seed(3)
        with fake.sync_client() as client:
            via_client = [
                client.discover_service("api", where={"zone": "us-1"}).service_id for _ in range(20)
            ]
        assert via_client == real
        # Undrained: both pick it again, in the same turn.
        resp = await served.client.post("/api/v1/services/api/undrain?service_id=f")
        assert resp.status_code == 200, resp.text
        fake.undrain("api", "f")
        random.seed(5)
        real = [mirror.pick("api", "gpu").service_id for _ in range(16)]
        random.seed(5)
        assert [fake.pick("api", capability="gpu").service_id for _ in range(16)] == real
        assert "f" in real


def test_fake_drain_survives_re_registration_and_ends_with_undrain_or_expiry() -> None:
    fake = FakeRegistry()
    with fake.sync_client() as client:
        client.register_service("pay", "http://p1:80", service_id="p1")
        fake.add("pay", "http://p2:80", service_id="p2")
        (drained,) = fake.drain("pay", "p1", by="ops", reason="disk")
        assert drained.draining
        assert {fake.pick("pay").service_id for _ in range(6)} == {"p2"}
        client.register_service("pay", "http://p1:81", service_id="p1")  # its own word
        assert fake.instances("pay")[0].draining  # the override stands
        assert client.refresh_registration("pay")
        assert {fake.pick("pay").service_id for _ in range(6)} == {"p2"}
        fake.undrain("pay")
        assert {fake.pick("pay").service_id for _ in range(6)} == {"p1", "p2"}
        fake.drain("pay", "p1")
        assert fake.expire("pay", "p1") == 1
        fake.add("pay", "http://p1:80", service_id="p1")  # a new instance: no override
        assert not fake.instances("pay")[0].draining
        assert fake.drain("nope") == []
