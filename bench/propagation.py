"""Scenario 2: propagation of register / leave / crash to M mirrors.

M mirror processes (M = 1, 10, 50, 100) watch a registry of 1,000 background
instances. The driver registers an instance (PUBLISH of the event an Agent
sends), waits until every mirror has it, makes it leave, waits again; then
SIGKILLs a process of agents (no leave) and waits until every mirror has
dropped them. Then it measures the staleness window of a poll-and-cache
client (30 s cache, as in the seed): how long after a service moves (its
record changes) each of many such clients still answers the old URL.

    python bench/propagation.py [--quick] [--mirrors 1,10,50,100] [--pairs 200]
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _propagation as prop
import _roles

from saga_events.model import new_incarnation

MOVING = "bench-moving"


def staleness(
    url: str, clients: int, cache_ttl: float, bar: Any, stream_rounds: int = 0
) -> dict[str, Any]:
    """Seconds after a record change until each poll-and-cache client sees it.

    The clients fill their caches at uniformly spread times over one cache
    period before the change (as independent clients would), then ask every
    20 ms. A mirror in the same process measures the push path beside them.
    Then ``stream_rounds`` more changes time the mirror beside ``clients``
    REST-stream clients (bench/_reststream.py).
    """
    import _pollcache
    import _reststream
    import anyio
    import httpx
    import redis.asyncio as aioredis

    from saga_events import Mirror, Updated

    async def main() -> dict[str, Any]:
        gateway = _roles.start_gateway(url)
        try:
            r = aioredis.Redis.from_url(url)
            raw = _roles.RawRedis(*_roles.host_port(url))
            inc = new_incarnation()
            old, new = "http://10.9.0.1:8080", "http://10.9.0.2:8080"
            raw.send(
                [
                    _roles.publish_cmd(
                        MOVING,
                        _roles.announce(
                            "register",
                            MOVING,
                            "mover",
                            incarnation=inc,
                            seq=1,
                            url=old,
                            ttl_ms=3_600_000,
                        ),
                    )
                ]
            )
            http = None
            if gateway is not None:
                http = httpx.AsyncClient(base_url=gateway.base_url)
                fetch = _pollcache.http_fetch(http)
                source = "HTTP gateway"
            else:
                fetch = _pollcache.redis_fetch(r, lambda name: _roles.KEYS.inst(name, "mover"))
                source = "Redis GET (no gateway)"
            async with Mirror(url) as mirror:
                with anyio.fail_after(10):
                    await mirror.wait_for(MOVING)
                seen: list[float] = []
                t_change = 0.0
                changed = anyio.Event()

                async def client(delay: float) -> None:
                    c = _pollcache.PollCacheClient(fetch, cache_ttl)
                    await anyio.sleep(delay)
                    while True:
                        service = await c.discover(MOVING)
                        if changed.is_set() and service.get("service_url") == new:
                            seen.append(time.monotonic() - t_change)
                            bar.update(1)
                            return
                        await anyio.sleep(0.02)

                mirror_seen: list[float] = []

                async def watch() -> None:
                    async for change in mirror.changes():
                        if isinstance(change, Updated) and change.instance.service_name == MOVING:
                            mirror_seen.append(time.monotonic() - t_change)
                            return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    for _ in range(clients):
                        tg.start_soon(client, random.uniform(0, cache_ttl))
                    await anyio.sleep(cache_ttl * 1.05)
                    t_change = time.monotonic()
                    raw.send(
                        [
                            _roles.publish_cmd(
                                MOVING,
                                _roles.announce(
                                    "heartbeat",
                                    MOVING,
                                    "mover",
                                    incarnation=inc,
                                    seq=2,
                                    url=new,
                                    ttl_ms=3_600_000,
                                ),
                            )
                        ]
                    )
                    changed.set()
                    # The clients end themselves once they see the change; the task
                    # group waits for them, bounded here.
                    tg.cancel_scope.deadline = anyio.current_time() + cache_ttl + 30
                stream: dict[str, Any] | None = None
                if gateway is not None and stream_rounds > 0:
                    bar.set_description("REST-stream vs mirror")

                    def move(i: int, url: str) -> None:
                        raw.send(
                            [
                                _roles.publish_cmd(
                                    MOVING,
                                    _roles.announce(
                                        "heartbeat",
                                        MOVING,
                                        "mover",
                                        incarnation=inc,
                                        seq=3 + i,
                                        url=url,
                                        ttl_ms=3_600_000,
                                    ),
                                )
                            ]
                        )

                    stream = await _reststream.measure(
                        mirror, gateway.base_url, MOVING, move, stream_rounds, clients, bar
                    )
            raw.close()
            await r.aclose()
            if http is not None:
                await http.aclose()
            return {
                "seen_s": seen,
                "mirror_s": mirror_seen,
                "source": source,
                "lost": clients - len(seen),
                "stream": stream,
            }
        finally:
            if gateway is not None:
                gateway.stop()

    return anyio.run(main)


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--mirrors", default=None, help="comma-separated M values (default 1,10,50,100)")
    p.add_argument("--pairs", type=int, default=None, help="register+leave samples per M")
    p.add_argument("--background", type=int, default=None, help="instances registered")
    p.add_argument("--profile", action="store_true", help="py-spy one watcher at the largest M")
    p.add_argument("--crash-rounds", type=int, default=None)
    p.add_argument("--cache-ttl", type=float, default=None, help="poll-and-cache TTL, s")
    p.add_argument("--clients", type=int, default=None, help="poll-and-cache clients")
    p.add_argument("--no-staleness", action="store_true", help="skip the poll-and-cache part")
    p.add_argument("--stream-rounds", type=int, default=None, help="REST-stream vs mirror moves")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    m_values = [int(x) for x in (args.mirrors or ("1,3" if q else "1,10,50,100")).split(",")]
    pairs = args.pairs or (5 if q else 200)
    background = args.background if args.background is not None else (50 if q else 1000)
    crash_rounds = args.crash_rounds if args.crash_rounds is not None else (1 if q else 3)
    victims = 2 if q else 20
    crash_ttl = 1.0 if q else 2.0
    cache_ttl = args.cache_ttl or (0.5 if q else 30.0)
    clients = args.clients or (5 if q else 100)
    stream_rounds = args.stream_rounds if args.stream_rounds is not None else (20 if q else 200)
    report = h.Report(
        "propagation",
        {
            "mirrors": m_values,
            "pairs": pairs,
            "background_instances": background,
            "crash_rounds": crash_rounds,
            "crash_victims": victims,
            "crash_ttl_s": crash_ttl,
            "poll_cache_ttl_s": cache_ttl,
            "poll_cache_clients": clients,
            "stream_rounds": stream_rounds,
            "quick": q,
        },
    )

    total = len(m_values) * (pairs + crash_rounds) + clients + stream_rounds
    with h.progress(total, "propagation") as bar:
        backend = prop.SagaBackend(crash_ttl)
        results = prop.run_backend(
            backend, m_values, background, pairs, crash_rounds, victims, bar, args.profile
        )
        prop.add_rows(report, backend.name, results)
        st: dict[str, Any] | None = None
        if not args.no_staleness:
            bar.set_description("poll-and-cache staleness")
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(h.redis_server())
                _roles.start_registrars(server.url, 1, stack)
                st = staleness(server.url, clients, cache_ttl, bar, stream_rounds)
    if st is not None:
        report.add(
            f"poll-and-cache ({cache_ttl:g} s TTL) staleness",
            "s",
            st["seen_s"],
            source=st["source"],
            lost=st["lost"],
        )
        report.add("mirror staleness (same change)", "s", st["mirror_s"])
        report.data["staleness_s"] = st["seen_s"]
        stream = st.get("stream")
        if stream:
            ms = [x * 1000 for x in stream["mirror_s"]]
            rs = [x * 1000 for x in stream["stream_s"]]
            report.add("Redis mirror, record change -> new URL", "ms", ms)
            report.add(
                f"REST-stream client x{clients}, record change -> new URL",
                "ms",
                rs,
                discoveries_that_polled=stream["polled"],
            )
            poll = report.row(f"poll-and-cache ({cache_ttl:g} s TTL) staleness").stats
            mirror_row = report.row("Redis mirror, record change -> new URL").stats
            rest_row = report.row(f"REST-stream client x{clients}, record change -> new URL").stats
            for key in ("median", "p99"):
                report.note(
                    f"{key}: REST-stream / mirror = "
                    f"{float(rest_row[key]) / float(mirror_row[key]):.2f}, "
                    f"poll-and-cache / REST-stream = "
                    f"{float(poll[key]) * 1000 / float(rest_row[key]):.0f}"
                )
    for m, s in results.items():
        report.data[f"register_ms_M{m}"] = s.all_ms["register"]

    def stat(m: int, kind: str, key: str) -> float:
        return float(report.row(f"saga-events {kind} M={m}").stats[key])

    if 1 in results:
        p50, p99 = stat(1, "register", "median"), stat(1, "register", "p99")
        report.target(
            "propagation to 1 mirror: p50 <= 1 ms, p99 <= 3 ms",
            f"register p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            p50 <= 1 and p99 <= 3,
        )
    if 50 in results:
        p50, p99 = stat(50, "register", "median"), stat(50, "register", "p99")
        report.target(
            "propagation to 50 mirrors: p50 <= 2 ms, p99 <= 10 ms",
            f"register p50 {p50:.2f} ms, p99 {p99:.2f} ms",
            p50 <= 2 and p99 <= 10,
        )
    if crash_rounds > 0:
        worst = max(stat(m, "crash", "p99") for m in results)
        report.target(
            "crash: removed from all mirrors within ttl + 500 ms, p99",
            f"ttl + {worst:.0f} ms (worst M)",
            worst <= 500,
        )
    if q:
        report.note("--quick: tiny sizes, the figures mean nothing")

    def plot(rep: h.Report, fig: Any) -> None:
        prop.plot(rep, fig, ["saga-events"])

    report.finish(args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
