"""The keyspace-notification flags the mirrors depend on: set them, or check them.

Mirrors learn of record changes from the change feed, and from notifications
of what no script does (Redis's own ``expired``/``evicted`` removals, on the
key-event channels) and of the registrars' liveness and the epoch (keyspace
channels), so Redis's ``notify-keyspace-events`` must hold :data:`REQUIRED_FLAGS`. Setting it is
administration (``CONFIG SET``), which the least-privilege registrar role
does not have: an administrator sets it once with ``saga-events setup`` (or
redis.conf), and :func:`apply_setup` is that bootstrap.

:class:`NotificationCheck` is what a registrar runs every few seconds:

* when its user may ``CONFIG`` (and ``manage`` is on), it merges the flags in,
  keeping every other flag, as before; on a Sentinel URL also on every
  replica the Sentinels list (:func:`ensure_flags_on_replicas`);
* otherwise it *probes*: it writes a probe key ``saga:{ns}:probe:<rid>`` with a
  1 ms expiry, reads it back once expired, and listens on that key's keyspace
  channel (which only the registrar role may subscribe to, so mirrors never
  hear it) for ``set`` (flags ``K`` and ``$``), ``expire`` (``g``) and
  ``expired`` (``x``), and on the ``expired`` key-event channel for the probe
  key's name (``E``). A PING on the same subscription marks the end: every
  notification those commands caused is queued before its PONG, so the
  verdict needs no timeout guess. ``e`` (evicted) cannot be probed without
  evicting something; ``doctor`` run as an administrator checks it.

The verdict is :attr:`NotificationCheck.ok` (``None`` until the first check)
and :attr:`NotificationCheck.reason`. The registrar stops its liveness canary
while ``ok`` is False (mirrors go stale by the canary rule) and bumps the
epoch when the flags come back (mirrors resync over the gap).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, Final

import anyio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from ._redis import TRANSIENT, close_quietly, closing, db_of
from ._topology_pool import topology_of
from .errors import NotificationConfigError
from .keys import Keys
from .topology import slot_of

log = logging.getLogger("saga_events.notify")

#: Flags the mirrors need: keyspace channel (K: the canary and the epoch),
#: key-event channel (E: ``expired``/``evicted`` of records), generic (g: del,
#: expire), string (``$``: set), expired (x) and evicted (e) events. Before
#: issue 13's key-event channels it was "Kg$xe"; merging keeps every other flag.
REQUIRED_FLAGS: Final = "KEg$xe"
_ALL_CLASSES: Final = "g$lshzxet"  # what "A" stands for in notify-keyspace-events
NOTIFY_SETTING: Final = "notify-keyspace-events"
#: The flags a probe can see, and the notification that proves each.
_PROBED: Final = {"set": "$", "expire": "g", "expired": "x"}

#: Transport limits ``setup`` applies (docs/SECURITY.md, "Transport limits").
#: proto-max-bulk-len: Redis's minimum, 64 times the largest event (16 KiB), so
#: no publisher can send the 33 MB message that overflows a subscriber.
PROTO_MAX_BULK_LEN: Final = 1024 * 1024
#: client-output-buffer-limit for pub/sub clients: Redis's own default, set
#: explicitly so that a lowered one is noticed. With 1 MB messages a subscriber
#: is cut off only 32 messages behind; a registrar cut off reconnects and the
#: next heartbeats repair what it missed.
PUBSUB_BUFFER_LIMIT: Final = (32 * 1024 * 1024, 8 * 1024 * 1024, 60)


def parse_flags(value: str) -> set[str]:
    """The flags of a ``notify-keyspace-events`` value, with ``A`` expanded."""
    flags = set(value)
    if "A" in flags:
        flags.discard("A")
        flags.update(_ALL_CLASSES)
    return flags


def flags_cover(value: str, required: str = REQUIRED_FLAGS) -> bool:
    return set(required) <= parse_flags(value)


def merge_flags(value: str, required: str = REQUIRED_FLAGS) -> str:
    """Return ``value`` with the required flags added, keeping every other flag."""
    present = set(value)
    missing = [c for c in required if c not in parse_flags(value)]
    return "".join(c for c in value if c in present) + "".join(missing)


def probe_key(keys: Keys, rid: str) -> str:
    return f"{keys.prefix}probe:{rid}"


def probe_notifications(keys: Keys) -> str:
    """The keyspace channels of the probe keys (granted to the registrar role only)."""
    return f"{keys.keyspace_prefix}{keys.prefix}probe:*"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


async def _config_get(redis: aioredis.Redis, setting: str) -> str:
    answer = await redis.config_get(setting)
    return _text({_text(k): v for k, v in answer.items()}.get(setting, b""))


async def ensure_flags(redis: aioredis.Redis) -> bool:
    """Merge the required flags into ``notify-keyspace-events``; True if changed.

    Raises :class:`NotificationConfigError` when the user may not CONFIG.
    """
    required = REQUIRED_FLAGS
    try:
        current = await _config_get(redis, NOTIFY_SETTING)
    except ResponseError as exc:
        raise NotificationConfigError(
            f"cannot read {NOTIFY_SETTING} ({exc}). An administrator sets it: "
            f"`saga-events setup --redis ADMIN_URL`, or `{NOTIFY_SETTING} {required}` "
            "in redis.conf.",
            setting=NOTIFY_SETTING,
            required=required,
        ) from None
    if flags_cover(current):
        return False
    wanted = merge_flags(current)
    try:
        await redis.config_set(NOTIFY_SETTING, wanted)
    except ResponseError as exc:
        raise NotificationConfigError(
            f"cannot set {NOTIFY_SETTING} to {wanted!r} ({exc}); the server has "
            f"{current!r}. An administrator sets it: `saga-events setup --redis "
            f"ADMIN_URL`, or add the flags {required!r} to {NOTIFY_SETTING} in redis.conf.",
            setting=NOTIFY_SETTING,
            required=required,
        ) from None
    log.info("set %s from %r to %r", NOTIFY_SETTING, current, wanted)
    return True


async def ensure_flags_on_replicas(redis: aioredis.Redis, keys: Keys | None = None) -> int:
    """Sentinel URL: merge the flags into every replica the Sentinels list; Cluster URL
    (given the registry's ``keys``): into every replica of the slot's owner. Mirrors
    with ``read_from=replica`` read there (the canary and the epoch are keyspace
    notifications), and a replica is the next master: CONFIG is not replicated.
    Return how many changed. Best effort: a replica that is down or refuses is logged
    and skipped (``doctor`` names it). Other URLs: nothing to do."""
    topology = topology_of(redis)
    if topology is None:
        return 0
    changed = 0
    slot = slot_of(keys.ns) if keys is not None else None
    try:
        replicas = await topology.replica_addresses(slot)
    except (*TRANSIENT, RedisError) as exc:
        log.debug("cannot list the replicas (%s)", exc)
        return 0
    for host, port in replicas:
        try:
            async with closing(topology.node_client((host, port))) as replica:
                changed += await ensure_flags(replica)
        except (*TRANSIENT, RedisError, NotificationConfigError) as exc:
            log.warning("cannot set %s on replica %s:%d (%s)", NOTIFY_SETTING, host, port, exc)
    return changed


async def probe(redis: aioredis.Redis, keys: Keys, rid: str, within: float = 5.0) -> str:
    """Return the required flags a probe shows missing ('' when notifications flow).

    Needs SET, EXISTS and SUBSCRIBE to the probe channel (the registrar role).
    Raises ``TimeoutError`` when the subscription does not answer ``within`` s
    (inconclusive: a slow Redis, not a verdict).
    """
    keys = Keys(keys.ns, db_of(redis))  # the channel names the connection's database
    key = probe_key(keys, rid)
    channel = keys.keyspace_prefix + key
    events = keys.expired_events
    token = "probe-" + secrets.token_hex(4)
    seen: set[str] = set()
    pubsub = redis.pubsub()
    try:
        with anyio.fail_after(within):
            await pubsub.subscribe(channel, events)
            # Confirmed before the write: the write goes out on another connection.
            confirmed = 0
            while confirmed < 2:
                message = await pubsub.get_message(timeout=within)
                if message is not None and message.get("type") == "subscribe":
                    confirmed += 1
            await redis.set(key, b"1", px=1)
            # Read it back once expired: the lookup fires `expired` (if active
            # expiry has not already). A few tries cover a coarse server clock.
            for _ in range(50):
                await anyio.sleep(0.003)
                if not await redis.exists(key):
                    break
            else:  # no verdict on `x` without an expiry: inconclusive, not "missing"
                raise TimeoutError("the probe key did not expire")
            await pubsub.ping(token)
            while True:
                message = await pubsub.get_message(timeout=within)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "message" and _text(message.get("channel")) == channel:
                    seen.add("K")
                    flag = _PROBED.get(_text(message.get("data")))
                    if flag:
                        seen.add(flag)
                elif kind == "message" and _text(message.get("channel")) == events:
                    if _text(message.get("data")) == key:
                        seen.update("Ex")
                elif kind == "pong" and _text(message.get("data")) == token:
                    break
    finally:
        await close_quietly(pubsub)
    probed = ("K", "E", *_PROBED.values())
    if "K" not in seen and "E" not in seen:
        return "".join(probed)
    if "K" in seen and "x" not in seen:
        seen.add("E")  # no expired event at all: E cannot be told; x is what lacks
    return "".join(f for f in probed if f not in seen)


@dataclass
class NotificationCheck:
    """The registrar's view of the flags: set them if allowed, else probe them.

    ``ok`` is None until the first check, then whether notifications flow;
    ``reason`` says what is wrong ('' when ok). ``may_config`` is None until
    CONFIG was tried, then whether this user may CONFIG (asked once per run:
    every refusal would add an entry to Redis's ACL LOG).
    """

    keys: Keys
    rid: str
    manage: bool = True
    probe_timeout: float = 5.0
    ok: bool | None = None
    reason: str = ""
    may_config: bool | None = None

    async def check(self, redis: aioredis.Redis) -> bool:
        """Check (and when allowed set) the flags; True when they were just repaired.

        "Repaired" means notifications had been off (this registrar re-applied
        the flags, or saw them come back): mirrors must resync over the gap.
        Transient errors propagate; nothing else does.
        """
        was_ok = self.ok
        if self.manage and self.may_config is not False:
            try:
                changed = await ensure_flags(redis)
            except NotificationConfigError as exc:
                self.may_config = False
                log.warning(
                    "this registrar may not CONFIG (%s); it checks the flags with a probe "
                    "every few seconds instead",
                    str(exc).partition(". ")[0],
                )
            else:
                self.may_config = True
                self._set(True, "")
                await ensure_flags_on_replicas(redis, self.keys)
                return changed or was_ok is False
        try:
            missing = await probe(redis, self.keys, self.rid, self.probe_timeout)
        except NoPermissionError as exc:
            self._set(False, f"cannot probe the notification flags ({exc})")
            return False
        if not missing:
            self._set(True, "")
            return was_ok is False
        self._set(
            False,
            f"{NOTIFY_SETTING} lacks {missing!r} (needs {REQUIRED_FLAGS!r}): mirrors hear "
            "of no change; an administrator runs `saga-events setup --redis ADMIN_URL`",
        )
        return False

    def _set(self, ok: bool, reason: str) -> None:
        if ok and self.ok is False:
            log.warning("keyspace notifications flow again")
        elif not ok and (self.ok is not False or reason != self.reason):
            log.error("keyspace notifications are off: %s", reason)
        self.ok, self.reason = ok, reason


@dataclass(frozen=True, slots=True)
class SetupChange:
    """One setting ``setup`` looked at: its value before and after."""

    setting: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def parse_pubsub_limit(value: str) -> tuple[int, int, int] | None:
    """(hard, soft, seconds) of the pubsub class in a client-output-buffer-limit value."""
    words = value.split()
    for i in range(0, len(words) - 3, 4):
        if words[i] == "pubsub":
            try:
                return int(words[i + 1]), int(words[i + 2]), int(words[i + 3])
            except ValueError:
                return None
    return None


async def apply_setup(
    redis: aioredis.Redis, *, proto_max_bulk_len: int | None = PROTO_MAX_BULK_LEN
) -> list[SetupChange]:
    """The administrator's bootstrap: flags merged in, transport limits set.

    Idempotent. ``proto_max_bulk_len=None`` leaves that server-wide setting
    alone (other applications on the same Redis may store bigger values).
    Raises :class:`NotificationConfigError` when the user may not CONFIG.
    """
    changes: list[SetupChange] = []
    try:
        before = await _config_get(redis, NOTIFY_SETTING)
    except ResponseError:
        before = "?"
    await ensure_flags(redis)
    changes.append(SetupChange(NOTIFY_SETTING, before, await _config_get(redis, NOTIFY_SETTING)))
    if proto_max_bulk_len is not None:
        old = await _config_get(redis, "proto-max-bulk-len")
        if old != str(proto_max_bulk_len):
            await redis.config_set("proto-max-bulk-len", proto_max_bulk_len)
        changes.append(SetupChange("proto-max-bulk-len", old, str(proto_max_bulk_len)))
    old = await _config_get(redis, "client-output-buffer-limit")
    wanted = "pubsub {} {} {}".format(*PUBSUB_BUFFER_LIMIT)
    current = parse_pubsub_limit(old)
    if current != PUBSUB_BUFFER_LIMIT:
        await redis.config_set("client-output-buffer-limit", wanted)
    changes.append(
        SetupChange(
            "client-output-buffer-limit pubsub",
            " ".join(map(str, current)) if current else old,
            " ".join(map(str, PUBSUB_BUFFER_LIMIT)),
        )
    )
    return changes


def redis_conf_lines(proto_max_bulk_len: int = PROTO_MAX_BULK_LEN) -> list[str]:
    """The same settings as redis.conf lines (merge the flags with any you have)."""
    return [
        f"{NOTIFY_SETTING} {REQUIRED_FLAGS}",
        f"proto-max-bulk-len {proto_max_bulk_len}",
        "client-output-buffer-limit pubsub {} {} {}".format(*PUBSUB_BUFFER_LIMIT),
    ]
