"""Least-privilege Redis ACL roles for a saga-events namespace.

Three roles, one Redis user each (docs/SECURITY.md explains every rule):

User names are ``saga-<role>`` in the default namespace and
``saga-<namespace>-<role>`` in others.

* **publisher** (one user per service, ``saga-pub-<service>``): PUBLISH to its
  own service's events channel and SUBSCRIBE to ``control``; no keys at all.
  The registrar rejects an event whose ``service_name`` differs from its
  channel's, so a stolen publisher password speaks for one service only.
* **reader** (``saga-ro``, mirrors and ``saga-events ls``): GET, MGET and
  SMEMBERS on the namespace's keys, and (P)SUBSCRIBE to exactly the
  notification channels the mirror uses (the canary pattern, the epoch channel,
  the database's ``expired``/``evicted`` key-event channels, and the records'
  keyspace pattern older mirrors used) and the change feed (``saga:{ns}:feed``,
  which the registrar's scripts PUBLISH to). ACL matches a PSUBSCRIBE pattern
  literally, so the grants are the mirror's own patterns. The key-event channels
  carry the names of every expiring key of the database: on a Redis shared with
  other applications, give the registry a database of its own (``--db``).
* **registrar** (``saga-registrar``): writes the namespace's keys, only through
  the commands its Lua scripts, housekeeping and HTTP gateway use. No role
  has CONFIG or any other administration: the notification flags and the
  transport limits are set once by an administrator (``saga-events setup``),
  and a registrar without CONFIG checks the flags with a probe key whose
  keyspace channel only this role may hear (:mod:`saga_events.notify`). It
  also holds the reader's rights because the HTTP gateway runs a mirror in
  the registrar process.

A registry in a database other than 0 (``--db N``) gives every role
``+select|N``: SELECT of that database only.

The rules are built from :class:`~saga_events.keys.Keys`, so they follow the
key layout rather than repeat it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .keys import Keys, is_valid_name
from .notify import probe_notifications

PASSWORD_PLACEHOLDER = "<password>"

_READER_COMMANDS = (
    "get",
    "mget",
    "smembers",
    "psubscribe",
    "punsubscribe",
    "subscribe",
    "unsubscribe",
    "ping",
)
# TIME: agents base their incarnation on Redis's clock (see Agent.run).
_PUBLISHER_COMMANDS = ("publish", "subscribe", "unsubscribe", "ping", "time")
# Everything the registrar and its HTTP gateway send, including the commands
# inside the Lua scripts (Redis checks those against the caller's ACL too).
# Counters (incr, incrby, hincrby, zcard, scard, hlen) are for the registry
# revision and the instance caps. No CONFIG, no admin: see the module doc.
_REGISTRAR_COMMANDS = (
    "evalsha",
    "eval",
    "script|load",
    "get",
    "mget",
    "set",
    "del",
    "exists",
    "sadd",
    "srem",
    "smembers",
    "scard",
    "zadd",
    "zrem",
    "zscore",
    "zcard",
    "zrangebyscore",
    "hget",
    "hmget",
    "hset",
    "hdel",
    "hlen",
    "hincrby",
    "incr",
    "incrby",
    "pttl",
    "pexpire",
    "time",
    "publish",
    "psubscribe",
    "punsubscribe",
    "subscribe",
    "unsubscribe",
    "ping",
    # used only inside the scripts (lua/*.lua): caps, restore, stall grace
    *("sismember", "hexists", "zremrangebyscore"),
)


@dataclass(frozen=True, slots=True)
class Role:
    """One Redis user: its name, what it is for, and its ACL rules (without password)."""

    user: str
    purpose: str
    rules: tuple[str, ...]

    def setuser_args(self, password: str) -> list[str]:
        """Arguments for ``ACL SETUSER`` (after the user name), ready for execute_command."""
        return ["reset", "on", f">{password}", *self.rules]

    def setuser_line(self, password: str = PASSWORD_PLACEHOLDER) -> str:
        """The ``ACL SETUSER`` command as one line for redis-cli."""
        return " ".join(["ACL", "SETUSER", self.user, *self.setuser_args(password)])

    def acl_file_line(self, password: str = PASSWORD_PLACEHOLDER) -> str:
        """The same user as a line of a Redis ``aclfile``."""
        return " ".join(["user", self.user, *self.setuser_args(password)])


def _user(namespace: str, role: str) -> str:
    # Users are server-wide: name the namespace unless it is the default one.
    return f"saga-{role}" if namespace == "default" else f"saga-{namespace}-{role}"


def _commands(names: Iterable[str], db: int = 0) -> tuple[str, ...]:
    # redis-py sends SELECT on connect for a URL's database other than 0.
    select = (f"+select|{db}",) if db else ()
    return ("-@all", *(f"+{n}" for n in names), *select)


def publisher_role(service: str, namespace: str = "default", db: int = 0) -> Role:
    """The user of one service's agents: publish its own events, hear ``control``."""
    if not is_valid_name(service):
        raise ValueError(f"invalid service name {service!r}")
    keys = Keys(namespace)
    return Role(
        user=_user(namespace, f"pub-{service}"),
        purpose=f"agents of service {service!r}: announce, heartbeat, leave",
        rules=(
            "resetkeys",
            "resetchannels",
            f"&{keys.events(service)}",
            f"&{keys.control}",
            *_commands(_PUBLISHER_COMMANDS, db),
        ),
    )


def reader_role(namespace: str = "default", db: int = 0) -> Role:
    """The user of mirrors: read the registry and follow its notifications."""
    keys = Keys(namespace, db)
    return Role(
        user=_user(namespace, "ro"),
        purpose="mirrors and `saga-events ls/watch`: read the registry, follow changes",
        rules=(
            "resetkeys",
            f"~{keys.prefix}*",
            "resetchannels",
            f"&{keys.inst_notifications}",
            f"&{keys.expired_events}",
            f"&{keys.evicted_events}",
            f"&{keys.registrar_notifications}",
            f"&{keys.epoch_notifications}",
            f"&{keys.feed}",
            *_commands(_READER_COMMANDS, db),
        ),
    )


def registrar_role(namespace: str = "default", db: int = 0) -> Role:
    """The user of registrars and their HTTP gateway: the only writer; no CONFIG."""
    keys = Keys(namespace, db)
    return Role(
        user=_user(namespace, "registrar"),
        purpose="registrars (and their HTTP gateway): write the registry, check the flags",
        rules=(
            "resetkeys",
            f"~{keys.prefix}*",
            "resetchannels",
            f"&{keys.events_pattern}",
            f"&{keys.control}",
            f"&{keys.inst_notifications}",
            f"&{keys.expired_events}",
            f"&{keys.evicted_events}",
            f"&{keys.registrar_notifications}",
            f"&{keys.epoch_notifications}",
            f"&{keys.feed}",
            f"&{probe_notifications(keys)}",
            *_commands(_REGISTRAR_COMMANDS, db),
        ),
    )


def roles(namespace: str = "default", services: Iterable[str] = (), db: int = 0) -> list[Role]:
    """The registrar, the reader, and one publisher per service, in that order."""
    return [
        registrar_role(namespace, db),
        reader_role(namespace, db),
        *(publisher_role(s, namespace, db) for s in services),
    ]
