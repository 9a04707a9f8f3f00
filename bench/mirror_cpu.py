"""One mirror's CPU per change: a quick, paired measure (issue 13, "Feed").

A registrar process, one Mirror process (consuming ``changes()``), and this
driver applying N register/leave pairs through ``Registrar.apply`` 2 ms apart.
Prints the mirror process's CPU per change (psutil), raw and net of its idle
cost (canary, pings) measured over 5 s before. Run it twice back to back to
compare two trees (``PYTHONPATH=<other tree>``) or the loops::

    python bench/mirror_cpu.py [N] [uv]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from typing import Any

import anyio
import psutil


def registrar(url: str, ready: Any) -> None:
    from saga_events import Registrar

    async def main() -> None:
        async with Registrar(url, rebuild_wait=0.1):
            ready.set()
            await anyio.sleep(3600)

    anyio.run(main)


def mirror(url: str, ready: Any, uv: bool) -> None:
    from saga_events import Mirror

    async def main() -> None:
        async with Mirror(url) as m, anyio.create_task_group() as tg:

            async def consume() -> None:
                async for _change in m.changes():
                    pass

            tg.start_soon(consume)
            print(f"mirror pid {os.getpid()}", file=sys.stderr, flush=True)  # noqa: T201
            ready.set()
            await anyio.sleep(3600)

    anyio.run(main, backend_options={"use_uvloop": True} if uv else {})


def main() -> None:
    from saga_events import Registrar, model
    from saga_events.embedded import RedisServer

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    uv = len(sys.argv) > 2 and sys.argv[2] == "uv"
    with RedisServer() as srv:
        url = srv.url
        r1 = mp.Event()
        pr = mp.Process(target=registrar, args=(url, r1), daemon=True)
        pr.start()
        r1.wait(30)
        time.sleep(1.0)
        r2 = mp.Event()
        pm = mp.Process(target=mirror, args=(url, r2, uv), daemon=True)
        pm.start()
        r2.wait(30)
        p = psutil.Process(pm.pid)

        def cpu() -> float:
            t = p.cpu_times()
            return float(t.user + t.system)

        async def drive() -> None:
            async with Registrar(url, rebuild_wait=0.1) as reg:
                await anyio.sleep(1.0)
                c0, t0 = cpu(), time.monotonic()
                await anyio.sleep(5.0)
                idle = (cpu() - c0) / (time.monotonic() - t0)
                c0, t0 = cpu(), time.monotonic()
                for i in range(n):
                    await reg.apply(model.Register(
                        service_name="svc", service_id=f"i{i}", incarnation=1, seq=1,
                        service_url="http://h:1", ttl_ms=60000,
                    ))  # fmt: skip
                    await anyio.sleep(0.002)
                    await reg.apply(model.Leave(
                        service_name="svc", service_id=f"i{i}", incarnation=1, seq=2
                    ))  # fmt: skip
                    await anyio.sleep(0.002)
                await anyio.sleep(0.2)
                dur, busy = time.monotonic() - t0, cpu() - c0
                print(  # noqa: T201 - the benchmark's output
                    f"{'uvloop' if uv else 'asyncio'}: {2 * n} changes in {dur:.1f} s: "
                    f"{busy * 1000 / (2 * n):.3f} ms CPU per change raw, "
                    f"{(busy - idle * dur) * 1000 / (2 * n):.3f} net of idle "
                    f"({idle * 1000:.1f} ms/s)"
                )

        anyio.run(drive)
        pm.kill()
        pr.kill()


if __name__ == "__main__":
    main()
