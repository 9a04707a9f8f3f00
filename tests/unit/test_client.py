"""The client's contract on the in-memory fake and on a scripted REST gateway (no server)."""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
import httpx
import msgspec
import pytest
from anyio.abc import TaskStatus

from saga_events import (
    AsyncSagaServiceDiscovery,
    FakeRegistry,
    InvalidEvent,
    RegistryUnavailable,
    SagaServiceDiscovery,
    ServiceNotFound,
)
from saga_events.client import _RestBackend

pytestmark = pytest.mark.anyio


# -- on the fake ---------------------------------------------------------------------------


async def test_register_then_discover_then_unregister() -> None:
    """A registered name is discoverable, and unregistering removes it."""
    registry = FakeRegistry()
    async with registry.client() as saga:
        info = await saga.register_service("payment", "http://10.0.0.5:8002", ["rest"])
        assert info.source == "registry"
        assert saga.is_registered("payment")
        found = await saga.discover_service("payment")
        assert (found.service_url, found.capabilities) == ("http://10.0.0.5:8002", ("rest",))
        assert found.service_id == info.service_id
        assert await saga.unregister_service("payment")
        with pytest.raises(ServiceNotFound):
            await saga.discover_service("payment")
    assert registry.services() == {}


async def test_leaving_the_block_unregisters_everything() -> None:
    """Closing the client says leave for every name it registered."""
    registry = FakeRegistry()
    async with registry.client() as saga:
        await saga.register_service("a", "http://a:1")
        await saga.register_service("b", "http://b:1")
        assert set(registry.services()) == {"a", "b"}
    assert registry.services() == {}
    assert sorted(action for action, *_ in registry.log) == [
        "leave",
        "leave",
        "register",
        "register",
    ]


async def test_registration_failure_does_not_raise_and_is_retried_on_refresh() -> None:
    """An unreachable registry gives a local answer; the next refresh registers."""
    registry = FakeRegistry()
    registry.available = False
    async with registry.client() as saga:
        info = await saga.register_service("svc", "http://svc:1")
        assert info.source == "local"
        assert not saga.is_registered("svc")
        assert registry.services() == {}
        registry.available = True
        assert await saga.refresh_registration("svc")
        assert saga.is_registered("svc")
        assert [i.service_id for i in registry.instances("svc")] == [info.service_id]


async def test_refresh_after_expiry_registers_again() -> None:
    """A heartbeat for an instance the registry lost becomes a new registration."""
    registry = FakeRegistry()
    async with registry.client() as saga:
        info = await saga.register_service("svc", "http://svc:1")
        assert registry.expire("svc") == 1
        assert await saga.refresh_registration("svc")
        assert [i.service_id for i in registry.instances("svc")] == [info.service_id]
        assert registry.log[-2:] == [
            ("heartbeat", "svc", info.service_id),
            ("register", "svc", info.service_id),
        ]


async def test_fallback_answers_when_not_found_or_unavailable() -> None:
    """``fallbacks`` answer for a missing service and during an outage; others raise."""
    registry = FakeRegistry()
    async with registry.client(fallbacks={"auth": "http://localhost:8001"}) as saga:
        info = await saga.discover_service("auth")
        assert (info.service_url, info.source) == ("http://localhost:8001", "fallback")
        registry.add("auth", "http://10.0.0.9:8001")
        assert (await saga.discover_service("auth")).source == "registry"
        registry.available = False
        assert (await saga.discover_service("auth")).source == "fallback"
        with pytest.raises(RegistryUnavailable) as err:
            await saga.discover_service("payment")
        assert err.value.service == "payment"


async def test_round_robin_over_instances() -> None:
    """Discovery spreads over every live instance."""
    registry = FakeRegistry()
    for i in range(3):
        registry.add("api", f"http://api-{i}:80", service_id=f"api-{i}")
    async with registry.client() as saga:
        seen = {(await saga.discover_service("api")).service_id for _ in range(6)}
    assert seen == {"api-0", "api-1", "api-2"}


