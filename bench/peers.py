"""Scenario 6: the propagation scenario on saga-events, ZooKeeper and etcd.

Same machine, same run, same sample counts, same shape: 1,000 background
instances, M watcher processes (M = 1, 10, 50, 100), register / leave one
instance at a time, then crash a process holding instances (no leave) with
a 2 s TTL (saga-events agent ttl, ZooKeeper session timeout, etcd lease
TTL). ZooKeeper (kazoo ChildrenWatch on the service's znode) and etcd
(prefix watch over its JSON gateway) come from Debian's packages and are
started here; each is skipped with a message when it is not installed.

    python bench/peers.py [--quick] [--mirrors 1,10,50,100] [--pairs 100] [--only etcd,...]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import _propagation as prop


def main(argv: list[str] | None = None) -> int:
    p = h.parser(__doc__.split("\n\n")[0])
    p.add_argument("--mirrors", default=None, help="comma-separated M values (default 1,10,50,100)")
    p.add_argument("--pairs", type=int, default=None, help="register+leave samples per M (100)")
    p.add_argument("--background", type=int, default=None, help="instances registered (1000)")
    p.add_argument("--profile", action="store_true", help="py-spy one watcher at the largest M")
    p.add_argument("--crash-rounds", type=int, default=None, help="crash rounds per M (2)")
    p.add_argument("--only", default=None, help="comma-separated: saga-events,zookeeper,etcd")
    args = p.parse_args(argv)
    h.configure(args)
    q = args.quick
    m_values = [int(x) for x in (args.mirrors or ("1,2" if q else "1,10,50,100")).split(",")]
    pairs = args.pairs or (4 if q else 100)
    background = args.background if args.background is not None else (30 if q else 1000)
    crash_rounds = args.crash_rounds if args.crash_rounds is not None else (1 if q else 2)
    victims = 2 if q else 10
    crash_ttl = 2.0
    backends: list[Any] = [
        prop.SagaBackend(crash_ttl),
        prop.ZooKeeperBackend(crash_ttl),
        prop.EtcdBackend(crash_ttl),
    ]
    if args.only:
        wanted = {x.strip().lower() for x in args.only.split(",")}
        backends = [b for b in backends if b.name.lower() in wanted]
    report = h.Report(
        "peers",
        {
            "mirrors": m_values,
            "pairs": pairs,
            "background_instances": background,
            "crash_rounds": crash_rounds,
            "crash_victims": victims,
            "crash_ttl_s": crash_ttl,
            "quick": q,
        },
    )
    ran: list[str] = []
    skipped: dict[str, str] = {}
    runnable = []
    for b in backends:
        why = b.missing()
        if why is not None:
            skipped[b.name] = why
            h.say(f"skipping {b.name}: {why}")
        else:
            runnable.append(b)
    total = len(runnable) * len(m_values) * (pairs + crash_rounds)
    with h.progress(total, "peers") as bar:
        for b in runnable:
            results = prop.run_backend(
                b, m_values, background, pairs, crash_rounds, victims, bar, args.profile
            )
            prop.add_rows(report, b.name, results)
            ran.append(b.name)
    report.data["ran"] = ran
    report.data["skipped"] = skipped
    for name, why in skipped.items():
        report.note(f"{name} skipped: {why}")

    def med(name: str) -> float | None:
        try:
            return float(report.row(name).stats["median"])
        except KeyError:
            return None

    def p99(name: str) -> float | None:
        try:
            return float(report.row(name).stats["p99"])
        except KeyError:
            return None

    for m in m_values:
        ours = med(f"saga-events register M={m}")
        ours99 = p99(f"saga-events register M={m}")
        others: list[tuple[str, float, float]] = []
        for n in ran:
            a, b = med(f"{n} register M={m}"), p99(f"{n} register M={m}")
            if n != "saga-events" and a is not None and b is not None:
                others.append((n, a, b))
        if ours is None or ours99 is None or not others:
            continue
        worse = [n for n, a, b in others if ours > a or ours99 > b]
        measured = f"saga-events p50 {ours:.2f} / p99 {ours99:.2f} ms; " + "; ".join(
            f"{n} p50 {a:.2f} / p99 {b:.2f} ms" for n, a, b in others
        )
        report.target(
            f"register to M={m}: no worse than ZooKeeper and etcd (p50 and p99)",
            measured + (f" (worse than {', '.join(worse)})" if worse else ""),
            not worse,
        )
    if q:
        report.note("--quick: tiny sizes, the figures mean nothing")

    def plot(rep: h.Report, fig: Any) -> None:
        prop.plot(rep, fig, ran)

    report.finish(args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
