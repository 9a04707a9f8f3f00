"""The seed's client patterns, against ``saga-events up`` started as a subprocess.

The seed documents Python clients that speak the REST API with ``requests`` and
``aiohttp``. The functions below are written here (not copied) and make exactly
the same HTTP calls, in the same way: the base URL read from
``SAGA_SERVICE_URL`` with ``http://localhost:8030`` as the default, the same
paths, JSON bodies, ``raise_for_status()`` where the seed calls it, a 404
check before it where the seed has one, and re-registration on any non-200
heartbeat.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import anyio
import pytest
import requests
from aiohttp import web

from saga_events.embedded import free_port
from tests.gateway_helpers import SagaUp, saga_up

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def saga() -> Iterator[SagaUp]:
    with saga_up() as up:
        yield up


@pytest.fixture
def saga_env(saga: SagaUp, monkeypatch: pytest.MonkeyPatch) -> str:
    # The seed's clients read the address from SAGA_SERVICE_URL; they name the
    # host "localhost", so the test does too.
    url = saga.url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("SAGA_SERVICE_URL", url)
    return url


def saga_url() -> str:
    return os.getenv("SAGA_SERVICE_URL", "http://localhost:8030")


# -- a requests-based register/unregister client ------------------------------------------


class BlockingRegistryClient:
    """Registers one service on start-up and removes it on shutdown, with ``requests``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.name: str | None = None

    def register(self, name: str, url: str, capabilities: list[str]) -> bool:
        try:
            reply = requests.post(
                f"{self.base}/api/v1/services/register",
                json={"service_name": name, "service_url": url, "capabilities": capabilities},
                timeout=5,
            )
            reply.raise_for_status()
        except requests.RequestException:
            return False
        self.name = name
        return True

    def unregister(self) -> None:
        if self.name is None:
            return
        requests.delete(f"{self.base}/api/v1/services/{self.name}", timeout=5)


def test_requests_client_registers_and_unregisters(saga_env: str) -> None:
    """The requests client's register answers 2xx and its unregister removes the service."""
    client = BlockingRegistryClient(saga_url())
    assert client.register("gateway", "http://localhost:8000", ["rest", "graphql", "grpc"])
    found = requests.get(f"{saga_url()}/api/v1/services/gateway", timeout=5)
    assert found.status_code == 200
    assert found.json()["capabilities"] == ["rest", "graphql", "grpc"]
    assert found.json()["service_url"] == "http://localhost:8000"
    client.unregister()
    assert requests.get(f"{saga_url()}/api/v1/services/gateway", timeout=5).status_code == 404


# -- aiohttp: discover, then call, with a 404 fallback ----------------------------------------


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, str]]:
    """Two small JSON services: the one that registers, and a static fallback."""

    def app(tag: str) -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            return web.json_response({"served_by": tag, "path": request.path})

        application = web.Application()
        application.router.add_get("/{tail:.*}", handler)
        return application

    runners: list[web.AppRunner] = []
    urls: dict[str, str] = {}
    for tag in ("discovered", "fallback"):
        runner = web.AppRunner(app(tag))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        urls[tag] = f"http://127.0.0.1:{port}"
    try:
        yield urls
    finally:
        for runner in runners:
            await runner.cleanup()


async def call_via_registry(
    base: str, service: str, path: str, fallbacks: dict[str, str]
) -> dict[str, Any]:
    """Look the service up; on 404 (or any failure) call its static fallback instead."""
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/api/v1/services/{service}") as response:
                if response.status == 404:
                    return await call_fallback(service, path, fallbacks)
                response.raise_for_status()
                found = await response.json()
            async with session.get(f"{found['service_url']}{path}") as service_response:
                result: dict[str, Any] = await service_response.json()
                return result
    except aiohttp.ClientError:
        return await call_fallback(service, path, fallbacks)


async def call_fallback(service: str, path: str, fallbacks: dict[str, str]) -> dict[str, Any]:
    base_url = fallbacks.get(service)
    if base_url is None:
        raise ValueError(f"Unknown service: {service}")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}{path}") as response:
            result: dict[str, Any] = await response.json()
            return result


async def test_aiohttp_discover_and_call_with_404_fallback(
    saga_env: str, backends: dict[str, str]
) -> None:
    """An unknown service takes the fallback (the API answers 404); once registered, the
    discovered URL is called; after it leaves, the fallback again."""
    fallbacks = {"authentication": backends["fallback"]}
    before = await call_via_registry(saga_url(), "authentication", "/users/1", fallbacks)
    assert before == {"served_by": "fallback", "path": "/users/1"}

    client = BlockingRegistryClient(saga_url())
    registered = await anyio.to_thread.run_sync(
        client.register, "authentication", backends["discovered"], ["rest"]
    )
    assert registered
    during = await call_via_registry(saga_url(), "authentication", "/users/1", fallbacks)
    assert during == {"served_by": "discovered", "path": "/users/1"}

    await anyio.to_thread.run_sync(client.unregister)
    after = await call_via_registry(saga_url(), "authentication", "/users/1", fallbacks)
    assert after["served_by"] == "fallback"
    with pytest.raises(ValueError, match="Unknown service"):
        await call_via_registry(saga_url(), "nowhere", "/", fallbacks)


