"""``saga-events doctor``: check a deployment and say how to fix what is wrong.

Each check gives a status (``ok``, ``warn`` or ``fail``), what it found and,
when it is not ok, the fix (one line). Checked: the connection, the version,
the notification flags (CONFIG GET when allowed, else the registrar's probe),
the transport limits ``setup`` sets, the caller's rights and that the
registrar's user cannot administer Redis, latency, clock skew, the epoch and
a registrar's liveness canary; on a Sentinel or Cluster URL, every node it can discover
(one finding per node: :mod:`._doctor_nodes`). The deployment is healthy when nothing fails;
warnings are things to look at (a check this user may not run, a clock a
little off). Every check works with the least-privilege reader user: what it
may not do is reported, not guessed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from . import identity
from ._redis import TRANSIENT, close_quietly, connect, db_of
from .acl import registrar_role
from .keys import Keys
from .notify import (
    NOTIFY_SETTING,
    PROTO_MAX_BULK_LEN,
    PUBSUB_BUFFER_LIMIT,
    REQUIRED_FLAGS,
    flags_cover,
    merge_flags,
    parse_pubsub_limit,
    probe,
)

MIN_VERSION: Final = (6, 2)
SKEW_WARN_S: Final = 1.0
LATENCY_WARN_MS: Final = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check."""

    check: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def healthy(findings: list[Finding]) -> bool:
    """True when no check failed."""
    return all(f.status != "fail" for f in findings)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def _version(client: aioredis.Redis) -> Finding:
    try:
        info = await client.info("server")
    except ResponseError as exc:
        return Finding(
            "redis version",
            "warn",
            f"cannot read INFO ({exc})",
            "run doctor as a user that may run INFO to see the version",
        )
    version = _text(info.get("redis_version", "?"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(parts) == 2 and parts < MIN_VERSION:
        return Finding(
            "redis version",
            "fail",
            f"Redis {version}",
            f"upgrade to Redis {'.'.join(map(str, MIN_VERSION))} or newer "
            "(the registrar's scripts read TIME before writing)",
        )
    return Finding("redis version", "ok", f"Redis {version}")


SETUP_FIX: Final = "saga-events setup --redis ADMIN_URL (as an administrator)"


async def _flags(client: aioredis.Redis, keys: Keys) -> Finding:
    try:
        answer = await client.config_get(NOTIFY_SETTING)
    except ResponseError as exc:
        return await _probed_flags(client, keys, exc)
    current = _text(next(iter(answer.values()), b""))
    if flags_cover(current):
        return Finding("notification flags", "ok", f"{NOTIFY_SETTING} = {current!r}")
    return Finding(
        "notification flags",
        "fail",
        f"{NOTIFY_SETTING} = {current!r} lacks some of {REQUIRED_FLAGS!r}: mirrors "
        "hear of no change",
        f"{SETUP_FIX}, or CONFIG SET {NOTIFY_SETTING} {merge_flags(current)}",
    )


async def _probed_flags(client: aioredis.Redis, keys: Keys, refused: Exception) -> Finding:
    """No CONFIG: the registrar's probe, if this user may run it (the registrar role)."""
    try:
        missing = await probe(client, keys, f"doctor-{time.time_ns()}", within=5.0)
    except ResponseError:
        return Finding(
            "notification flags",
            "warn",
            f"cannot read {NOTIFY_SETTING} ({refused}) nor probe it; the canary check "
            "below shows whether notifications flow",
            "run doctor as an administrator or as the registrar's user",
        )
    except TimeoutError:
        return Finding("notification flags", "warn", "the probe got no answer in 5 s", "")
    if not missing:
        return Finding(
            "notification flags",
            "ok",
            "probe: a write's keyspace notifications arrive (KE$gx; 'e' is not probed)",
        )
    return Finding(
        "notification flags",
        "fail",
        f"probe: {NOTIFY_SETTING} lacks {missing!r}: mirrors hear of no change",
        SETUP_FIX,
    )


async def _transport(client: aioredis.Redis) -> list[Finding]:
    """proto-max-bulk-len and the pub/sub output-buffer limit (docs/SECURITY.md)."""
    try:
        bulk = int(_text(next(iter((await client.config_get("proto-max-bulk-len")).values()))))
        limits = _text(next(iter((await client.config_get("client-output-buffer-limit")).values())))
    except ResponseError as exc:
        return [
            Finding(
                "transport limits",
                "warn",
                f"cannot read proto-max-bulk-len / client-output-buffer-limit ({exc})",
                "run doctor as an administrator to check them",
            )
        ]
    findings = []
    if bulk > PROTO_MAX_BULK_LEN:
        findings.append(
            Finding(
                "proto-max-bulk-len",
                "warn",
                f"{bulk} bytes: a publisher may send a message that overflows every "
                "subscriber's output buffer (the registrar's too: events are lost)",
                f"{SETUP_FIX} (sets {PROTO_MAX_BULK_LEN})",
            )
        )
    else:
        findings.append(Finding("proto-max-bulk-len", "ok", f"{bulk} bytes"))
    pubsub = parse_pubsub_limit(limits)
    shown = " ".join(map(str, pubsub)) if pubsub else limits
    wanted = " ".join(map(str, PUBSUB_BUFFER_LIMIT))
    unlimited = pubsub is not None and pubsub[0] == 0
    if pubsub is None or unlimited or pubsub[0] < 2 * min(bulk, PROTO_MAX_BULK_LEN):
        why = (
            "unlimited: a stalled subscriber holds memory without bound"
            if unlimited
            else "too small for the largest message"
        )
        findings.append(
            Finding(
                "pubsub output buffer",
                "warn",
                f"client-output-buffer-limit pubsub {shown}: {why}",
                f"{SETUP_FIX} (sets pubsub {wanted})",
            )
        )
    else:
        findings.append(Finding("pubsub output buffer", "ok", f"pubsub {shown}"))
    return findings


#: Grants no registrar needs that hand over the server (docs/SECURITY.md).
_ADMIN_GRANTS: Final = (
    "+@all", "allcommands", "+@admin", "+@dangerous", "+config", "+acl", "+flushall",
    "+flushdb", "+debug", "+shutdown", "+module", "+keys", "+@keyspace",
)  # fmt: skip


async def _registrar_rights(client: aioredis.Redis, namespace: str, whoami: str) -> Finding:
    """The registrar's user may not administer Redis (no CONFIG, no admin commands)."""
    user = registrar_role(namespace).user
    try:
        info = await client.acl_getuser(user)
    except ResponseError:
        info = None
        if whoami == user:
            try:
                await client.config_get(NOTIFY_SETTING)
            except ResponseError:
                return Finding("registrar rights", "ok", f"{user} may not CONFIG")
            return Finding(
                "registrar rights",
                "fail",
                f"{user} may CONFIG: it can read requirepass and write files",
                f"recreate the user with the rules of `saga-events acl` ({SETUP_FIX} first)",
            )
        return Finding(
            "registrar rights",
            "warn",
            f"cannot read user {user}'s rules (ACL GETUSER refused)",
            "run doctor as an administrator to check them",
        )
    if not info:
        return Finding(
            "registrar rights",
            "warn",
            f"no ACL user {user}: the registrar runs as another (an administrator?)",
            f"create the users that `saga-events acl` prints, and run registrars as {user}",
        )
    commands: list[str] = []
    for field in ("categories", "commands"):  # a string or a list, by redis-py version
        value: Any = info.get(field) or []
        words = _text(value).split() if isinstance(value, str | bytes) else list(value)
        commands += [_text(w) for w in words]
    bad = [c for c in commands if any(c.lower().startswith(g) for g in _ADMIN_GRANTS)]
    if bad:
        return Finding(
            "registrar rights",
            "fail",
            f"{user} may {' '.join(bad)}: it can administer Redis",
            f"recreate it with the rules of `saga-events acl` ({SETUP_FIX} first)",
        )
    return Finding("registrar rights", "ok", f"{user} has no CONFIG and no admin command")


async def _whoami(client: aioredis.Redis) -> str:
    try:
        return _text(await client.execute_command("ACL", "WHOAMI"))  # type: ignore[no-untyped-call]
    except ResponseError:
        # The least-privilege users may not ask: the URL names the user.
        user = client.connection_pool.connection_kwargs.get("username")
        return str(user) if user else "(ACL WHOAMI refused)"


async def _acl(client: aioredis.Redis, keys: Keys, user: str) -> Finding:
    can: list[str] = []
    cannot: list[str] = []
    try:
        await client.smembers(keys.index)
        can.append("read the registry")
    except NoPermissionError:
        cannot.append("read the registry")
    try:
        await client.config_get(NOTIFY_SETTING)
        can.append("CONFIG")
    except NoPermissionError:
        cannot.append("CONFIG (only a registrar needs it)")
    detail = f"user {user}: can {', '.join(can) or 'nothing probed'}"
    if cannot:
        detail += f"; cannot {', '.join(cannot)}"
    if "read the registry" in cannot:
        return Finding(
            "acl",
            "fail",
            detail,
            "mirrors need the reader role: see `saga-events acl` and docs/SECURITY.md",
        )
    return Finding("acl", "ok", detail)


async def _latency(client: aioredis.Redis, n: int = 20) -> Finding:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.ping()
        samples.append((time.perf_counter() - t0) * 1000)
    median, worst = statistics.median(samples), max(samples)
    detail = f"PING round trip median {median:.2f} ms, max {worst:.2f} ms over {n}"
    if median > LATENCY_WARN_MS:
        return Finding(
            "latency",
            "warn",
            detail,
            "put registrars near Redis; agents and mirrors tolerate latency, but "
            "every change reaches mirrors that much later",
        )
    return Finding("latency", "ok", detail)


async def _clock(client: aioredis.Redis) -> Finding:
    try:
        t0 = time.time()
        sec, usec = await client.time()
        t1 = time.time()
    except ResponseError as exc:
        return Finding("clock skew", "warn", f"cannot run TIME ({exc})", "")
    skew = (sec + usec / 1e6) - (t0 + t1) / 2
    detail = f"Redis clock - host clock = {skew * 1000:+.0f} ms"
    if abs(skew) > SKEW_WARN_S:
        return Finding(
            "clock skew",
            "warn",
            detail,
            "sync both clocks (NTP). Deadlines and incarnations use Redis's clock, "
            "but registered_at and the HTTP gateway's ordering read host clocks",
        )
    return Finding("clock skew", "ok", detail)


def _epoch_finding(keys: Keys, epoch: Any) -> Finding:
    if epoch is None:
        return Finding(
            "epoch",
            "warn",
            f"no {keys.epoch}: no registrar has run here",
            "start one: saga-events registrar --redis URL",
        )
    parsed = identity.parse_epoch(epoch)
    if parsed is not None and parsed.rebuilding:
        return Finding(
            "epoch",
            "warn",
            f"{_text(epoch)}: a rebuild is in progress",
            "wait a few seconds; a rebuild left behind is finished by the "
            "next registrar that starts",
        )
    return Finding("epoch", "ok", _text(epoch))


async def _registrar(client: aioredis.Redis, keys: Keys, wait: float) -> list[Finding]:
    """Registrar liveness, seen the way a mirror sees it: its canary notifications."""
    findings = []
    try:
        epoch = await client.get(keys.epoch)
    except NoPermissionError as exc:
        findings.append(
            Finding(
                "epoch",
                "warn",
                f"cannot read {keys.epoch} ({exc})",
                "run doctor as the reader or registrar user",
            )
        )
    else:
        findings.append(_epoch_finding(keys, epoch))
    seen = 0
    pubsub = client.pubsub()
    try:
        await pubsub.psubscribe(keys.registrar_notifications)
        with anyio.move_on_after(wait):
            while not seen:
                reply = await pubsub.get_message(timeout=wait)
                if reply is not None and reply.get("type") == "pmessage":
                    seen += 1
    except NoPermissionError as exc:
        findings.append(
            Finding(
                "registrar",
                "warn",
                f"cannot subscribe to the canary ({exc})",
                "run doctor as the reader or registrar user",
            )
        )
        return findings
    finally:
        await close_quietly(pubsub)
    if seen:
        findings.append(
            Finding("registrar", "ok", "a registrar is alive and its notifications reach clients")
        )
        return findings
    registrars: list[str] | None
    try:
        registrars = [
            _text(k) async for k in client.scan_iter(match=f"{keys.prefix}registrar:*", count=1000)
        ]
    except NoPermissionError:
        registrars = None
    if registrars:
        findings.append(
            Finding(
                "registrar",
                "fail",
                f"{len(registrars)} registrar(s) alive but no liveness "
                f"notification arrived in {wait:.0f} s: notifications are off "
                "or dropped on the way",
                f"check {NOTIFY_SETTING} (see above) and any proxy between clients and Redis",
            )
        )
    else:
        what = (
            "no registrar is running (or its notification flags are off: a "
            "registrar stops its canary then)"
            if registrars == []
            else ("no registrar liveness seen (no registrar, or notifications off)")
        )
        findings.append(
            Finding(
                "registrar",
                "fail",
                f"{what} in {wait:.0f} s",
                "start one: saga-events registrar --redis URL (or saga-events up); "
                "until then agents cannot register",
            )
        )
    return findings


async def diagnose(
    redis: str, namespace: str = "default", *, canary_wait: float = 3.5
) -> list[Finding]:
    """Run every check against ``redis``; never raises for a broken deployment."""
    from ._doctor_nodes import node_findings  # it imports Finding from here

    client = connect(redis)
    # The database of the URL: the canary's notification channel names it.
    keys = Keys(namespace, db_of(client))
    try:
        try:
            await client.ping()
        except (*TRANSIENT, ResponseError) as exc:
            return [
                Finding(
                    "connect",
                    "fail",
                    f"cannot reach {redis}: {exc}",
                    "check the URL, network, password and TLS (rediss://, ?ssl_ca_certs=...)",
                ),
                *await node_findings(redis, namespace),
            ]
        findings = [Finding("connect", "ok", "PING answered")]
        findings.append(await _version(client))
        findings.append(await _flags(client, keys))
        findings.extend(await _transport(client))
        user = await _whoami(client)
        findings.append(await _acl(client, keys, user))
        findings.append(await _registrar_rights(client, namespace, user))
        findings.append(await _latency(client))
        findings.append(await _clock(client))
        findings.extend(await _registrar(client, keys, canary_wait))
        findings.extend(await node_findings(redis, namespace))
        return findings
    except TRANSIENT as exc:
        return [Finding("connect", "fail", f"lost {redis} during the checks: {exc}", "")]
    finally:
        await client.aclose()


def render(findings: list[Finding]) -> str:
    """Human-readable report, one line per check and its fix."""
    lines = []
    for f in findings:
        lines.append(f"{f.status.upper():5} {f.check}: {f.detail}")
        if f.fix and f.status != "ok":
            lines.append(f"      fix: {f.fix}")
    lines.append("healthy" if healthy(findings) else "NOT healthy")
    return "\n".join(lines)
