"""``python -m saga_events.testing.chaos``: run the chaos suite, or be one of its child processes.

Contract: with options, runs :func:`~.harness.run_chaos` and exits 0 when no invariant was
violated (1 otherwise, with the seed to replay). With a first argument starting with ``_``
(``_registrar``, ``_agent``, ``_mirror``, ``_gateway``, ``_worker``) it is a part the
harness started: it prints one ``ready ...`` line once serving, and runs until killed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time

import anyio

from ..._redis import connect
from ...agent import Agent
from ...mirror import Mirror
from .config import FAULTS, TOPOLOGY_FAULTS, ChaosConfig
from .harness import run_chaos


async def _serve_registrar(url: str, namespace: str) -> None:
    from ...registrar import Registrar

    # Production settings: rebuild_wait must outlast the agents' re-announce jitter.
    async with Registrar(url, namespace=namespace):
        print("ready", flush=True)  # noqa: T201 - the harness waits for this line
        await anyio.sleep_forever()


async def _serve_agent(
    url: str, namespace: str, name: str, svc_url: str, sid: str, ttl: str
) -> None:
    async with Agent(url, name, svc_url, service_id=sid, ttl=float(ttl), namespace=namespace):
        print("ready", flush=True)  # noqa: T201
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return  # leave the block: the agent says leave


async def _serve_mirror(url: str, namespace: str, dump: str) -> None:
    # Writes its view to ``dump`` (atomically) so the harness can compare it.
    client = connect(url, client_name="chaos-slow-mirror")
    async with Mirror(client, namespace=namespace) as mirror:
        print("ready", flush=True)  # noqa: T201
        last = b""
        while True:
            view = {k: [i.incarnation, i.seq] for k, i in mirror.snapshot().items()}
            data = json.dumps({"stale": mirror.stale, "view": view}, sort_keys=True).encode()
            if data != last:
                tmp = anyio.Path(dump + ".tmp")
                await tmp.write_bytes(data)
                await tmp.replace(dump)
                last = data
            await anyio.sleep(0.05)


async def _serve_gateway(url: str, namespace: str, port: str) -> None:
    from ...registrar import Registrar
    from ...web import run_gateway

    async with Registrar(url, namespace=namespace) as registrar, anyio.create_task_group() as tg:
        await tg.start(run_gateway, registrar, url, "127.0.0.1", int(port))
        print("ready", flush=True)  # noqa: T201
        await anyio.sleep_forever()


def _serve_worker(url: str, namespace: str, name: str, svc_url: str, ttl: str) -> None:
    """A web worker process as the seed's users write it: the blocking client, one
    name and URL shared with its sibling workers; SIGTERM/SIGINT unregisters and exits."""
    from ...client import SagaServiceDiscovery

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with SagaServiceDiscovery(redis_url=url, namespace=namespace, ttl=float(ttl)) as client:
        info = client.register_service(name, svc_url)
        print(f"ready {info.service_id}", flush=True)  # noqa: T201
        while not stop:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0].startswith("_") and os.environ.get("SAGA_CHAOS_LOG_DIR"):
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
    if args and args[0] == "_registrar":
        anyio.run(_serve_registrar, args[1], args[2])
        return 0
    if args and args[0] == "_agent":
        offset = float(args[1])
        if offset:
            real = time.time
            time.time = lambda: real() + offset  # this process's clock jumped
        anyio.run(_serve_agent, *args[2:8])  # type: ignore[arg-type]  # six strings
        return 0
    if args and args[0] == "_gateway":
        anyio.run(_serve_gateway, args[1], args[2], args[3])
        return 0
    if args and args[0] == "_worker":
        _serve_worker(*args[1:6])
        return 0
    if args and args[0] == "_mirror":
        anyio.run(_serve_mirror, args[1], args[2], args[3])
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m saga_events.testing.chaos", description=__doc__
    )
    parser.add_argument("--seed", type=int, default=None, help="replay this seed")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                        help="run this long with faults drawn at random")  # fmt: skip
    parser.add_argument("--faults", default=None, help="comma-separated kinds")
    parser.add_argument("--http-clients", type=int, default=2, help="REST clients (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: none)")
    parser.add_argument("--pick-threads", type=int, default=2, help="pick() threads (0: none)")
    parser.add_argument("--cpu-hogs", type=int, default=2, help="busy loops per fault (0: none)")
    parser.add_argument("--no-hostile", action="store_true", help="no hostile publisher")
    parser.add_argument("--no-bombs", action="store_true", help="hostile, but no JSON bombs")
    parser.add_argument("--topology", choices=["", "sentinel", "cluster"], default="",
                        help="'sentinel': the registry on a master, 2 replicas, 3 Sentinels; "
                             "--faults defaults to the topology faults")  # fmt: skip
    parser.add_argument("--replica-mirrors", type=int, default=0,
                        help="with --topology: mirrors reading from replicas")  # fmt: skip
    parser.add_argument("--ttl", type=float, default=None,
                        help="agents' TTL in s (default 3; 10 with --topology: a failover "
                             "takes longer than 3 s)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    known = (*FAULTS, *TOPOLOGY_FAULTS)
    default = {"": FAULTS, "sentinel": ("sentinel_failover",),
               "cluster": ("cluster_primary_kill", "slot_migration")}[ns.topology]  # fmt: skip
    kinds = tuple(k for k in (ns.faults or ",".join(default)).split(",") if k)
    unknown = set(kinds) - set(known)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(known)}")
    if set(kinds) & set(TOPOLOGY_FAULTS) and not ns.topology:
        parser.error("topology faults need --topology sentinel or cluster")
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(2**31)
    config = ChaosConfig(
        seed=seed, duration=ns.duration, faults=kinds, http_clients=ns.http_clients,
        workers=ns.workers, pick_threads=ns.pick_threads, cpu_hogs=ns.cpu_hogs,
        hostile=not ns.no_hostile, hostile_bombs=not ns.no_bombs, topology=ns.topology,
        replica_mirrors=ns.replica_mirrors,
        ttl=ns.ttl if ns.ttl is not None else (10.0 if ns.topology else 3.0),
    )  # fmt: skip
    if ns.soak is not None:
        config.duration = ns.soak * 60
        config.cycle = False
    report = anyio.run(run_chaos, config)
    print(report.summary())  # noqa: T201 - the command's output
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
