"""The client in Redis mode against a real redis-server and registrar (twin tests: async, sync)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import anyio
import pytest

from saga_events import (
    Agent,
    AsyncSagaServiceDiscovery,
    Mirror,
    Registrar,
    RegistryUnavailable,
    SagaServiceDiscovery,
    ServiceNotFound,
)
from saga_events.embedded import free_port
from saga_events.testing import SagaTestRegistry, eventually, registry_truth

pytestmark = pytest.mark.anyio


async def test_async_client_registers_discovers_and_leaves(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """register_service makes an instance the mirror sees; leaving the block removes it."""
    async with AsyncSagaServiceDiscovery(redis_url=redis_url) as saga:
        assert saga.mode == "redis"
        info = await saga.register_service("gateway", "http://localhost:8000", ["rest", "grpc"])
        assert info.source == "registry"
        assert saga.is_registered("gateway")
        with anyio.fail_after(2):
            inst = await mirror.wait_for("gateway")
        assert (inst.service_id, inst.capabilities) == (info.service_id, ("rest", "grpc"))
        found = await saga.discover_service("gateway")
        assert (found.service_id, found.service_url) == (info.service_id, "http://localhost:8000")
        with pytest.raises(ServiceNotFound):
            await saga.discover_service("payment")
    await eventually(lambda: not mirror.instances("gateway"), timeout=2)


async def test_registering_again_updates_the_record(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """A second register_service for a name changes its URL in place (same id)."""
    async with AsyncSagaServiceDiscovery(redis_url=redis_url) as saga:
        first = await saga.register_service("svc", "http://10.0.0.1:80")
        second = await saga.register_service("svc", "http://10.0.0.2:80")
        assert first.service_id == second.service_id
        await eventually(
            lambda: [i.service_url for i in mirror.instances("svc")] == ["http://10.0.0.2:80"],
            timeout=2,
        )


async def test_registration_without_registrar_is_retried_until_one_runs(
    redis_url: str,
) -> None:
    """No registrar listening: no exception; once one starts, the agent gets through."""
    async with AsyncSagaServiceDiscovery(redis_url=redis_url, timeout=0.5) as saga:
        info = await saga.register_service("late", "http://late:1")
        assert info.source == "local"
        assert not saga.is_registered("late")
        async with Registrar(redis_url, rebuild_wait=0.2), Mirror(redis_url) as mirror:
            with anyio.fail_after(10):
                await mirror.wait_for("late", timeout=10)
            assert saga.is_registered("late")


async def test_discovery_with_redis_down_uses_fallback_or_raises() -> None:
    """An unreachable Redis: the fallback answers; other names raise RegistryUnavailable."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with AsyncSagaServiceDiscovery(
        redis_url=url, fallbacks={"auth": "http://localhost:8001"}, discovery_timeout=0.3
    ) as saga:
        assert (await saga.discover_service("auth")).source == "fallback"
        with pytest.raises(RegistryUnavailable):
            await saga.discover_service("payment")
        info = await saga.register_service("svc", "http://svc:1")  # never raises
        assert info.source == "local"


def _discoverable(saga: SagaServiceDiscovery, name: str) -> str | None:
    try:
        return saga.discover_service(name).service_id
    except ServiceNotFound:
        return None


