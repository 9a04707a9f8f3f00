"""The programs in examples/, run as users run them, against ``saga-events up`` (a subprocess).

Each example runs as its own process; the tests check through the REST API and
a push mirror that it registered, served, and left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from saga_events import SyncMirror
from saga_events.embedded import free_port
from tests.helpers import close_streams, read_lines_until, stop_process, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STARTUP = 30.0  # seconds: bound for a process to import FastAPI and answer
# uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit too.
CLEAN_EXIT = (0, -signal.SIGTERM)


@dataclass
class SagaUp:
    process: subprocess.Popen[str]
    redis_url: str
    saga_url: str
    mirror: SyncMirror


@pytest.fixture(scope="module")
def saga_up() -> Iterator[SagaUp]:
    """``saga-events up`` on free ports, with a mirror on its Redis for the checks."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "saga_events", "up", "--redis-port", "0", "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        text = "".join(read_lines_until(proc, r"Press Ctrl-C", STARTUP))
        redis_url = re.search(r"Redis:\s+(\S+)", text)
        saga_url = re.search(r"HTTP API:\s+(\S+)", text)
        assert redis_url and saga_url, text
        with SyncMirror(redis_url.group(1)) as mirror:
            yield SagaUp(proc, redis_url.group(1), saga_url.group(1), mirror)
    finally:
        assert stop_process(proc, signal.SIGINT) == 0
        if proc.stdout is not None:
            proc.stdout.close()


@contextmanager
def example(script: str, env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[str]]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAGA_")}
    full_env.update(env)
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc)
        close_streams(proc)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def service_env_for(saga_url: str, name: str, port: int) -> dict[str, str]:
    return {
        "SERVICE_NAME": name,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SAGA_SERVICE_URL": saga_url,
    }


def service_env(saga_up: SagaUp, mode: str, name: str, port: int) -> dict[str, str]:
    if mode == "rest":
        return service_env_for(saga_up.saga_url, name, port)
    env = {"SERVICE_NAME": name, "HOST": "127.0.0.1", "PORT": str(port)}
    env["SAGA_REDIS_URL"] = saga_up.redis_url
    return env


def check_registered_serves_and_leaves(saga_up: SagaUp, script: str, mode: str, name: str) -> None:
    port = free_port()
    with example(script, service_env(saga_up, mode, name, port)) as proc:
        inst = saga_up.mirror.wait_for(name, STARTUP)
        assert inst.service_url == f"http://127.0.0.1:{port}"
        assert inst.capabilities == ("rest",)
        rest = httpx.get(f"{saga_up.saga_url}/api/v1/services/{name}", timeout=5)
        assert rest.status_code == 200
        assert rest.json()["service_id"] == inst.service_id
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), STARTUP, "health")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["registered"] is True
        assert stop_process(proc) in CLEAN_EXIT
        assert proc.stderr is not None
        assert f"unregistered {name}" in proc.stderr.read()
        # It said leave: gone at once, not after its 60 s TTL.
        wait_until(lambda: not saga_up.mirror.instances(name), 5, f"{name} left")
        rest = httpx.get(f"{saga_up.saga_url}/api/v1/services/{name}", timeout=5)
        assert rest.status_code == 404


def test_fastapi_service_registers_in_lifespan_and_leaves_on_sigterm(saga_up: SagaUp) -> None:
    """The FastAPI example (REST mode) registers, answers /health, and leaves on SIGTERM."""
    check_registered_serves_and_leaves(saga_up, "fastapi_service.py", "rest", unique("orders"))


def test_flask_service_with_sync_client_registers_and_leaves(saga_up: SagaUp) -> None:
    """The Flask example (sync client, Redis mode) registers, serves, and leaves on SIGTERM."""
    check_registered_serves_and_leaves(saga_up, "flask_service.py", "redis", unique("inventory"))