@pytest.mark.parametrize(
    ("name", "url", "caps", "reason"),
    [
        ("bad name", "http://x:1", [], "bad_name"),
        ("svc", "ftp://x:1", [], "bad_url"),
        ("svc", "not a url", [], "bad_url"),
        ("svc", "http://x:1", ["has space"], "invalid"),
        ("svc", "http://x:1", "rest", "invalid"),
    ],
)
async def test_bad_arguments_raise_and_change_nothing(
    name: str, url: str, caps: list[str] | str, reason: str
) -> None:
    """Bad input gets InvalidEvent with a reason, and nothing reaches the registry."""
    registry = FakeRegistry()
    async with registry.client() as saga:
        with pytest.raises(InvalidEvent) as err:
            await saga.register_service(name, url, caps)
        assert err.value.reason == reason
        assert saga.registered_names == []
    assert registry.log == []


async def test_metadata_the_registrar_would_drop_is_refused() -> None:
    """Over-long metadata is refused by the client, as the registrar would, before sending."""
    registry = FakeRegistry()
    async with registry.client() as saga:
        with pytest.raises(InvalidEvent, match="metadata"):
            await saga.register_service("svc", "http://x:1", metadata={"k" * 200: "v"})
        with pytest.raises(InvalidEvent, match="metadata"):
            await saga.register_service("svc", "http://x:1", metadata={"k": "v" * 3000})
        assert saga.registered_names == []
    assert registry.log == []


async def test_refresh_and_unregister_of_unknown_name_return_false() -> None:
    """Names this client never registered are not touched."""
    registry = FakeRegistry()
    registry.add("other", "http://other:1")
    async with registry.client() as saga:
        assert not await saga.refresh_registration("other")
        assert not await saga.unregister_service("other")
    assert len(registry.instances("other")) == 1


async def test_async_client_needs_async_with() -> None:
    """Using the async client outside ``async with`` is a clear error, not a hang."""
    saga = FakeRegistry().client()
    with pytest.raises(RuntimeError, match="async with"):
        await saga.discover_service("x")


def test_sync_twin_registers_discovers_and_leaves_on_close() -> None:
    """The blocking client does the same through its background thread."""
    registry = FakeRegistry()
    saga = registry.sync_client(fallbacks={"auth": "http://localhost:8001"})
    try:
        info = saga.register_service("flask-svc", "http://127.0.0.1:8003", ["rest"])
        assert info.source == "registry"
        assert saga.discover_service("flask-svc").service_url == "http://127.0.0.1:8003"
        assert saga.discover_service("auth").source == "fallback"
        with pytest.raises(ServiceNotFound):
            saga.discover_service("nothing")
    finally:
        saga.close()
    assert registry.services() == {}
    saga.close()  # idempotent
    with pytest.raises(RuntimeError):
        saga.discover_service("flask-svc")


def test_sync_twin_context_manager() -> None:
    """``with SagaServiceDiscovery(...)`` unregisters on exit."""
    registry = FakeRegistry()
    with registry.sync_client() as saga:
        saga.register_service("svc", "http://svc:1")
        assert saga.registered_names == ["svc"]
        assert saga.is_registered("svc")
    assert registry.services() == {}


