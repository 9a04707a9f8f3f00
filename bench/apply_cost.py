"""Redis's own cost of the apply script per heartbeat, two scripts side by side.

One private redis-server (notifications as the registrar sets them) holds N
registered instances; then rounds of unchanged heartbeats are applied by
EVALSHA in batches of B events, alternating between the package's
``lua/apply.lua`` and, with ``--other FILE``, another version of it (same
KEYS/ARGV interface), round by round on the same server and data, so a
shared machine's load hits both alike. Measured per heartbeat: the µs Redis
counts in EVALSHA (INFO commandstats, the script and every call in it) and
redis-server's CPU (user + sys, INFO cpu), whose difference is the I/O.
Beside them, ``touch``: the same heartbeats through ``lua/touch.lua`` (the
registrar's touch path for an unchanged heartbeat that says ``since``;
``--no-touch`` leaves it out), in batches of B too.

    python bench/apply_cost.py [--n 100000] [--batch 5] [--rounds 6] [--other old_apply.lua]
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from saga_events import _wire, model, scripts
from saga_events.keys import Keys


def _cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _evalsha_usec(r: Any) -> tuple[int, int]:
    cmd = r.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return int(cmd["usec"]), int(cmd["calls"])


def _events(n: int, seq: int, inc: int, kind: type[model.Announce]) -> list[model.Announce]:
    return [
        kind(
            service_name=f"svc-{i % 500}",
            service_id=f"i-{i}",
            incarnation=inc,
            seq=seq,
            service_url=f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8080",
            metadata={"zone": "z1", "version": "1.2.3"},
            ttl_ms=60_000,
        )
        for i in range(n)
    ]


def _packed(keys: Keys, events: list[model.Announce], batch: int, sha: str) -> list[bytes]:
    out = []
    for lo in range(0, len(events), batch):
        call = list(scripts.apply_batch_call(keys, list(events[lo : lo + batch]), scripts.Limits()))
        call[1] = sha
        out.append(_wire.pack_command(tuple(call)))
    return out


def _packed_touch(keys: Keys, events: list[model.Announce], batch: int) -> list[bytes]:
    out = []
    for lo in range(0, len(events), batch):
        chunk = list(events[lo : lo + batch])
        rkeys = [keys.inst(e.service_name, e.service_id) for e in chunk]
        out.append(_wire.pack_command(scripts.touch_call(keys, rkeys, chunk)))
    return out


def _send(sock: socket.socket, reader: Any, packed: list[bytes], window: int = 64) -> None:
    """Pipelined, at most ``window`` calls in flight (a burst each, as from the intake)."""
    for lo in range(0, len(packed), window):
        part = packed[lo : lo + window]
        sock.sendall(b"".join(part))
        got = 0
        while got < len(part):
            reply = reader.gets()
            if reply is False:
                reader.feed(sock.recv(1 << 17))
                continue
            if isinstance(reply, Exception):
                raise reply
            got += 1


def main(argv: list[str] | None = None) -> int:
    import hiredis
    import redis

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--other", type=Path, default=None, help="another apply.lua to compare")
    p.add_argument("--no-touch", action="store_true", help="leave lua/touch.lua out")
    args = p.parse_args(argv)
    sources = {"package": scripts.APPLY.source}
    if args.other:
        sources["other"] = args.other.read_text()
    if not args.no_touch:
        sources["touch"] = scripts.TOUCH.source
    keys = Keys("default")
    with h.redis_server() as server:
        r = redis.Redis(server.host, server.port)
        r.config_set("notify-keyspace-events", "Kg$xe")
        shas = {}
        for name, src in sources.items():
            r.script_load(src)
            shas[name] = hashlib.sha1(src.encode()).hexdigest()
        sock = socket.create_connection((server.host, server.port))
        reader = hiredis.Reader()
        inc = model.new_incarnation()
        registers = _events(args.n, 1, inc, model.Register)
        _send(sock, reader, _packed(keys, registers, 64, shas["package"]))
        seq = 1
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in sources}
        for rnd in range(args.rounds):
            # 4 passes per script and round: every seq % 4 (the backstop's PTTL) alike.
            for name in list(sources)[:: 1 if rnd % 2 == 0 else -1]:  # alternated
                u0, _c0 = _evalsha_usec(r)
                cpu0 = _cpu(r)
                for _pass in range(4):
                    seq += 1
                    events = _events(args.n, seq, inc, model.Heartbeat)
                    if name == "touch":
                        packed = _packed_touch(keys, events, args.batch)
                    else:
                        packed = _packed(keys, events, args.batch, shas[name])
                    _send(sock, reader, packed)
                cpu1 = _cpu(r)
                u1, _c1 = _evalsha_usec(r)
                n = 4 * args.n
                results[name].append(((u1 - u0) / n, 1e6 * (cpu1 - cpu0) / n))
        statuses = r.eval("return redis.call('ZCARD', KEYS[1])", 1, keys.deadlines)
        out = [f"N={args.n} batch={args.batch} rounds={args.rounds} deadlines={statuses}"]
        for name, rows in results.items():
            ev = sorted(x for x, _ in rows)
            cpu = sorted(y for _, y in rows)
            out.append(
                f"{name:8s} evalsha µs/heartbeat median {ev[len(ev) // 2]:.2f} "
                f"(all {', '.join(f'{x:.2f}' for x, _ in rows)}); "
                f"redis CPU µs/heartbeat median {cpu[len(cpu) // 2]:.2f}"
            )
        sock.close()
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
