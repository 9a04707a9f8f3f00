"""The gateway's framework-free GETs (saga_events.web.fast) answer what Litestar answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from saga_events import Agent, Mirror, Registrar
from saga_events.testing import eventually
from saga_events.web.fast import Heartbeats
from saga_events.web.schema import ServiceInfo, ServiceList
from tests.gateway_helpers import Served, serve_gateway

pytestmark = pytest.mark.anyio

REGISTER = "/api/v1/services/register"


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


async def _register(served: Served, name: str, url: str, **extra: object) -> dict[str, object]:
    body = {"service_name": name, "service_url": url, "capabilities": ["rest"], **extra}
    r = await served.client.post(REGISTER, json=body)
    assert r.status_code == 200, r.text
    got: dict[str, object] = r.json()
    return got


async def test_get_by_name_is_byte_for_byte_the_apps_answer(served: Served) -> None:
    """The fast GET and the app's GET (a query string sends it through Litestar) give the
    same bytes and the same headers; a drained instance's operator fields are encoded too."""
    await _register(served, "orders", "http://10.0.0.1:80", metadata={"zone": "z1"})
    fast = await served.client.get("/api/v1/services/orders")
    slow = await served.client.get("/api/v1/services/orders", params={"capability": "rest"})
    assert fast.status_code == slow.status_code == 200
    assert fast.content == slow.content
    for header in ("content-type", "content-length"):
        assert fast.headers[header] == slow.headers[header]
    drained = await served.client.post(
        "/api/v1/services/orders/drain",
        json={"by": "ops", "reason": "patching"},
        params={"duration": "60"},
    )
    assert drained.status_code == 200, drained.text
    fast = await served.client.get("/api/v1/services/orders")
    (inst,) = served.gateway.writer.view.instances("orders")
    (beat,) = await served.gateway.writer.last_heartbeats([inst])
    assert fast.content == msgspec.json.encode(ServiceInfo.of(inst, beat))
    assert fast.json()["drained_by"] == "ops"


async def test_list_is_the_encoding_of_the_service_list(served: Served) -> None:
    """GET /api/v1/services is exactly msgspec's encoding of the ServiceList the route built."""
    for i in range(3):
        await _register(served, "orders", f"http://10.0.0.{i}:80")
    await _register(served, "billing", "http://10.0.1.1:80", metadata={"k": 'v"\\x'})
    got = await served.client.get("/api/v1/services")
    assert got.status_code == 200
    writer = served.gateway.writer
    services = writer.view.services()
    flat = [i for insts in services.values() for i in insts]
    beats = iter(await writer.last_heartbeats(flat))
    expected = ServiceList(
        services={n: [ServiceInfo.of(i, next(beats)) for i in ii] for n, ii in services.items()},
        count=len(flat),
        stale=writer.view.stale,
    )
    assert got.content == msgspec.json.encode(expected)
    assert got.headers["content-type"] == "application/json"