def test_mode_follows_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis_url wins; else SAGA_REDIS_URL, then SAGA_SERVICE_URL, then REST on :8030."""
    monkeypatch.delenv("SAGA_REDIS_URL", raising=False)
    monkeypatch.delenv("SAGA_SERVICE_URL", raising=False)
    assert SagaServiceDiscovery().mode == "rest"
    assert AsyncSagaServiceDiscovery().saga_url == "http://localhost:8030"
    assert SagaServiceDiscovery("http://x:8030", "redis://127.0.0.1:1/0").mode == "redis"
    monkeypatch.setenv("SAGA_REDIS_URL", "redis://127.0.0.1:1/0")
    assert SagaServiceDiscovery().mode == "redis"
    assert SagaServiceDiscovery(saga_url="http://x:8030").mode == "rest"


def test_bad_fallback_is_rejected() -> None:
    with pytest.raises(InvalidEvent):
        AsyncSagaServiceDiscovery("http://x:8030", fallbacks={"auth": "localhost:8001"})


# -- REST mode against a scripted gateway ------------------------------------------------------


class Gateway:
    """A scripted stand-in for the HTTP gateway: records requests, answers from a dict."""

    def __init__(self) -> None:
        self.instances: dict[str, dict[str, object]] = {}
        self.requests: list[tuple[str, str]] = []
        self.down = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        if self.down:
            raise httpx.ConnectError("gateway down", request=request)
        path = request.url.path
        if request.method == "POST" and path == "/api/v1/services/register":
            body = json.loads(request.content)
            if body["service_name"] == "refused":
                return httpx.Response(422, json={"detail": "service_name is refused"})
            record = {
                **body,
                "registered_at": "2025-01-01T00:00:00Z",
                "last_heartbeat": "2025-01-01T00:00:00Z",
            }
            self.instances[body["service_name"]] = record
            return httpx.Response(200, json=record)
        name = path.split("/")[4] if path.startswith("/api/v1/services/") else ""
        if request.method == "POST" and path.endswith("/heartbeat"):
            return httpx.Response(200 if name in self.instances else 404, json={})
        if request.method == "DELETE":
            return httpx.Response(200 if self.instances.pop(name, None) else 404, json={})
        if request.method == "GET" and name in self.instances:
            return httpx.Response(200, json=self.instances[name])
        return httpx.Response(404, json={"detail": f"no service {name}"})

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))


def rest_client(
    gateway: Gateway, clock: Callable[[], float], **kwargs: object
) -> AsyncSagaServiceDiscovery:
    backend = _RestBackend(
        "http://saga.test:8030",
        cache_ttl=30,
        timeout=1,
        api_token=None,
        heartbeat_interval=None,
        clock=clock,
        transport=httpx.MockTransport(gateway.handler),
    )
    return AsyncSagaServiceDiscovery(backend=backend, **kwargs)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rest_discovery_is_cached_for_cache_ttl() -> None:
    """Answers are reused for cache_ttl seconds, then asked again."""
    gateway, clock = Gateway(), Clock()
    gateway.instances["auth"] = {
        "service_id": "a1", "service_name": "auth", "service_url": "http://auth:1",
        "capabilities": ["rest"], "registered_at": "2025-01-01T00:00:00Z",
        "last_heartbeat": "2025-01-01T00:00:05Z", "extra": "ignored",
    }  # fmt: skip
    async with rest_client(gateway, clock) as saga:
        first = await saga.discover_service("auth")
        assert first.source == "registry"
        assert first.last_heartbeat is not None and first.last_heartbeat.second == 5
        clock.now += 29
        assert (await saga.discover_service("auth")).source == "cache"
        assert gateway.count("GET", "/auth") == 1
        clock.now += 2
        assert (await saga.discover_service("auth")).source == "registry"
        assert gateway.count("GET", "/auth") == 2


async def test_rest_serves_stale_answer_then_fallback_then_raises_when_gateway_down() -> None:
    """During an outage: the last answer (stale), else the fallback, else RegistryUnavailable."""
    gateway, clock = Gateway(), Clock()
    gateway.instances["auth"] = {
        "service_id": "a1",
        "service_name": "auth",
        "service_url": "http://auth:1",
    }
    async with rest_client(gateway, clock, fallbacks={"payment": "http://localhost:8002"}) as saga:
        await saga.discover_service("auth")
        gateway.down = True
        clock.now += 60
        stale = await saga.discover_service("auth")
        assert (stale.service_url, stale.source) == ("http://auth:1", "stale")
        assert (await saga.discover_service("payment")).source == "fallback"
        with pytest.raises(RegistryUnavailable):
            await saga.discover_service("search")


async def test_rest_404_is_service_not_found_and_not_cached() -> None:
    gateway, clock = Gateway(), Clock()
    async with rest_client(gateway, clock) as saga:
        with pytest.raises(ServiceNotFound):
            await saga.discover_service("auth")
        gateway.instances["auth"] = {
            "service_id": "a1",
            "service_name": "auth",
            "service_url": "http://a:1",
        }
        assert (await saga.discover_service("auth")).service_url == "http://a:1"


async def test_rest_failed_heartbeat_registers_again() -> None:
    """A heartbeat answered 404 (the registry lost us) is followed by a registration."""
    gateway, clock = Gateway(), Clock()
    async with rest_client(gateway, clock) as saga:
        info = await saga.register_service("svc", "http://svc:1", ["rest"])
        assert info.source == "registry" and info.registered_at is not None
        gateway.instances.clear()
        assert await saga.refresh_registration("svc")
        assert gateway.count("POST", "/heartbeat") == 1
        assert gateway.count("POST", "/register") == 2
        assert "svc" in gateway.instances
        assert await saga.refresh_registration("svc")
        assert gateway.count("POST", "/register") == 2
    assert gateway.count("DELETE", "/svc") == 1
    assert gateway.instances == {}


async def test_rest_registration_with_gateway_down_returns_local_info() -> None:
    """The host service starts anyway: no exception, ``source == 'local'``."""
    gateway, clock = Gateway(), Clock()
    gateway.down = True
    async with rest_client(gateway, clock) as saga:
        info = await saga.register_service("svc", "http://svc:1")
        assert info.source == "local"
        assert not saga.is_registered("svc")
        gateway.down = False
        assert await saga.refresh_registration("svc")
        assert saga.is_registered("svc")


async def test_rest_refused_registration_raises_invalid_event() -> None:
    gateway, clock = Gateway(), Clock()
    async with rest_client(gateway, clock) as saga:
        with pytest.raises(InvalidEvent, match="refused"):
            await saga.register_service("refused", "http://svc:1")


def test_service_info_to_dict_has_the_seed_shape() -> None:
    """ServiceInfo.to_dict() gives the seed's field names and ISO-8601 UTC times."""
    from datetime import UTC, datetime

    from saga_events import ServiceInfo

    when = datetime(2025, 1, 1, tzinfo=UTC)
    info = ServiceInfo(
        service_id="id-1",
        service_name="gateway",
        service_url="http://localhost:8000",
        capabilities=("rest", "graphql"),
        registered_at=when,
        last_heartbeat=None,
    )
    assert info.to_dict() == {
        "service_id": "id-1",
        "service_name": "gateway",
        "service_url": "http://localhost:8000",
        "capabilities": ["rest", "graphql"],
        "registered_at": "2025-01-01T00:00:00.000Z",
        "last_heartbeat": None,
        "metadata": {},
        "ttl_seconds": None,
        "draining": False,
        "source": "registry",
    }


