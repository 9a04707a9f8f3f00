"""The watcher's listing: one consistent snapshot of a namespace's registry (internal).

One job: the reads of :mod:`saga_events.watcher`'s "list" step, on the
watcher's own pipelined connection (:class:`saga_events._wire.Pipe`) and its
subscription. It owns no state of its own and never retries (the watcher's
session does). Contract:

* :meth:`Lister.snapshot` reads rev and the index in one round trip, the
  records in ``MGET`` chunks (one pipelined round trip, decoded as one list),
  then the subscription up to a PING sent after them: every feed message of a
  change the reads may have seen is applied to the snapshot (those at or
  before its rev are dropped), and what else the messages said (a gap, an
  epoch notification, Redis's own removals to read again) is in the returned
  :class:`~saga_events._watch_apply.Scan`. It resets the applier's revision
  order to the snapshot's rev.
* :meth:`Lister.read_orphans` GETs the records Redis removed on its own
  during a snapshot and applies to the view what Redis holds now.
* On a Cluster replica of a migrating owner both raise ConnectionError
  (``_topology_pool.check_slot``) instead of returning a partial listing or a
  removal a migration caused; Redis error replies are raised.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from . import _topology_pool, _wire
from ._watch_apply import Applier, Scan
from ._watch_rules import MirrorStats
from .connection import Subscription
from .keys import Keys
from .model import Instance
from .view import Change, View


def as_text(value: bytes | str) -> str:
    """A reply as text (undecodable bytes replaced)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def as_int(value: Any) -> int | None:
    """A reply as an int; None when absent or not a number."""
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def raise_errors(replies: list[Any]) -> None:
    """Raise the first error reply of a pipelined round trip."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


class Lister:
    """Snapshots and orphan reads for one watcher (see the module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        view: View,
        applier: Applier,
        pipe: _wire.Pipe,
        stats: MirrorStats,
    ) -> None:
        self.client = client
        self.keys = keys
        self.view = view
        self.applier = applier
        self.pipe = pipe
        self.stats = stats

    async def snapshot(
        self, sub: Subscription, chunk_size: int
    ) -> tuple[dict[str, Instance], int | None, Scan]:
        """Read rev, the index and the records, then the feed up to now; return the
        records as of the last feed message read, the snapshot's rev, and the scan."""
        k = self.keys
        applier = self.applier
        pack = _wire.pack_command
        replies = await self.pipe.execute(pack(("GET", k.rev)) + pack(("SMEMBERS", k.index)), 2)
        raise_errors(replies)
        rev = as_int(replies[0])
        members = [as_text(m) for m in replies[1]]
        fresh: dict[str, Instance] = {}
        chunks = [members[i : i + chunk_size] for i in range(0, len(members), chunk_size)]
        if chunks:
            packed = b"".join([pack(("MGET", *chunk)) for chunk in chunks])
            values = await self.pipe.execute(packed, len(chunks))
            raise_errors(values)
            applier.decode_into(fresh, members, [v for chunk in values for v in chunk])
        applier.applied = 0
        applier.revs.start(rev)
        scan = Scan()
        # Every feed message of a change up to the MGETs is read past this PING.
        applier.scan(await sub.barrier(), scan, fresh, [])
        # A Cluster replica of a migrating owner answers nil for moved keys: a partial
        # (or empty) listing unless the slot was settled after the reads.
        await _topology_pool.check_slot(self.client)
        applier.revs.watching()
        return fresh, rev, scan

    async def read_orphans(self, orphans: dict[str, None], changes: list[Change]) -> None:
        """GET the records notified without a feed message, in one round trip, and
        apply what Redis holds now (``changes`` gets what changed)."""
        keys = [key for key in orphans if self.keys.parse_inst(key) is not None]
        if not keys:
            return
        self.stats.gets += len(keys)
        self.stats.orphans += len(keys)
        pack = _wire.pack_command
        values = await self.pipe.execute(b"".join([pack(("GET", key)) for key in keys]), len(keys))
        raise_errors(values)
        if None in values:
            # A removal no feed message explains: on a Cluster replica it may be a slot
            # migration's (MIGRATE deletes on the source): then keep the view, resync.
            await _topology_pool.check_slot(self.client)
        for key, raw in zip(keys, values, strict=True):
            inst = self.applier.decode(key, raw)
            change = self.view.remove(key) if inst is None else self.view.put(key, inst)
            if change is not None:
                changes.append(change)
