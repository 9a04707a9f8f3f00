"""Health-gated heartbeats: a failing check drains the instance, passing again
undrains it; a host whose worker threads deadlock stops looking healthy."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import anyio
import anyio.to_thread
import pytest

from saga_events import (
    Agent,
    AsyncSagaServiceDiscovery,
    Mirror,
    Registrar,
    SagaServiceDiscovery,
    ServiceNotFound,
    SyncAgent,
)
from saga_events.model import Instance
from tests.gateway_helpers import serve_gateway

pytestmark = pytest.mark.anyio


def only(mirror: Mirror, name: str) -> Instance | None:
    insts = mirror.instances(name)
    return insts[0] if insts else None


async def test_async_check_drains_with_a_reason_and_recovers(
    redis_url: str, mirror: Mirror
) -> None:
    healthy = True

    async def check() -> bool:
        if not healthy:
            raise RuntimeError("db down")
        return True

    async with Agent(redis_url, "api", "http://a:80", service_id="a", ttl=1.5, health_check=check):
        await mirror.wait_for("api", 10)
        healthy = False

        def failing(m: Mirror) -> bool:
            inst = only(m, "api")
            return inst is not None and inst.draining

        await mirror.wait_until(failing, 10)
        inst = only(mirror, "api")
        assert inst is not None and inst.metadata["health"] == "failing: RuntimeError: db down"
        with pytest.raises(ServiceNotFound):
            mirror.pick("api")
        healthy = True
        await mirror.wait_until(lambda m: (i := only(m, "api")) is not None and not i.draining, 10)
        inst = only(mirror, "api")
        assert inst is not None and "health" not in inst.metadata


async def test_sync_agent_with_deadlocked_workers_drains_within_a_bounded_time(
    redis_url: str, mirror: Mirror
) -> None:
    """A Flask-like host: requests and the health check run on the host's worker pool.
    When every worker blocks on a lock held forever, the check cannot run: draining."""
    lock = threading.Lock()
    workers = ThreadPoolExecutor(2, "host-worker")

    def handler() -> str:  # a request handler that needs the lock
        with lock:
            return "ok"

    agent = SyncAgent(
        redis_url,
        "web",
        "http://w:80",
        service_id="w",
        ttl=1.5,
        health_check=lambda: handler() == "ok",
        health_timeout=0.3,
        health_executor=workers,
    )
    await anyio.to_thread.run_sync(agent.start)
    try:
        await mirror.wait_for("web", 10)
        lock.acquire()  # the deadlock: held forever by a stuck thread
        stuck = [workers.submit(handler) for _ in range(2)]  # every worker now blocks
        await mirror.wait_until(lambda m: (i := only(m, "web")) is not None and i.draining, 15)
        inst = only(mirror, "web")
        assert inst is not None and inst.metadata["health"].startswith("failing: no answer")
        lock.release()  # the host recovers: the queued check passes again
        await mirror.wait_until(lambda m: (i := only(m, "web")) is not None and not i.draining, 15)
        assert all(f.result(timeout=5) == "ok" for f in stuck)
    finally:
        if lock.locked():
            lock.release()
        await anyio.to_thread.run_sync(agent.close)
        workers.shutdown(wait=False, cancel_futures=True)


async def test_http_heartbeat_reports_failing_and_passing(
    registrar: Registrar, mirror: Mirror, redis_url: str
) -> None:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        reg = await s.client.post(
            "/api/v1/services/register",
            json={"service_name": "go-svc", "service_url": "http://g:80", "service_id": "g"},
        )
        assert reg.status_code == 200, reg.text
        beat = "/api/v1/services/go-svc/heartbeat"
        resp = await s.client.post(beat, json={"status": "failing", "reason": "queue full"})
        assert resp.status_code == 200, resp.text
        await mirror.wait_until(lambda m: (i := only(m, "go-svc")) is not None and i.draining, 10)
        inst = only(mirror, "go-svc")
        assert inst is not None and inst.metadata["health"] == "failing: queue full"
        assert (await s.client.post(beat)).status_code == 200  # a plain beat keeps it failing
        assert (await s.client.get("/api/v1/services/go-svc")).json()["draining"] is True
        for bad in (b'{"status": "sick"}', b"{nope", b'{"status": "failing", "x": 1}'):
            resp = await s.client.post(
                beat, content=bad, headers={"Content-Type": "application/json"}
            )
            assert resp.status_code == 400, (bad, resp.text)
        resp = await s.client.post(beat, json={"status": "passing"})
        assert resp.status_code == 200, resp.text
        await mirror.wait_until(
            lambda m: (i := only(m, "go-svc")) is not None and not i.draining, 10
        )
        inst = only(mirror, "go-svc")
        assert inst is not None and "health" not in inst.metadata


@pytest.mark.parametrize("mode", ["redis", "rest"])
async def test_seed_client_health_check_drains_with_a_reason_and_recovers(
    registrar: Registrar, mirror: Mirror, redis_url: str, mode: str
) -> None:
    """``AsyncSagaServiceDiscovery(health_check=...)``: the same gate as the Agent's, in
    both transports (REST: the verdict rides in the heartbeat's body)."""
    healthy = True

    async def check() -> bool:
        if not healthy:
            raise RuntimeError("db down")
        return True

    async with serve_gateway(registrar, mirror, redis_url) as s:
        urls = {"redis_url": redis_url} if mode == "redis" else {"saga_url": s.base_url}
        async with AsyncSagaServiceDiscovery(
            **urls, ttl=1.5, heartbeat_interval=0.3, health_check=check, health_timeout=1.0
        ) as saga:
            await saga.register_service("api", "http://a:80", service_id="a")
            await mirror.wait_for("api", 10)
            healthy = False
            await mirror.wait_until(lambda m: (i := only(m, "api")) is not None and i.draining, 10)
            inst = only(mirror, "api")
            assert inst is not None and inst.metadata["health"] == "failing: RuntimeError: db down"
            with pytest.raises(ServiceNotFound):
                mirror.pick("api")
            assert (await s.client.get("/api/v1/services/api")).json()["draining"] is True
            healthy = True
            await mirror.wait_until(
                lambda m: (i := only(m, "api")) is not None and not i.draining, 10
            )
            inst = only(mirror, "api")
            assert inst is not None and "health" not in inst.metadata
            assert mirror.pick("api").service_id == "a"


@pytest.mark.parametrize("mode", ["redis", "rest"])
async def test_sync_seed_client_with_deadlocked_workers_drains(
    registrar: Registrar, mirror: Mirror, redis_url: str, mode: str
) -> None:
    """The blocking client in a Flask-like host: the check runs on the host's pool."""
    lock = threading.Lock()
    workers = ThreadPoolExecutor(1, "host-worker")

    def handler() -> str:
        with lock:
            return "ok"

    async with serve_gateway(registrar, mirror, redis_url) as s:
        urls = {"redis_url": redis_url} if mode == "redis" else {"saga_url": s.base_url}
        saga = SagaServiceDiscovery(
            **urls,
            ttl=1.5,
            heartbeat_interval=0.3,
            health_check=lambda: handler() == "ok",
            health_timeout=0.3,
            health_executor=workers,
        )
        try:
            await anyio.to_thread.run_sync(
                lambda: saga.register_service("web", "http://w:80", service_id="w")
            )
            await mirror.wait_for("web", 10)
            lock.acquire()  # the deadlock
            stuck = workers.submit(handler)  # the only worker now blocks
            await mirror.wait_until(lambda m: (i := only(m, "web")) is not None and i.draining, 15)
            inst = only(mirror, "web")
            assert inst is not None and inst.metadata["health"].startswith("failing: no answer")
            lock.release()
            await mirror.wait_until(
                lambda m: (i := only(m, "web")) is not None and not i.draining, 15
            )
            assert stuck.result(timeout=5) == "ok"
        finally:
            if lock.locked():
                lock.release()
            await anyio.to_thread.run_sync(saga.close)
            workers.shutdown(wait=False, cancel_futures=True)