def test_service_info_decodes_the_rest_shape_and_gives_it_back() -> None:
    """ServiceInfo.from_json reads the gateway's answer (unknown fields ignored, source is
    the client's to say); to_dict gives the same fields back."""
    import json

    from saga_events import ServiceInfo

    body = {
        "service_id": "id-1",
        "service_name": "gateway",
        "service_url": "http://localhost:8000",
        "capabilities": ["rest"],
        "registered_at": "2025-01-01T00:00:00.000Z",
        "last_heartbeat": "2025-01-01T00:00:05.250Z",
        "metadata": {"zone": "a"},
        "ttl_seconds": 30.0,
        "draining": True,
        "source": "fallback",
        "added_later": 1,
    }
    info = ServiceInfo.from_json(json.dumps(body))
    assert info.capabilities == ("rest",)
    assert (info.ttl_seconds, info.draining, info.source) == (30.0, True, "registry")
    assert info.last_heartbeat is not None and info.last_heartbeat.microsecond == 250_000
    del body["added_later"]
    assert info.to_dict() == {**body, "source": "registry"}
    with pytest.raises(msgspec.ValidationError):
        ServiceInfo.from_json(b'{"service_name": "x"}')


async def test_two_clients_of_one_app_are_two_instances() -> None:
    """The default service_id names the client's process (issue 8): two workers with the same
    name and URL are two instances, and one leaving leaves the other registered."""
    registry = FakeRegistry()
    async with registry.client() as older:
        first = await older.register_service("svc", "http://10.0.0.1:80")
        async with registry.client() as younger:
            second = await younger.register_service("svc", "http://10.0.0.1:80")
            assert second.service_id != first.service_id
            assert {i.service_id for i in registry.instances("svc")} == {
                first.service_id,
                second.service_id,
            }
        assert [i.service_id for i in registry.instances("svc")] == [first.service_id]
        assert older.is_registered("svc")
        again = await older.register_service("svc", "http://10.0.0.2:80")
        assert again.service_id == first.service_id  # one client keeps its id per name


