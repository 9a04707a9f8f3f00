"""GET /api/v1/sd/prometheus read by the real Prometheus (Debian's ``prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from saga_events import Mirror, Registrar
from saga_events._wait import eventually
from saga_events.embedded import free_port
from tests.gateway_helpers import Served, serve_gateway

pytestmark = pytest.mark.anyio

PROMETHEUS = shutil.which("prometheus")
REGISTER = "/api/v1/services/register"


@pytest.fixture
async def served(registrar: Registrar, mirror: Mirror, redis_url: str) -> AsyncIterator[Served]:
    async with serve_gateway(registrar, mirror, redis_url) as s:
        yield s


@contextmanager
def prometheus(tmp_path: Path, sd_url: str) -> Iterator[str]:
    """A Prometheus on a free port whose only job discovers its targets at ``sd_url``."""
    assert PROMETHEUS is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 500ms\n"
        "scrape_configs:\n"
        "  - job_name: saga\n"
        "    http_sd_configs:\n"
        f"      - url: {sd_url}\n"
        "        refresh_interval: 1s\n"
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def active_targets(client: httpx.AsyncClient, base: str) -> list[dict[str, Any]] | None:
    try:
        r = await client.get(f"{base}/api/v1/targets", params={"state": "active"})
    except httpx.TransportError:
        return None  # not listening yet
    if r.status_code != 200:
        return None
    targets: list[dict[str, Any]] = r.json()["data"]["activeTargets"]
    return targets


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed; .ci/run installs Debian's prometheus",
)
async def test_prometheus_discovers_and_drops_a_registered_instance(
    served: Served, tmp_path: Path
) -> None:
    """Prometheus lists a registered instance as an active target, with the saga labels,
    and drops it after the instance is deregistered."""
    r = await served.client.post(
        REGISTER,
        json={
            "service_name": "orders",
            "service_url": "http://127.0.0.1:9/metrics",
            "service_id": "orders-1",
            "capabilities": ["rest", "metrics"],
            "metadata": {"zone": "eu-1"},
        },
    )
    assert r.status_code == 200, r.text
    with prometheus(tmp_path, f"{served.base_url}/api/v1/sd/prometheus") as base:
        async with httpx.AsyncClient(timeout=5) as client:

            async def listed() -> dict[str, Any] | None:
                for t in await active_targets(client, base) or []:
                    if t["discoveredLabels"].get("__meta_saga_service_id") == "orders-1":
                        return t
                return None

            target = await eventually(listed, timeout=60, interval=0.2, what="target listed")
            labels = target["discoveredLabels"]
            assert labels["__address__"] == "127.0.0.1:9"
            assert labels["__meta_saga_service"] == "orders"
            assert labels["__meta_saga_capabilities"] == ",rest,metrics,"
            assert labels["__meta_saga_metadata_zone"] == "eu-1"
            assert labels["__meta_saga_draining"] == "false"
            assert labels["__meta_saga_url_scheme"] == "http"

            r = await served.client.delete("/api/v1/services/orders")
            assert r.status_code == 200, r.text

            async def dropped() -> bool:
                targets = await active_targets(client, base)
                return targets is not None and await listed() is None

            await eventually(dropped, timeout=60, interval=0.2, what="target dropped")
