"""What one oversized PUBLISH costs Redis, before and after `saga-events setup`.

Issue 9: a publisher's 33 MB message overflows every subscriber's pub/sub output
buffer (the registrar is disconnected, events sent meanwhile are lost) and a 20 MB
one costs about 20 MB per subscriber for as long as the soft limit allows (60 s).
This starts a private redis-server per case, subscribes N clients that never read
(the worst case: a stalled subscriber), publishes one message and reports Redis's
used_memory right after the PUBLISH and at its peak, minus the baseline.

    python bench/hostile_publish_memory.py [--subscribers 10]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any

import anyio
import redis

from saga_events.embedded import RedisServer
from saga_events.notify import apply_setup

MB = 1024 * 1024


def _subscribe(port: int, channel: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a stalled reader
    s.sendall(f"SUBSCRIBE {channel}\r\n".encode())
    s.recv(4096)
    return s


def _case(size: int, subscribers: int, setup: bool) -> dict[str, Any]:
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        if setup:
            aio = redis.asyncio.Redis.from_url(server.url)

            async def run() -> None:
                await apply_setup(aio)
                await aio.aclose()

            anyio.run(run)
        subs = [_subscribe(server.port, "saga:{default}:events:x") for _ in range(subscribers)]
        base = int(admin.info("memory")["used_memory"])
        publisher = redis.Redis.from_url(server.url)
        t0 = time.perf_counter()
        try:
            outcome = f"delivered to {publisher.publish('saga:{default}:events:x', b'x' * size)}"
        except redis.RedisError as exc:
            outcome = f"refused ({type(exc).__name__})"
        elapsed = time.perf_counter() - t0
        mem = admin.info("memory")
        after = int(mem["used_memory"]) - base
        peak = int(mem["used_memory_peak"]) - base
        kept = sum(1 for c in admin.client_list() if c.get("sub") == "1")
        for s in subs:
            s.close()
        admin.close()
        publisher.close()
        return {
            "size_mb": size / MB, "setup": setup, "outcome": outcome,
            "used_after_mb": after / MB, "peak_mb": peak / MB,
            "subscribers_left": kept, "publish_s": elapsed,
        }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscribers", type=int, default=10)
    args = parser.parse_args()
    n = args.subscribers
    out = sys.stdout.write
    out(f"{n} subscribers that never read; one PUBLISH; Redis used_memory minus baseline\n")
    out(f"{'message':>9} {'setup':>6} {'outcome':<34} {'after':>9} {'peak':>9} {'subs left':>9}\n")
    for size, setup in [(33 * MB, False), (20 * MB, False), (33 * MB, True), (20 * MB, True),
                        (1 * MB, True)]:  # fmt: skip
        r = _case(size, n, setup)
        out(
            f"{r['size_mb']:>7.0f}MB {('yes' if setup else 'no'):>6} {r['outcome']:<34} "
            f"{r['used_after_mb']:>7.1f}MB {r['peak_mb']:>7.1f}MB {r['subscribers_left']:>5}/{n}\n"
        )


if __name__ == "__main__":
    main()
