"""Key and channel names for one registry namespace.

Every key carries the hash tag ``{ns}`` so that the whole registry lives in one
Redis Cluster slot and its keyspace notifications come from one node.
"""

from __future__ import annotations

from dataclasses import dataclass

from .identity import NAME_RE, is_valid_name

__all__ = ["NAME_RE", "Keys", "is_valid_name"]


@dataclass(frozen=True, slots=True)
class Keys:
    """Names of the keys and channels of namespace ``ns`` in database ``db``.

    It can be shared between threads.
    """

    ns: str = "default"
    db: int = 0

    def __post_init__(self) -> None:
        if not is_valid_name(self.ns):
            raise ValueError(f"invalid namespace {self.ns!r}: must match {NAME_RE.pattern}")

    @property
    def prefix(self) -> str:
        return f"saga:{{{self.ns}}}:"

    @property
    def inst_prefix(self) -> str:
        return f"{self.prefix}inst:"

    def inst(self, service: str, service_id: str) -> str:
        return f"{self.inst_prefix}{service}:{service_id}"

    def override(self, service: str, service_id: str) -> str:
        """An operator's drain of one instance (see :class:`~saga_events.model.DrainOverride`)."""
        return f"{self.prefix}override:{service}:{service_id}"

    def tomb(self, service: str, service_id: str) -> str:
        return f"{self.prefix}tomb:{service}:{service_id}"

    @property
    def index(self) -> str:
        return f"{self.prefix}index"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}deadlines"

    @property
    def order(self) -> str:
        """Hash: instance key → newest applied ``incarnation:seq``."""
        return f"{self.prefix}order"

    @property
    def rev(self) -> str:
        """Counter: incremented by every record change (create, update, remove, reap)."""
        return f"{self.prefix}rev"

    @property
    def feed(self) -> str:
        """Pub/sub channel: every record change, published by the script that makes it
        (see :mod:`saga_events.feed`)."""
        return f"{self.prefix}feed"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}epoch"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    def registrar(self, rid: str) -> str:
        return f"{self.prefix}registrar:{rid}"

    def events(self, service: str) -> str:
        return f"{self.prefix}events:{service}"

    @property
    def events_prefix(self) -> str:
        return f"{self.prefix}events:"

    @property
    def events_pattern(self) -> str:
        return f"{self.prefix}events:*"

    # Notification channels the mirror subscribes to: the canary pattern, the epoch
    # channel and the database's expired/evicted key-event channels.
    @property
    def keyspace_prefix(self) -> str:
        return f"__keyspace@{self.db}__:"

    @property
    def inst_notifications(self) -> str:
        """Pattern for the records' keyspace notifications (mirrors before the
        key-event channels subscribed to it; the roles still grant it)."""
        return f"{self.keyspace_prefix}{self.inst_prefix}*"

    @property
    def expired_events(self) -> str:
        """Key-event channel of the database's expirations (flags ``Ex``): the message
        is the key's name, for every key of the database, not only the registry's."""
        return f"__keyevent@{self.db}__:expired"

    @property
    def evicted_events(self) -> str:
        """Key-event channel of the database's evictions (flags ``Ee``)."""
        return f"__keyevent@{self.db}__:evicted"

    @property
    def registrar_notifications(self) -> str:
        """Pattern for the registrars' liveness keys: the canary."""
        return f"{self.keyspace_prefix}{self.prefix}registrar:*"

    @property
    def epoch_notifications(self) -> str:
        """Channel (not a pattern) for the epoch key."""
        return f"{self.keyspace_prefix}{self.epoch}"

    def parse_inst(self, key: str) -> tuple[str, str] | None:
        """Split an instance key into (service, id); None for any other key."""
        if not key.startswith(self.inst_prefix):
            return None
        service, sep, service_id = key[len(self.inst_prefix) :].partition(":")
        if not sep or not is_valid_name(service) or not is_valid_name(service_id):
            return None
        return service, service_id
