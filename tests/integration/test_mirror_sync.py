"""SyncMirror's twins of the async mirror's reads, including changes()."""

from __future__ import annotations

import threading

import pytest

from saga_events import Added, Agent, Registrar, Removed, SyncMirror
from saga_events.embedded import RedisServer

pytestmark = pytest.mark.anyio


async def test_sync_mirror_changes_yields_what_the_view_applies(redis_server: RedisServer) -> None:
    """A blocking changes() iterator in a thread sees an agent join and leave, in order."""
    url = redis_server.url
    seen: list[object] = []
    ready = threading.Event()
    done = threading.Event()
    async with Registrar(url, rebuild_wait=0.1):
        with SyncMirror(url) as mirror:
            assert mirror.has_synced and len(mirror) == 0 and mirror.last_error is None

            def consume() -> None:
                changes = mirror.changes()
                ready.set()
                for change in changes:
                    seen.append(change)
                    if isinstance(change, Removed):
                        break
                changes.close()
                done.set()

            thread = threading.Thread(target=consume, daemon=True)
            thread.start()
            assert ready.wait(10)
            async with Agent(url, "payment", "http://10.0.0.5:80", service_id="p"):
                import anyio.to_thread

                await anyio.to_thread.run_sync(mirror.wait_for, "payment", 10)
                assert list(mirror.snapshot()) == ["saga:{default}:inst:payment:p"]
            assert await anyio.to_thread.run_sync(done.wait, 10)
    assert isinstance(seen[0], Added) and isinstance(seen[-1], Removed)
    assert seen[0].instance.service_id == "p"
