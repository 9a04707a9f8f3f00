"""The gateway from the command line: ``saga-events up`` as a real process, the operator
commands ``register``/``deregister``, and the web stack staying out of a plain registrar."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import httpx
import pytest
from click.testing import CliRunner, Result

from saga_events import Mirror, Registrar
from saga_events.cli import main
from saga_events.embedded import free_port
from saga_events.testing import registry_truth
from tests.gateway_helpers import Served, pid_alive, saga_up, serve_gateway
from tests.helpers import registrar_process

pytestmark = pytest.mark.anyio


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


async def _cli(*args: str, env: dict[str, str] | None = None) -> Result:
    # In a thread: the gateway under test runs in this test's event loop.
    runner = CliRunner()
    return await anyio.to_thread.run_sync(
        lambda: runner.invoke(main, list(args), env=env, catch_exceptions=False)
    )


async def test_register_and_deregister_commands(served: Served) -> None:
    """Operators register and deregister through the HTTP API, readable or as JSON."""
    url = ["--saga-url", served.base_url]
    res = await _cli("register", "payment", "http://10.0.0.7:8002", "-c", "rest", "-c", "grpc",
                     "--ttl", "120", "-m", "zone=eu", *url)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.startswith("registered payment/payment-")
    assert "http://10.0.0.7:8002" in res.output and "rest,grpc" in res.output
    (inst,) = (await registry_truth(served.redis_url)).values()
    assert inst.capabilities == ("rest", "grpc")
    assert inst.ttl_ms == 120_000
    assert inst.metadata == {"zone": "eu"}

    res = await _cli("register", "payment", "http://10.0.0.8:8002", "--id", "p2", "--json", *url)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["service_id"] == "p2"

    res = await _cli("deregister", "payment", "p2", *url)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "deregistered payment: 1 instance (p2)"
    res = await _cli("deregister", "payment", "--json", *url)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {"service_name": "payment", "removed": [inst.service_id]}
    assert await registry_truth(served.redis_url) == {}


async def test_operator_commands_report_errors(served: Served) -> None:
    """A rejected registration or an unknown service exits 1 with the API's explanation."""
    url = ["--saga-url", served.base_url]
    res = await _cli("register", "payment", "ftp://10.0.0.7", *url)
    assert res.exit_code == 1
    assert "HTTP 422" in res.output and "ftp" in res.output
    res = await _cli("deregister", "nobody", *url)
    assert res.exit_code == 1
    assert "HTTP 404" in res.output and "nobody" in res.output
    res = await _cli("deregister", "nobody", "--json", *url)
    assert res.exit_code == 1
    assert json.loads(res.output)["error"] == "not_found"
    res = await _cli("register", "x", "http://a", "-m", "novalue", *url)
    assert res.exit_code == 2
    assert "KEY=VALUE" in res.output
    assert await registry_truth(served.redis_url) == {}


async def test_operator_commands_use_env_url_and_say_when_unreachable(served: Served) -> None:
    """SAGA_SERVICE_URL sets the API address; an unreachable API gets a hint, not a traceback."""
    res = await _cli(
        "register", "auth", "http://10.0.0.9:1", env={"SAGA_SERVICE_URL": served.base_url}
    )
    assert res.exit_code == 0, res.output
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    res = await _cli("deregister", "auth", "--saga-url", dead)
    assert res.exit_code == 1
    assert "cannot reach the HTTP API" in res.output and "SAGA_SERVICE_URL" in res.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_serves_the_api_and_a_signal_leaves_no_process_behind(signum: int) -> None:
    """``saga-events up`` serves the API; Ctrl-C or SIGTERM stops it and its redis-server."""
    with saga_up() as up:
        assert f"HTTP API:  {up.url}" in up.output
        health = httpx.get(f"{up.url}/health", timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok"
        body = {"service_name": "gateway", "service_url": "http://localhost:8000"}
        reg = httpx.post(f"{up.url}/api/v1/services/register", json=body, timeout=10)
        assert reg.status_code == 200
        children = up.children()
        assert children, "up started no redis-server"
        code = up.stop(signum)
        assert code == 0, up.output
        assert "stopped redis-server" in up.output
        assert [pid for pid in children if pid_alive(pid)] == []


def test_up_token_from_the_environment_guards_writes() -> None:
    """SAGA_API_TOKEN given to ``up`` makes writes need the bearer token."""
    with saga_up(env={"SAGA_API_TOKEN": "tok-123"}) as up:
        body = {"service_name": "gateway", "service_url": "http://localhost:8000"}
        denied = httpx.post(f"{up.url}/api/v1/services/register", json=body, timeout=10)
        assert denied.status_code == 401
        ok = httpx.post(f"{up.url}/api/v1/services/register", json=body, timeout=10,
                        headers={"Authorization": "Bearer tok-123"})  # fmt: skip
        assert ok.status_code == 200


def test_registrar_without_http_never_imports_the_web_stack(redis_url: str) -> None:
    """``saga-events registrar`` without --http runs without importing Litestar or uvicorn."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "saga_events",
            "registrar",
            "--redis",
            redis_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bounded by the test timeout; the banner ends with:
            if "Press Ctrl-C to stop." in line:
                break
        else:
            raise AssertionError("registrar never got ready")
        proc.send_signal(signal.SIGINT)
        _, imports = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    assert "saga_events.registrar" in imports  # the trace is there...
    web_stack = ("litestar", "uvicorn", "prometheus_client", "saga_events.web.server")
    for module in web_stack:  # ...without the web stack
        assert not re.search(rf"\|\s+{re.escape(module)}$", imports, re.M), f"{module} imported"


def test_registrar_with_http_serves_the_api(redis_url: str) -> None:
    """``saga-events registrar --redis URL --http HOST:PORT`` serves the same API."""
    port = free_port()
    with registrar_process(redis_url, "--http", f"127.0.0.1:{port}") as proc:
        assert proc.stdout is not None
        banner = []
        for line in proc.stdout:  # bounded by the test timeout
            banner.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        assert f"HTTP API:  http://127.0.0.1:{port}" in "".join(banner), banner
        body = {"service_name": "inventory", "service_url": "grpc://10.0.0.3:50051"}
        reg = httpx.post(f"http://127.0.0.1:{port}/api/v1/services/register", json=body, timeout=10)
        assert reg.status_code == 200, reg.text
        got = httpx.get(f"http://127.0.0.1:{port}/api/v1/services/inventory", timeout=10)
        assert got.json()["service_url"] == "grpc://10.0.0.3:50051"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_up_on_a_busy_http_port_fails_clearly_and_cleans_up() -> None:
    """A taken HTTP port stops ``up`` with a one-line reason, and its redis-server with it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "saga_events", "up", "--redis-port", "0",
             "--http", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stopped redis-server" in proc.stdout + proc.stderr