def _wait_sync(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def test_sync_client_registers_discovers_and_leaves_on_close(
    saga_registry: SagaTestRegistry, saga_client: SagaServiceDiscovery
) -> None:
    """The blocking twin, as a Flask app or a script uses it (on the plugin's fixtures)."""
    watcher = saga_client
    saga = SagaServiceDiscovery(redis_url=saga_registry.redis_url)
    info = saga.register_service("flask-svc", "http://127.0.0.1:8003", ["rest"])
    assert info.source == "registry"
    assert saga.refresh_registration("flask-svc")
    _wait_sync(lambda: _discoverable(watcher, "flask-svc") == info.service_id)
    assert saga_registry.wait_for("flask-svc").service_id == info.service_id
    saga.close()
    _wait_sync(lambda: _discoverable(watcher, "flask-svc") is None)
    saga_registry.wait_gone("flask-svc")


def test_registration_comes_back_after_redis_restarts_empty(
    saga_registry: SagaTestRegistry, saga_client: SagaServiceDiscovery
) -> None:
    """Redis loses everything: the registrar rebuilds; the registration comes back,
    restored from the registry's mirror (the registrar's last view, as in `up`) or
    re-announced by the client's agent, and the agent keeps it alive."""
    info = saga_client.register_service("durable", "http://10.0.0.9:80", ["rest"])
    saga_registry.wait_for("durable")
    saga_registry.restart_redis()

    def rebuilt() -> bool:
        truth = anyio.run(registry_truth, saga_registry.redis_url)
        return [i.service_id for i in truth.values()] == [info.service_id]

    _wait_sync(rebuilt, 20)
    assert saga_client.is_registered("durable")


FORGETFUL_SCRIPT = """
import sys
from saga_events import SagaServiceDiscovery

saga = SagaServiceDiscovery(redis_url=sys.argv[1])
info = saga.register_service("forgetful", "http://10.0.0.10:80", ["rest"])
print(info.source, flush=True)
# no close(): the client's atexit hook must still say leave
"""


def test_sync_client_leaves_at_interpreter_exit_without_close(
    saga_registry: SagaTestRegistry,
) -> None:
    """A script that never calls close() still unregisters when it exits, and does not hang."""
    proc = subprocess.run(
        [sys.executable, "-c", FORGETFUL_SCRIPT, saga_registry.redis_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "registry"
    # Gone from Redis well before its 60 s TTL could have removed it.
    _wait_sync(lambda: not anyio.run(registry_truth, saga_registry.redis_url), 5)
    saga_registry.wait_gone("forgetful", timeout=5)


async def test_async_client_on_the_plugin_registry_with_registrar_stopped_and_restarted(
    saga_registry: SagaTestRegistry,
) -> None:
    """The plugin's fault injection: no registrar, then one again; the client catches up."""
    saga_registry.stop_registrar()
    async with saga_registry.async_client(timeout=0.5) as saga:
        info = await saga.register_service("patient", "http://10.0.0.11:80")
        assert info.source == "local"
        saga_registry.start_registrar()
        found = await anyio.to_thread.run_sync(saga_registry.wait_for, "patient", 10.0)
        assert found.service_id == info.service_id
        await eventually(lambda: saga.is_registered("patient"), 5)


async def test_redis_user_without_publish_right_never_breaks_the_host(
    redis_url: str, registrar: Registrar, mirror: Mirror
) -> None:
    """An ACL that forbids PUBLISH: registration only logs; discovery still works."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish"
        )
    finally:
        await admin.aclose()
    limited = redis_url.replace("redis://", "redis://nopub:pw@")
    async with Agent(redis_url, "peer", "http://10.0.0.12:80"):
        await mirror.wait_for("peer", 2)
        async with AsyncSagaServiceDiscovery(redis_url=limited, timeout=1) as saga:
            info = await saga.register_service("muted", "http://10.0.0.13:80")
            assert info.source == "local"
            assert not saga.is_registered("muted")
            assert not await saga.refresh_registration("muted")
            assert (await saga.discover_service("peer")).service_url == "http://10.0.0.12:80"
        assert mirror.instances("muted") == []


CRASHING_SCRIPT = """
import os, sys
from saga_events import SagaServiceDiscovery

saga = SagaServiceDiscovery(redis_url=sys.argv[1], ttl=2.0)
info = saga.register_service("phoenix", "http://10.0.0.30:80")
print(info.source, info.service_id, flush=True)
os._exit(0)  # a crash: no leave
"""


def test_restarted_service_is_a_new_instance_and_its_crashed_record_is_reaped(
    saga_registry: SagaTestRegistry, saga_client: SagaServiceDiscovery
) -> None:
    """Each process is its own instance (issue 8): after a crash (no leave) the restarted
    service registers a new id, and the crashed one is reaped after its ttl, as any crash."""
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SCRIPT, saga_registry.redis_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    source, crashed_id = proc.stdout.split()
    assert source == "registry", proc.stderr
    assert saga_registry.wait_for("phoenix").service_id == crashed_id
    info = saga_client.register_service("phoenix", "http://10.0.0.30:80")
    assert info.service_id != crashed_id
    _wait_sync(
        lambda: [i.service_id for i in saga_registry.instances("phoenix")] == [info.service_id],
        20,
    )
    assert saga_client.is_registered("phoenix")


async def _discovered_source(saga: AsyncSagaServiceDiscovery, name: str, want: str) -> None:
    # Polls: the mirror's staleness has no public event to await.
    with anyio.fail_after(15):
        while (await saga.discover_service(name)).source != want:  # noqa: ASYNC110
            await anyio.sleep(0.05)


async def test_redis_mode_serves_the_last_view_as_stale_while_redis_is_down(
    saga_registry: SagaTestRegistry,
) -> None:
    """Redis dies: discovery keeps answering from the mirror, marked stale, then live again."""
    saga_registry.add("peer2", "http://10.0.0.40:80")
    async with saga_registry.async_client() as saga:
        assert (await saga.discover_service("peer2")).source == "registry"
        saga_registry.server.kill()
        await _discovered_source(saga, "peer2", "stale")
        assert (await saga.discover_service("peer2")).service_url == "http://10.0.0.40:80"
        saga_registry.server.start()
        await _discovered_source(saga, "peer2", "registry")