def test_gateway_routes_to_discovered_service_and_falls_back(saga_up: SagaUp) -> None:
    """The gateway example forwards to a discovered instance, else to its static fallback."""
    orders, orders_port, gw_port = unique("orders"), free_port(), free_port()
    gw_env = service_env(saga_up, "redis", "gateway", gw_port)
    gw_env["SAGA_FALLBACKS"] = f"legacy=http://127.0.0.1:{orders_port}"
    gw = f"http://127.0.0.1:{gw_port}"
    with (
        example("fastapi_service.py", service_env(saga_up, "rest", orders, orders_port)),
        example("gateway.py", gw_env) as gw_proc,
    ):
        saga_up.mirror.wait_for(orders, STARTUP)
        gw_inst = saga_up.mirror.wait_for("gateway", STARTUP)
        assert set(gw_inst.capabilities) == {"rest", "graphql", "grpc"}
        wait_until(lambda: answers(f"{gw}/health"), STARTUP, "gateway health")

        routed = httpx.get(f"{gw}/{orders}/orders/7", timeout=10)
        assert routed.status_code == 200
        assert routed.json() == {"order_id": 7, "status": "shipped", "served_by": orders}
        assert routed.headers["x-saga-source"] == "registry"

        fallback = httpx.get(f"{gw}/legacy/orders/8", timeout=10)
        assert fallback.status_code == 200
        assert fallback.json()["order_id"] == 8
        assert fallback.headers["x-saga-source"] == "fallback"

        unknown = httpx.get(f"{gw}/nowhere/x", timeout=10)
        assert unknown.status_code == 502
        assert "nowhere" in unknown.json()["error"]
        assert stop_process(gw_proc) in CLEAN_EXIT
        wait_until(lambda: not saga_up.mirror.instances("gateway"), 5, "gateway left")


def test_discovery_with_retries_waits_for_a_late_service(saga_up: SagaUp) -> None:
    """The script keeps retrying until the service registers, then calls it."""
    name, port = unique("late"), free_port()
    args = ("--attempts", "30", "--base-delay", "0.1", "--max-delay", "0.5")
    env = {"SAGA_SERVICE_URL": saga_up.saga_url}
    with example("discover_with_retries.py", env, name, "/health", *args) as script:
        assert script.stderr is not None
        for line in script.stderr:  # wait until the first failed attempt is logged
            if "attempt 1/30" in line:
                break
        else:
            raise AssertionError("the script ended before its first retry")
        with example("fastapi_service.py", service_env(saga_up, "redis", name, port)):
            out, err = script.communicate(timeout=STARTUP)
        assert script.returncode == 0, err
    result = json.loads(out)
    assert result["service_url"] == f"http://127.0.0.1:{port}"
    assert result["status"] == 200
    assert result["body"]["service"] == name


def test_discovery_with_retries_gives_up_with_a_clear_error(saga_up: SagaUp) -> None:
    """When every attempt fails the script exits 1 and says why."""
    name = unique("never")
    env = {"SAGA_REDIS_URL": saga_up.redis_url}
    args = (name, "--attempts", "3", "--base-delay", "0.05")
    with example("discover_with_retries.py", env, *args) as script:
        out, err = script.communicate(timeout=STARTUP)
    assert script.returncode == 1
    assert out == ""
    assert f"giving up on {name} after 3 attempts" in err
    assert f"no live instance of service '{name}'" in err


def test_fastapi_service_starts_without_registry_and_registers_when_it_comes() -> None:
    """Registry down at start: the service still serves; once the registry is up, it registers."""
    saga_port, port, name = free_port(), free_port(), unique("early")
    env = service_env_for(f"http://127.0.0.1:{saga_port}", name, port)
    with example("fastapi_service.py", env) as service:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), STARTUP, "health")
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health == {"status": "healthy", "service": name, "registered": False}
        up = subprocess.Popen(
            [sys.executable, "-m", "saga_events", "up", "--redis-port", "0",
             "--http", f"127.0.0.1:{saga_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            text = "".join(read_lines_until(up, r"Press Ctrl-C", STARTUP))
            redis_url = re.search(r"Redis:\s+(\S+)", text)
            assert redis_url, text
            with SyncMirror(redis_url.group(1)) as mirror:
                # The client retries with backoff; no restart of the service needed.
                assert mirror.wait_for(name, STARTUP).service_url == f"http://127.0.0.1:{port}"
            wait_until(
                lambda: httpx.get(f"http://127.0.0.1:{port}/health").json()["registered"],
                5,
                "registered in /health",
            )
            assert stop_process(service) in CLEAN_EXIT
        finally:
            assert stop_process(up, signal.SIGINT) == 0
            if up.stdout is not None:
                up.stdout.close()


def test_readme_client_snippet_runs_against_saga_events_up(saga_up: SagaUp) -> None:
    """The README's client example, pointed at the running gateway, prints what it says."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("## Python client and examples", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the client section should hold exactly one Python block"
    assert '"http://localhost:8030"' in blocks[0]
    code = blocks[0].replace("http://localhost:8030", saga_up.saga_url)
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=STARTUP
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["registry", "http://10.0.0.5:8002", "fallback"]
    wait_until(lambda: not saga_up.mirror.instances("payment"), 5, "payment left")