async def test_empty_list_and_unknown_names_and_bad_names_still_answer_as_before(
    served: Served,
) -> None:
    """No instance: the list is empty; an unknown name is the app's 404, a bad name its 400,
    GET of the register path is not a service lookup."""
    empty = await served.client.get("/api/v1/services")
    assert empty.json() == {
        "services": {},
        "count": 0,
        "stale": served.gateway.writer.view.stale,
    }
    missing = await served.client.get("/api/v1/services/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = await served.client.get("/api/v1/services/-bad")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_name"
    register = await served.client.get(REGISTER)
    assert register.status_code == 405


async def test_a_heartbeat_through_the_gateway_shows_at_once_after_a_cached_read(
    served: Served,
) -> None:
    """A GET keeps the last heartbeat for a moment; an HTTP heartbeat forgets it, so the
    next GET shows the new time."""
    served.gateway.context.heartbeats.max_age = 3600.0  # only a forget can refresh it
    reg = await _register(served, "orders", "http://10.0.0.1:80")
    first = (await served.client.get("/api/v1/services/orders")).json()
    assert first["last_heartbeat"] == reg["registered_at"]
    beat = await served.client.post("/api/v1/services/orders/heartbeat")
    assert beat.status_code == 200
    again = (await served.client.get("/api/v1/services/orders")).json()
    assert again["last_heartbeat"] == beat.json()["last_heartbeat"]


async def test_an_agents_heartbeat_shows_within_max_age(served: Served, redis_url: str) -> None:
    """A heartbeat that does not pass through the gateway shows once the kept time is old."""
    served.gateway.context.heartbeats.max_age = 0.05
    async with Agent(redis_url, "orders", "http://10.0.0.1:80", ttl=30) as agent:

        async def seen() -> bool:
            return (await served.client.get("/api/v1/services/orders")).status_code == 200

        await eventually(seen, what="the agent's instance in the gateway")
        first = (await served.client.get("/api/v1/services/orders")).json()["last_heartbeat"]

        async def moved() -> bool:
            await agent.announce("heartbeat")  # not through the gateway
            got = await served.client.get("/api/v1/services/orders")
            return bool(got.json()["last_heartbeat"] > first)

        await eventually(moved, timeout=20, interval=0.05, what="last_heartbeat moves")


async def test_heartbeats_cache_keeps_nothing_read_across_a_forget(
    served: Served,
) -> None:
    """A read that began before a forget() does not store its (older) answer."""
    await _register(served, "orders", "http://10.0.0.1:80")
    hb = Heartbeats(served.gateway.writer, max_age=3600.0)
    (inst,) = served.gateway.writer.view.instances("orders")
    real = hb._read

    async def racing(insts: list[object]) -> tuple[list[int | None], bool]:
        hb.forget("orders")  # a write lands while the read is in flight
        return await real(insts)  # type: ignore[arg-type]

    hb._read = racing  # type: ignore[method-assign]
    await hb.of([inst])
    assert hb._known == {}
    hb._read = real  # type: ignore[method-assign]
    await hb.of([inst])
    assert {n: list(ids) for n, ids in hb._known.items()} == {"orders": [inst.service_id]}


# -- the register without the framework ----------------------------------------------------


def _count_fast_registers(served: Served, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    fast = served.gateway.asgi.fast_register
    real = fast.answer
    calls: list[object] = []

    async def counted(data: object) -> bytes:
        calls.append(data)
        return await real(data)  # type: ignore[arg-type]

    monkeypatch.setattr(fast, "answer", counted)
    return calls


async def test_register_is_the_apps_answer_without_the_app(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A well-formed register is answered by the fast path with what the app answers (a
    query string sends it through Litestar): the same status, headers and body but the
    time of the heartbeat; bad bodies still get the app's refusals."""
    calls = _count_fast_registers(served, monkeypatch)
    body = {
        "service_name": "orders",
        "service_url": "http://10.0.0.1:80",
        "capabilities": ["rest"],
        "metadata": {"zone": "z1"},
        "ttl_seconds": 30,
    }
    fast = await served.client.post(REGISTER, json=body)
    assert len(calls) == 1
    slow = await served.client.post(REGISTER, json=body, params={"via": "app"})
    assert len(calls) == 1
    assert fast.status_code == slow.status_code == 200, (fast.text, slow.text)
    for header in ("content-type", "content-length"):
        assert fast.headers[header] == slow.headers[header]
    f, s = fast.json(), slow.json()
    assert f.pop("last_heartbeat") <= s.pop("last_heartbeat")
    assert f == s
    for bad in (b'{"service_name": "orders"}', b"[1,", b'{"service_name": 1}'):
        r = await served.client.post(
            REGISTER, content=bad, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert r.json()["error"] != "internal"
    assert len(calls) == 1


async def test_a_refused_register_is_the_apps_refusal_without_the_app(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the writer refuses (a conflict, a rule of the registrar) is answered by the
    fast path with the app's bytes."""
    from saga_events import model
    from saga_events.registrar import ApplyResult

    calls = _count_fast_registers(served, monkeypatch)
    registrar = served.gateway.registrar

    async def always_stale(event: model.AnyEvent, *, after_newest: bool = False) -> ApplyResult:
        return ApplyResult(status="stale", registered_at_ms=0, now_ms=0)

    body = {"service_name": "orders", "service_url": "http://10.0.0.1:80"}
    with monkeypatch.context() as m:
        m.setattr(registrar, "apply", always_stale)
        fast = await served.client.post(REGISTER, json=body)
        slow = await served.client.post(REGISTER, json=body, params={"via": "app"})
    refused = {**body, "service_url": "http://10.0.0.1:99999"}  # the registrar's rule: a port
    bad_url = [await served.client.post(REGISTER, json=refused, params=p) for p in ({}, {"v": 1})]
    assert len(calls) == 2
    for a, b in ((fast, slow), tuple(bad_url)):
        assert a.status_code == b.status_code, (a.text, b.text)
        assert a.status_code in (400, 409, 422), a.text
        assert a.content == b.content
        assert a.headers["content-type"] == b.headers["content-type"]
    assert (fast.status_code, bad_url[0].status_code) == (409, 422)


async def test_register_with_a_token_is_fast_only_when_authorized(
    registrar: Registrar, mirror: Mirror, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a token set, an authorized register takes the fast path; one without the
    token (or with two Authorization headers) gets the app's 401 and changes nothing."""
    body = {"service_name": "orders", "service_url": "http://10.0.0.1:80"}
    async with serve_gateway(registrar, mirror, redis_url, token="s3cret") as served:
        calls = _count_fast_registers(served, monkeypatch)
        denied = await served.client.post(REGISTER, json=body)
        assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
        twice = await served.client.post(
            REGISTER,
            json=body,
            headers=[("authorization", "Bearer s3cret"), ("authorization", "Bearer x")],
        )
        assert twice.status_code in (200, 401)  # the app's answer, whichever it reads
        assert calls == []
        ok = await served.client.post(
            REGISTER, json=body, headers={"authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200, ok.text
        assert len(calls) == 1