async def test_redis_mode_registers_with_the_clients_own_url_schemes() -> None:
    """url_schemes reaches the Redis-mode agent: an allowed URL is kept, not refused."""
    async with AsyncSagaServiceDiscovery(
        redis_url="redis://127.0.0.1:1/0",  # nothing listens: the registry is down
        url_schemes=frozenset({"amqp"}),
        timeout=1.0,
    ) as saga:
        info = await saga.register_service("svc", "amqp://broker:5672")
        assert (info.source, info.service_url) == ("local", "amqp://broker:5672")
        assert saga.registered_names == ["svc"]
        with pytest.raises(InvalidEvent) as err:
            await saga.register_service("svc", "http://broker:80")
        assert err.value.reason == "bad_url"


async def test_rest_concurrent_first_registrations_start_one_keep_alive() -> None:
    """Two registrations of one name racing on the first POST share one keep-alive task."""
    gateway, clock = Gateway(), Clock()
    both_posted = anyio.Event()
    posts = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal posts
        if request.url.path.endswith("/register"):
            posts += 1
            if posts == 2:
                both_posted.set()
            await both_posted.wait()  # neither answer returns before both are in flight
        return gateway.handler(request)

    backend = _RestBackend(
        "http://saga.test:8030",
        cache_ttl=30,
        timeout=1,
        api_token=None,
        heartbeat_interval=None,
        clock=clock,
        transport=httpx.MockTransport(handler),
    )
    started: list[str] = []
    run_keep_alive = backend._run_keep_alive

    async def counting(name: str, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        started.append(name)
        await run_keep_alive(name, task_status=task_status)

    backend._run_keep_alive = counting  # type: ignore[method-assign]
    async with AsyncSagaServiceDiscovery(backend=backend) as saga:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(saga.register_service, "svc", "http://svc:1")
                tg.start_soon(saga.register_service, "svc", "http://svc:1")
        assert posts == 2
        assert started == ["svc"]
        assert saga.is_registered("svc")


def test_sync_twin_fallbacks_start_nothing_and_are_the_clients_own() -> None:
    """Reading ``fallbacks`` starts no thread; it is the dict the started client uses."""
    registry = FakeRegistry()
    saga = registry.sync_client(fallbacks={"auth": "http://localhost:8001"})
    try:
        assert saga.fallbacks == {"auth": "http://localhost:8001"}
        assert saga._owner is None and saga._client is None
        saga.fallbacks["audit"] = "http://localhost:8009"
        assert saga.discover_service("audit").service_url == "http://localhost:8009"
        assert saga.fallbacks is saga.client.fallbacks
    finally:
        saga.close()
