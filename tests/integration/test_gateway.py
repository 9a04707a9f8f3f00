"""The HTTP gateway against a real redis-server, a real registrar and real uvicorn."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import httpx
import pytest

from saga_events import Agent, Mirror, Registrar, Removed
from saga_events.embedded import RedisServer
from saga_events.identity import stable_service_id
from saga_events.testing import registry_truth, wait_mirror_matches
from saga_events.web import Gateway
from saga_events.writer import WRITE_RETRIES
from tests.gateway_helpers import Served, metric_samples, serve_gateway

pytestmark = pytest.mark.anyio

REGISTER = "/api/v1/services/register"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
SEED_BODY = {
    "service_name": "gateway",
    "service_url": "http://localhost:8000",
    "capabilities": ["rest", "graphql", "grpc"],
}


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


@pytest.fixture
async def guarded(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url, token="s3cret-token") as s:
        yield s


async def _truth_ids(redis_url: str) -> set[str]:
    return {inst.service_id for inst in (await registry_truth(redis_url)).values()}


# -- the seed's shapes ---------------------------------------------------------------------


async def test_register_answers_seed_shape_and_get_reads_it_at_once(served: Served) -> None:
    """POST register answers 200 in the seed's shape; a GET right after finds the instance."""
    r = await served.client.post(REGISTER, json=SEED_BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    for key in ("service_id", "service_name", "service_url", "capabilities"):
        assert key in body
    assert body["service_name"] == "gateway"
    assert body["service_url"] == "http://localhost:8000"
    assert body["capabilities"] == ["rest", "graphql", "grpc"]
    assert body["service_id"] == stable_service_id("gateway", "http://localhost:8000")
    assert ISO_UTC.match(body["registered_at"]), body["registered_at"]
    assert ISO_UTC.match(body["last_heartbeat"]), body["last_heartbeat"]
    assert body["ttl_seconds"] == 60

    got = await served.client.get("/api/v1/services/gateway")
    assert got.status_code == 200, got.text
    assert {k: got.json()[k] for k in body if k != "last_heartbeat"} == {
        k: body[k] for k in body if k != "last_heartbeat"
    }
    assert await _truth_ids(served.redis_url) == {body["service_id"]}


async def test_read_your_writes_over_many_registrations(served: Served) -> None:
    """Every GET issued right after its own register answers 200, never 404."""
    for i in range(30):
        name = f"svc{i}"
        r = await served.client.post(
            REGISTER, json={"service_name": name, "service_url": f"http://10.0.0.{i}:80"}
        )
        assert r.status_code == 200, r.text
        got = await served.client.get(f"/api/v1/services/{name}")
        assert got.status_code == 200, (name, got.text)
        assert got.json()["service_url"] == f"http://10.0.0.{i}:80"


async def test_reregistering_is_idempotent_and_keeps_registered_at(served: Served) -> None:
    """The same (name, url) again refreshes the one instance; a changed body updates it in place."""
    first = (await served.client.post(REGISTER, json=SEED_BODY)).json()
    again = (await served.client.post(REGISTER, json=SEED_BODY)).json()
    assert again["service_id"] == first["service_id"]
    assert again["registered_at"] == first["registered_at"]
    assert again["last_heartbeat"] >= first["last_heartbeat"]
    assert await _truth_ids(served.redis_url) == {first["service_id"]}

    changed = await served.client.post(REGISTER, json={**SEED_BODY, "capabilities": ["rest"]})
    assert changed.status_code == 200
    assert changed.json()["service_id"] == first["service_id"]
    assert changed.json()["registered_at"] == first["registered_at"]
    got = (await served.client.get("/api/v1/services/gateway")).json()
    assert got["capabilities"] == ["rest"]
    assert len(await registry_truth(served.redis_url)) == 1


async def test_explicit_service_id_metadata_and_ttl_are_kept(served: Served) -> None:
    """Optional service_id, metadata and ttl_seconds reach the record."""
    r = await served.client.post(
        REGISTER,
        json={
            **SEED_BODY,
            "service_id": "gw-1",
            "metadata": {"zone": "eu-1"},
            "ttl_seconds": 90,
            "unknown_field": "ignored",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["service_id"] == "gw-1"
    truth = await registry_truth(served.redis_url)
    (inst,) = truth.values()
    assert inst.service_id == "gw-1"
    assert inst.metadata == {"zone": "eu-1"}
    assert inst.ttl_ms == 90_000


async def test_heartbeat_answers_200_for_live_and_404_for_unknown(served: Served) -> None:
    """A heartbeat keeps a registered service alive; an unknown name gets 404 (re-register)."""
    missing = await served.client.post("/api/v1/services/gateway/heartbeat")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"

    reg = (await served.client.post(REGISTER, json=SEED_BODY)).json()
    beat = await served.client.post("/api/v1/services/gateway/heartbeat")
    assert beat.status_code == 200, beat.text
    assert beat.json()["service_ids"] == [reg["service_id"]]
    assert beat.json()["last_heartbeat"] >= reg["registered_at"]
    got = (await served.client.get("/api/v1/services/gateway")).json()
    assert got["registered_at"] == reg["registered_at"]
    assert got["last_heartbeat"] == beat.json()["last_heartbeat"]


async def test_delete_removes_at_once_and_reregistering_works(served: Served) -> None:
    """DELETE answers 200, a GET right after 404, a second DELETE 404; registering again works."""
    reg = (await served.client.post(REGISTER, json=SEED_BODY)).json()
    gone = await served.client.delete("/api/v1/services/gateway")
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"service_name": "gateway", "removed": [reg["service_id"]]}
    assert (await served.client.get("/api/v1/services/gateway")).status_code == 404
    assert (await served.client.delete("/api/v1/services/gateway")).status_code == 404
    assert await _truth_ids(served.redis_url) == set()

    # The DELETE left a tombstone: a new registration must still be newer than it.
    back = await served.client.post(REGISTER, json=SEED_BODY)
    assert back.status_code == 200
    assert (await served.client.get("/api/v1/services/gateway")).status_code == 200
    assert await _truth_ids(served.redis_url) == {reg["service_id"]}


async def test_several_instances_of_one_name(served: Served) -> None:
    """Heartbeat and DELETE by name act on every instance; ?service_id= narrows to one."""
    a = (await served.client.post(REGISTER, json={**SEED_BODY, "service_url": "http://a:1"})).json()
    b = (await served.client.post(REGISTER, json={**SEED_BODY, "service_url": "http://b:1"})).json()
    assert a["service_id"] != b["service_id"]

    listing = (await served.client.get("/api/v1/services")).json()
    assert listing["count"] == 2
    assert sorted(i["service_id"] for i in listing["services"]["gateway"]) == sorted(
        [a["service_id"], b["service_id"]]
    )
    seen = {
        (await served.client.get("/api/v1/services/gateway")).json()["service_id"] for _ in "xy"
    }
    assert seen == {a["service_id"], b["service_id"]}  # round-robin

    beat = await served.client.post("/api/v1/services/gateway/heartbeat")
    assert sorted(beat.json()["service_ids"]) == sorted([a["service_id"], b["service_id"]])
    one = await served.client.post(
        "/api/v1/services/gateway/heartbeat", params={"service_id": a["service_id"]}
    )
    assert one.json()["service_ids"] == [a["service_id"]]

    gone = await served.client.delete(
        "/api/v1/services/gateway", params={"service_id": a["service_id"]}
    )
    assert gone.json()["removed"] == [a["service_id"]]
    assert await _truth_ids(served.redis_url) == {b["service_id"]}
    assert (await served.client.get("/api/v1/services/gateway")).json()["service_id"] == b[
        "service_id"
    ]
    rest = await served.client.delete("/api/v1/services/gateway")
    assert rest.json()["removed"] == [b["service_id"]]
    assert await _truth_ids(served.redis_url) == set()


async def test_list_answers_every_service(served: Served) -> None:
    """GET /api/v1/services lists every service and instance, empty at first."""
    empty = (await served.client.get("/api/v1/services")).json()
    assert empty == {"services": {}, "count": 0, "stale": False}
    for name in ("auth", "payment"):
        await served.client.post(REGISTER, json={"service_name": name, "service_url": "http://x:1"})
    listing = (await served.client.get("/api/v1/services")).json()
    assert sorted(listing["services"]) == ["auth", "payment"]
    assert listing["count"] == 2
    assert all(ISO_UTC.match(i["registered_at"]) for v in listing["services"].values() for i in v)


async def test_http_registration_expires_after_its_ttl(served: Served, mirror: Mirror) -> None:
    """Without heartbeats an HTTP registration is reaped after ttl_seconds; GET, heartbeat 404."""
    async with aclosing(mirror.changes()) as changes:
        reg = await served.client.post(REGISTER, json={**SEED_BODY, "ttl_seconds": 1})
        assert reg.status_code == 200
        sid = reg.json()["service_id"]
        with anyio.fail_after(10):
            async for change in changes:
                if isinstance(change, Removed) and change.instance.service_id == sid:
                    break
    assert (await served.client.get("/api/v1/services/gateway")).status_code == 404
    assert (await served.client.post("/api/v1/services/gateway/heartbeat")).status_code == 404
    assert served.gateway.registrar.stats.reaped >= 1
    assert await _truth_ids(served.redis_url) == set()


async def test_http_heartbeat_keeps_an_agent_instance_as_it_is(
    served: Served, redis_url: str, mirror: Mirror
) -> None:
    """A heartbeat by name on an Agent's draining instance keeps it draining and the agent's
    later events still apply (the gateway reuses the stored incarnation, no record rewrite)."""
    async with Agent(redis_url, "billing", "http://10.1.1.1:80", ttl=30) as agent:
        await mirror.wait_for("billing", timeout=5)
        async with aclosing(mirror.changes()) as changes:
            await agent.drain()
            with anyio.fail_after(5):
                async for change in changes:
                    if change.instance.draining:
                        break
        before = mirror.instances("billing")[0]
        beat = await served.client.post("/api/v1/services/billing/heartbeat")
        assert beat.status_code == 200
        after = (await registry_truth(redis_url))[agent.keys.inst("billing", agent.service_id)]
        assert after == before  # same record: only the deadline moved
        got = (await served.client.get("/api/v1/services/billing")).json()
        assert got["draining"] is True


# -- bad input -------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes, int, str, str]] = [
    ("invalid json", b"{not json", 400, "bad_json", "malformed"),
    ("empty body", b"", 400, "bad_json", "body is missing"),
    ("json array", b"[1, 2]", 400, "invalid", "object"),
    ("missing url", b'{"service_name": "x"}', 400, "missing_field", "service_url"),
    ("missing name", b'{"service_url": "http://a"}', 400, "missing_field", "service_name"),
    ("bad name", b'{"service_name": "bad name", "service_url": "http://a"}', 400, "bad_name",
     "service_name"),
    ("name with colon", b'{"service_name": "a:b", "service_url": "http://a"}', 400, "bad_name",
     "service_name"),
    ("url not a string", b'{"service_name": "x", "service_url": 5}', 400, "bad_url", "service_url"),
    ("scheme off the list", b'{"service_name": "x", "service_url": "ftp://a"}', 422, "bad_url",
     "ftp"),
    ("url without host", b'{"service_name": "x", "service_url": "http://"}', 422, "bad_url",
     "no host"),
    ("relative url", b'{"service_name": "x", "service_url": "/just/a/path"}', 422, "bad_url",
     "scheme"),
    ("ttl too small", b'{"service_name": "x", "service_url": "http://a", "ttl_seconds": 0}', 400,
     "bad_ttl", "ttl_seconds"),
    ("capabilities not a list",
     b'{"service_name": "x", "service_url": "http://a", "capabilities": "rest"}', 400,
     "bad_capabilities", "capabilities"),
    ("oversized", b'{"service_name": "x", "service_url": "http://a", "metadata": {"k": "'
     + b"v" * 20_000 + b'"}}', 400, "oversized", "exceeds"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "reason", "says"),
    [pytest.param(b, s, r, w, id=i) for i, b, s, r, w in BAD_BODIES],
)
async def test_bad_registration_is_rejected_counted_and_changes_nothing(
    served: Served, body: bytes, status: int, reason: str, says: str
) -> None:
    """Bad input gets 400/422 with a reason and a message naming the problem; Redis is untouched."""
    applied_before = sum(served.gateway.registrar.stats.applied.values())
    r = await served.client.post(
        REGISTER, content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()
    assert err["status_code"] == status
    assert err["error"] == reason
    assert says.lower() in err["detail"].lower()
    assert served.gateway.stats.rejected[reason] == 1
    assert sum(served.gateway.registrar.stats.applied.values()) == applied_before
    assert await registry_truth(served.redis_url) == {}
    metrics = metric_samples((await served.client.get("/metrics")).text)
    assert metrics[f'saga_events_rejected_total{{source="http",reason="{reason}"}}'] == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/services/bad%20name"),
        ("DELETE", "/api/v1/services/a%3Ab"),
        ("POST", "/api/v1/services/-leading-dash/heartbeat"),
        ("DELETE", "/api/v1/services/ok?service_id=bad%20id"),
    ],
)
async def test_bad_names_in_paths_get_400(served: Served, method: str, path: str) -> None:
    """A name off the pattern in a path or query gets 400 saying so, not a 404 or a 5xx."""
    r = await served.client.request(method, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_name"


# -- token -------------------------------------------------------------------------------------


async def test_writes_need_the_bearer_token_when_one_is_set(guarded: Served) -> None:
    """With SAGA_API_TOKEN set, writes without the right bearer token get 401; reads stay open."""
    c = guarded.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        r = await c.post(REGISTER, json=SEED_BODY, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] == "unauthorized"
        beat = await c.post("/api/v1/services/gateway/heartbeat", headers=headers)
        assert beat.status_code == 401
        assert (await c.delete("/api/v1/services/gateway", headers=headers)).status_code == 401
    assert await registry_truth(guarded.redis_url) == {}
    ok = {"Authorization": "Bearer s3cret-token"}
    assert (await c.post(REGISTER, json=SEED_BODY, headers=ok)).status_code == 200
    assert (await c.get("/api/v1/services/gateway")).status_code == 200
    assert (await c.get("/api/v1/services")).status_code == 200
    assert (await c.delete("/api/v1/services/gateway", headers=ok)).status_code == 200
    assert guarded.gateway.stats.rejected["unauthorized"] == 9


async def test_token_comes_from_the_environment(
    registrar: Registrar, mirror: Mirror, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit token the gateway reads SAGA_API_TOKEN."""
    monkeypatch.setenv("SAGA_API_TOKEN", "from-env")
    gateway = Gateway(registrar, mirror, redis_url)
    assert gateway.token == "from-env"
    assert gateway.authorized("Bearer from-env")
    assert not gateway.authorized("Bearer from-env2")
    assert not gateway.authorized(None)


# -- health, metrics, schema --------------------------------------------------------------------


async def test_health_is_503_when_redis_is_killed(
    served: Served, redis_server: RedisServer
) -> None:
    """/health answers 200 with Redis and registrar state, 503 once Redis is gone; reads and
    writes then answer from the view or with 503, never another 5xx."""
    await served.client.post(REGISTER, json=SEED_BODY)
    ok = await served.client.get("/health")
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["status"] == "ok"
    assert body["redis"]["ok"] is True
    assert body["registrar"]["subscribed"] is True
    assert body["registrar"]["rid"] == served.gateway.registrar.rid
    assert body["mirror"] == {"synced": True, "stale": False, "instances": 1}

    redis_server.kill()
    down = await served.client.get("/health")
    assert down.status_code == 503, down.text
    assert down.json()["status"] == "unavailable"
    assert down.json()["redis"]["ok"] is False
    assert down.json()["redis"]["error"]
    # The last view is still served; writes say Redis is unreachable.
    assert (await served.client.get("/api/v1/services/gateway")).status_code == 200
    write = await served.client.post(REGISTER, json={**SEED_BODY, "service_url": "http://n:1"})
    assert write.status_code == 503, write.text
    assert write.json()["error"] == "redis_unavailable"
    beat = await served.client.post("/api/v1/services/gateway/heartbeat")
    assert beat.status_code == 503, beat.text
    # Bad input is told apart from an outage: its 422 needs no Redis.
    bad = await served.client.post(REGISTER, json={**SEED_BODY, "service_url": "ftp://n:1"})
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"] == "bad_url"


async def test_metrics_in_prometheus_text(served: Served) -> None:
    """/metrics counts applied events by outcome, live instances, rejections and answers."""
    await served.client.post(REGISTER, json=SEED_BODY)
    await served.client.post(REGISTER, json=SEED_BODY)
    await served.client.post(REGISTER, json={"service_name": "x", "service_url": "ftp://a"})
    r = await served.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = metric_samples(r.text)
    for key, value in (
        ('saga_events_applied_total{status="created"}', 1),
        ('saga_events_applied_total{status="refreshed"}', 1),
        ('saga_events_received_total{source="http"}', 3),
        ('saga_events_rejected_total{source="http",reason="bad_url"}', 1),
        ("saga_registry_instances", 1),
        ("saga_mirror_stale", 0),
        ("saga_registry_reaped_total", 0),
        ('saga_http_responses_total{method="POST",code="200"}', 2),
        ('saga_http_responses_total{method="POST",code="422"}', 1),
    ):
        assert samples.get(key) == value, f"{key!r} is not {value} in\n{r.text}"
    # request latency by route, as a histogram
    assert (
        samples['saga_http_request_duration_seconds_count'
                '{route="/api/v1/services/register",method="POST"}'] == 3
    )  # fmt: skip


async def test_openapi_document_is_served(served: Served) -> None:
    """The OpenAPI document lists every endpoint with its methods."""
    r = await served.client.get("/schema/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    paths = doc["paths"]
    assert set(paths["/api/v1/services/register"]) == {"post"}
    assert set(paths["/api/v1/services/{name}/heartbeat"]) == {"post"}
    assert set(paths["/api/v1/services/{name}"]) == {"get", "delete"}
    for p in ("/api/v1/services", "/health", "/metrics"):
        assert "get" in paths[p]
    # The web surface: the stream, Prometheus SD and the dashboard, with their media types.
    watch = paths["/api/v1/watch"]["get"]
    assert set(watch["responses"]["200"]["content"]) == {"text/event-stream"}
    assert {p["name"] for p in watch["parameters"]} == {"service", "Last-Event-ID"}
    assert "400" in watch["responses"]
    sd = paths["/api/v1/sd/prometheus"]["get"]
    assert set(sd["responses"]["200"]["content"]) == {"application/json"}
    assert {p["name"] for p in sd["parameters"]} == {"service", "capability"}
    assert set(paths["/ui"]["get"]["responses"]["200"]["content"]) == {"text/html"}


async def test_concurrent_writes_from_two_gateways_converge(served: Served, redis_url: str) -> None:
    """Two registrars with gateways on one Redis, 40 concurrent writes to one instance:
    every answer is 200, Redis holds exactly one record, and both views agree with it."""
    async with (
        Registrar(redis_url, rebuild_wait=0.2) as registrar2,
        Mirror(redis_url) as mirror2,
        serve_gateway(registrar2, mirror2, redis_url) as other,
    ):
        statuses: list[int] = []

        async def write(client: httpx.AsyncClient, i: int) -> None:
            body = {**SEED_BODY, "capabilities": [f"cap{i % 5}"], "service_id": "shared"}
            statuses.append((await client.post(REGISTER, json=body)).status_code)

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(write, (served.client, other.client)[i % 2], i)
        assert sorted(statuses) == [200] * 40, sorted(statuses)[-5:]
        truth = await registry_truth(redis_url)
        (inst,) = truth.values()
        for view in (served.gateway.mirror, mirror2):
            await wait_mirror_matches(view, redis_url, expected=set(truth))
        for client in (served.client, other.client):
            got = (await client.get("/api/v1/services/gateway")).json()
            assert got["capabilities"] == list(inst.capabilities)


async def test_redis_refusing_writes_gets_503_not_500(redis_url: str) -> None:
    """When Redis is up but refuses writes (out of memory), writes answer 503 and change nothing."""
    import redis.asyncio as aioredis

    # This registrar's own loops stay asleep while Redis refuses writes: the
    # test is about the gateway's answer (how a registrar rides out OOM is
    # the registrar's business).
    quiet = Registrar(redis_url, rebuild_wait=0.2, reap_interval=3600, liveness_interval=3600)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        async with quiet, Mirror(redis_url) as view, serve_gateway(quiet, view, redis_url) as s:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")
            try:
                r = await s.client.post(REGISTER, json=SEED_BODY)
            finally:
                await admin.config_set("maxmemory", "0")
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "redis_error"
            detail = r.json()["detail"]
            assert "registry unavailable (oom)" in detail, detail
            assert "saga:" not in detail and "script" not in detail  # no internals
            assert await registry_truth(redis_url) == {}
            assert (await s.client.post(REGISTER, json=SEED_BODY)).status_code == 200
    finally:
        await admin.aclose()


async def test_delete_cannot_evict_a_live_agent_for_long(
    served: Served, redis_url: str, mirror: Mirror
) -> None:
    """DELETE removes an Agent's instance at once; the agent's next heartbeats bring it back."""
    async with Agent(redis_url, "search", "http://10.2.2.2:80", ttl=30) as agent:
        await mirror.wait_for("search", timeout=5)
        gone = await served.client.delete("/api/v1/services/search")
        assert gone.json()["removed"] == [agent.service_id]
        assert (await served.client.get("/api/v1/services/search")).status_code == 404
        # The leave took the stored seq + 1; the agent's seq has to pass it.
        await agent.announce()
        await agent.announce()
        await mirror.wait_for("search", timeout=5)
        back = await served.client.get("/api/v1/services/search")
        assert back.status_code == 200
        assert back.json()["service_id"] == agent.service_id


async def test_http_heartbeats_do_not_outrank_an_agents_own_events(
    served: Served, redis_url: str, mirror: Mirror
) -> None:
    """HTTP heartbeats by name only move deadlines: an Agent's next change still applies."""
    async with Agent(redis_url, "ledger", "http://10.3.3.3:80", ttl=30) as agent:
        await mirror.wait_for("ledger", timeout=5)
        refreshed = served.gateway.registrar.stats.applied["refreshed"]
        for _ in range(3):
            beat = await served.client.post("/api/v1/services/ledger/heartbeat")
            assert beat.status_code == 200
        assert served.gateway.registrar.stats.applied["refreshed"] == refreshed + 3
        await agent.update(capabilities=["rest", "v2"])
        await mirror.wait_until(
            lambda m: m.instances("ledger")[0].capabilities == ("rest", "v2"), timeout=5
        )


async def test_delete_that_loses_every_race_answers_409_and_changes_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DELETE whose leave is answered stale on every attempt is a 409, not a 200 that
    silently leaves the instance out of ``removed``."""
    from saga_events import model
    from saga_events.registrar import ApplyResult

    reg = (await served.client.post(REGISTER, json=SEED_BODY)).json()
    registrar = served.gateway.registrar
    real_apply = registrar.apply
    leaves = 0

    async def another_writer_always_wins(
        event: model.AnyEvent, *, after_newest: bool = False
    ) -> ApplyResult:
        nonlocal leaves
        if isinstance(event, model.Leave):  # as if a newer write always got there first
            leaves += 1
            return ApplyResult(status="stale", registered_at_ms=0, now_ms=0)
        return await real_apply(event, after_newest=after_newest)

    monkeypatch.setattr(registrar, "apply", another_writer_always_wins)
    gone = await served.client.delete("/api/v1/services/gateway")
    assert gone.status_code == 409, gone.text
    assert gone.json()["error"] == "conflict"
    assert reg["service_id"] in gone.json()["detail"]
    assert leaves == WRITE_RETRIES
    assert await _truth_ids(served.redis_url) == {reg["service_id"]}
    monkeypatch.undo()
    again = await served.client.delete("/api/v1/services/gateway")
    assert again.json() == {"service_name": "gateway", "removed": [reg["service_id"]]}


async def test_writer_alone_registers_heartbeats_and_removes_without_http(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    """The write path has no HTTP in it: test helpers can call the Writer directly, and it
    keeps the same promises (stable ids, read-your-writes, 404-like refusals)."""
    import redis.asyncio as aioredis

    from saga_events.writer import Registration, Writer, WriteRejected

    client = aioredis.Redis.from_url(redis_url)
    writer = Writer(registrar, mirror, client)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.follow_view)
            inst, _now = await writer.register(Registration("pay", "http://localhost:9000"))
            assert inst.service_id == stable_service_id("pay", "http://localhost:9000")
            assert [i.service_id for i in mirror.instances("pay")] == [inst.service_id]
            kept, _ = await writer.heartbeat("pay", None)
            assert kept == [inst.service_id]
            assert await writer.deregister("pay", None) == [inst.service_id]
            assert mirror.instances("pay") == []  # read-your-writes, through the same view
            with pytest.raises(WriteRejected) as missing:
                await writer.heartbeat("pay", None)
            assert missing.value.kind == "not_found"
            with pytest.raises(WriteRejected) as bad:
                await writer.register(Registration("pay", "ftp://x"))
            assert (bad.value.kind, bad.value.reason) == ("invalid", "bad_url")
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed; .ci/run installs Debian's prometheus",
)
async def test_live_metrics_with_a_watch_stream_pass_promtool(served: Served) -> None:
    """``promtool check metrics`` on a serving gateway's /metrics, with a watch stream
    open, a registration, a discovery and an SD read behind it: clean, not even a lint."""
    assert (await served.client.post(REGISTER, json=SEED_BODY)).status_code == 200
    assert (await served.client.get("/api/v1/services/gateway")).status_code == 200
    assert (await served.client.get("/api/v1/sd/prometheus")).status_code == 200
    async with served.client.stream("GET", "/api/v1/watch") as stream:
        assert stream.status_code == 200
        chunks = stream.aiter_text()
        with anyio.fail_after(10):
            while "event: snapshot" not in await anext(chunks):
                pass
        text = (await served.client.get("/metrics")).text
    assert "saga_watch_streams 1.0" in text.splitlines()
    assert 'route="/api/v1/sd/prometheus"' in text
    with anyio.fail_after(60):
        run = await anyio.run_process(
            ["promtool", "check", "metrics"], input=text.encode(), check=False
        )
    said = (run.stdout + run.stderr).decode()
    assert run.returncode == 0, said
    assert not said.strip(), said
