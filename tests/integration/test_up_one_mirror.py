"""`saga-events up` (registrar + HTTP gateway in one process) runs one mirror.

The gateway's mirror is also the registrar's last view: an instance written
only through HTTP (no agent re-announces it) is restored after Redis restarts
empty.
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import httpx
import pytest

from saga_events import cli
from saga_events.embedded import RedisServer
from saga_events.mirror import Mirror
from saga_events.testing import eventually

pytestmark = pytest.mark.anyio


async def test_up_runs_one_mirror_and_restores_an_http_only_instance(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Mirror] = []
    real_init = Mirror.__init__

    def counting_init(self: Mirror, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Mirror, "__init__", counting_init)
    ready = anyio.Event()
    parts: dict[str, Any] = {}

    def on_ready(registrar: Any, address: Any) -> None:
        parts.update(registrar=registrar, address=address)
        ready.set()

    serve = functools.partial(
        cli._serve_registrar, redis_server.url, "default", True, on_ready, ("127.0.0.1", 0)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        with anyio.fail_after(30):
            await ready.wait()
        registrar = parts["registrar"]
        host, port = parts["address"]
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as http:
            body = {"service_name": "svc", "service_url": "http://10.0.0.9:80"}
            answer = await http.post("/api/v1/services/register", json=body)
            assert answer.status_code == 200, answer.text
            sid = answer.json()["service_id"]
            assert len(built) == 1  # the gateway's mirror; the registrar runs none of its own
            mirror = built[0]
            await mirror.wait_for("svc", 5)
            redis_server.kill()
            await mirror.wait_until(lambda m: m.stale, 5)
            redis_server.start()
            await mirror.wait_until(lambda m: not m.stale, 15)
            await eventually(lambda: registrar.stats.restored == 1, 10)
            listed = await http.get("/api/v1/services/svc")
            assert listed.status_code == 200, listed.text
            assert sid in listed.text
        assert len(built) == 1
        tg.cancel_scope.cancel()