# -- heartbeat loops that re-register on a non-200 ---------------------------------------------


class AsyncServiceLifecycle:
    """A service's registration, heartbeat loop and shutdown with aiohttp."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.log: list[str] = []

    async def register_service(self) -> bool:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(
                    f"{saga_url()}/api/v1/services/register",
                    json={
                        "service_name": self.name,
                        "service_url": self.url,
                        "capabilities": ["rest"],
                    },
                ) as response:
                    response.raise_for_status()
                    result = await response.json()
                    self.log.append(f"registered {result['service_id']}")
                    return True
            except aiohttp.ClientError as exc:
                self.log.append(f"register failed: {exc}")
                return False

    async def unregister_service(self) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.delete(f"{saga_url()}/api/v1/services/{self.name}") as response:
                response.raise_for_status()
                self.log.append("unregistered")

    async def heartbeat_loop(self, beats: int, interval: float) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(beats):
                try:
                    async with session.post(
                        f"{saga_url()}/api/v1/services/{self.name}/heartbeat"
                    ) as response:
                        if response.status == 200:
                            self.log.append("heartbeat ok")
                        else:
                            self.log.append(f"heartbeat {response.status}")
                            await self.register_service()
                except aiohttp.ClientError:
                    await self.register_service()
                await anyio.sleep(interval)


async def test_aiohttp_heartbeat_loop_reregisters_after_a_non_200(saga_env: str) -> None:
    """Heartbeats answer 200 while registered; when the registration is gone the heartbeat
    gets 404, the loop registers again, and the service is discoverable again."""
    svc = AsyncServiceLifecycle("my-python-service", "http://localhost:8002")
    assert await svc.register_service()
    await svc.heartbeat_loop(beats=2, interval=0)
    assert svc.log[-2:] == ["heartbeat ok", "heartbeat ok"]

    # The registry loses the instance (an operator removed it, or it expired).
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{saga_url()}/api/v1/services/{svc.name}") as response:
            assert response.status == 200
    await svc.heartbeat_loop(beats=2, interval=0)
    assert svc.log[-3:] == [
        "heartbeat 404",
        f"registered {svc.log[0].split()[1]}",  # the same id again: idempotent
        "heartbeat ok",
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{saga_url()}/api/v1/services/{svc.name}") as response:
            assert response.status == 200
    await svc.unregister_service()
    assert svc.log[-1] == "unregistered"


def test_requests_heartbeat_loop_reregisters_after_a_non_200(saga_env: str) -> None:
    """The threaded requests variant: heartbeat, and register again whenever it is not 200."""
    name, url = "my-flask-service", "http://localhost:8003"
    events: list[str] = []

    def register_service() -> None:
        reply = requests.post(
            f"{saga_url()}/api/v1/services/register",
            json={"service_name": name, "service_url": url, "capabilities": ["rest"]},
            timeout=5,
        )
        reply.raise_for_status()
        events.append("registered")

    def beat() -> None:
        reply = requests.post(f"{saga_url()}/api/v1/services/{name}/heartbeat", timeout=5)
        if reply.status_code == 200:
            events.append("heartbeat ok")
        else:
            events.append(f"heartbeat {reply.status_code}")
            register_service()

    beat()  # never registered: 404, then registers
    beat()
    requests.delete(f"{saga_url()}/api/v1/services/{name}", timeout=5)
    beat()
    assert events == [
        "heartbeat 404",
        "registered",
        "heartbeat ok",
        "heartbeat 404",
        "registered",
    ]
    listing = requests.get(f"{saga_url()}/api/v1/services", timeout=5).json()
    assert [i["service_url"] for i in listing["services"][name]] == [url]
    requests.delete(f"{saga_url()}/api/v1/services/{name}", timeout=5)


def test_cached_lookup_reads_the_seed_shape(saga_env: str) -> None:
    """The seed's cached lookup GETs a service and reads its fields, including the times."""
    requests.post(
        f"{saga_url()}/api/v1/services/register",
        json={
            "service_name": "payment",
            "service_url": "http://localhost:8002",
            "capabilities": ["rest"],
        },
        timeout=5,
    ).raise_for_status()
    reply = requests.get(f"{saga_url()}/api/v1/services/payment", timeout=5)
    reply.raise_for_status()
    service = reply.json()
    for key in ("service_name", "service_url", "service_id", "registered_at", "last_heartbeat",
                "capabilities"):  # fmt: skip
        assert key in service
    assert service["registered_at"].endswith("Z")
    requests.delete(f"{saga_url()}/api/v1/services/payment", timeout=5)


def test_up_serves_on_port_8030_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --http, ``saga-events up`` serves the API where the seed's clients look."""
    from click.testing import CliRunner

    from saga_events.cli import main

    monkeypatch.delenv("SAGA_HTTP", raising=False)
    help_text = CliRunner().invoke(main, ["up", "--help"]).output
    assert "127.0.0.1:8030" in help_text
    monkeypatch.delenv("SAGA_SERVICE_URL", raising=False)
    assert saga_url() == "http://localhost:8030"
