"""The watcher's reading of raw replies: feed messages, record notifications, records.

One job: turn what the subscription and the snapshot read into view updates,
with the rules of :mod:`saga_events.watcher` (which owns the protocol and the
network): feed changes in revision order, gaps reported, notifications that no
feed change matches collected as orphans, records decoded in bulk and checked
against their keys. Record notifications are only Redis's own removals
(``expired``/``evicted`` on the database's key-event channels, filtered by the
registry's key prefix here); no ``set``/``del`` notification is read, so a
writer that publishes no feed message (an operator's hand edit, a registrar
without the feed, a Cluster slot migration's ``del``) never changes the view
directly: the watcher's rev check or periodic resync covers it. It does no I/O.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Any, Final, cast

import msgspec

from . import feed, model
from ._watch_rules import Canary, Clock, MirrorStats
from .keys import Keys
from .model import Instance
from .view import Change, View

log = logging.getLogger("saga_events.mirror")

_records_decoder: Final = msgspec.json.Decoder(list[Instance])


class Scan:
    """What one pass over a batch of replies found, besides the changes it applied."""

    __slots__ = ("canary_back", "epoch_changed", "gap", "orphans")

    def __init__(self) -> None:
        #: records Redis removed on its own while a snapshot was taken: read by GET
        self.orphans: dict[str, None] = {}
        self.epoch_changed = False
        self.canary_back = False
        self.gap: str | None = None


class Applier:
    """Applies raw replies to a view (or to a snapshot being built)."""

    def __init__(
        self, keys: Keys, view: View, stats: MirrorStats, canary: Canary, clock: Clock
    ) -> None:
        self.view = view
        self.stats = stats
        self.canary = canary
        self.clock = clock
        self.revs = feed.Revisions()
        #: feed changes applied since the snapshot
        self.applied = 0
        self.inst_prefix = keys.inst_prefix
        self.inst_prefix_b = keys.inst_prefix.encode()
        self.feed_channel = keys.feed.encode()
        self.epoch_channel = keys.epoch_notifications.encode()
        self.gone_channels = frozenset({keys.expired_events.encode(), keys.evicted_events.encode()})

    def scan(
        self,
        batch: Iterable[Any],
        scan: Scan,
        fresh: dict[str, Instance] | None,
        changes: list[Change],
    ) -> None:
        """One pass over raw replies, in order: feed changes go to ``fresh`` (a
        snapshot being built) or, with ``fresh`` None, to the view (``changes``
        gets what changed). Stops at a gap."""
        feed_channel = self.feed_channel
        for reply in batch:
            kind = reply[0]
            if kind == b"message":
                channel = reply[1]
                if channel == feed_channel:
                    self.scan_feed(reply[2], scan, fresh, changes)
                    if scan.gap is not None:
                        return
                elif channel in self.gone_channels:
                    # Redis's own removal (the backstop TTL, maxmemory) of any key of
                    # the database: no script, no feed message, no rev.
                    data = reply[2]
                    if data.startswith(self.inst_prefix_b):
                        self.stats.record_notifications += 1
                        key = data.decode("utf-8", "replace")
                        if fresh is None:
                            change = self.view.remove(key)
                            if change is not None:
                                changes.append(change)
                        else:
                            # The MGET may have read it before or after: ask again.
                            scan.orphans[key] = None
                elif channel == self.epoch_channel:
                    self.stats.epoch_notifications += 1
                    scan.epoch_changed = True
            elif kind == b"pmessage":
                self.stats.canary_notifications += 1
                # Back during a snapshot: that snapshot is the resync (see
                # Watcher._resync); while watching, resync now.
                if self.canary.beat(self.clock.monotonic()) and fresh is None:
                    scan.canary_back = True

    def scan_feed(
        self,
        data: bytes,
        scan: Scan,
        fresh: dict[str, Instance] | None,
        changes: list[Change],
    ) -> None:
        stats = self.stats
        stats.feed_messages += 1
        try:
            msg = feed.decode(data)
        except msgspec.DecodeError as exc:
            # Not the scripts' shape (a stray PUBLISH): dropped. A lost change
            # shows as a gap at the next message or at the next rev check.
            stats.feed_rejected += 1
            log.warning("ignoring an unreadable feed message: %s", exc)
            return
        before = self.revs.last
        verdict = self.revs.check(msg)
        if verdict is feed.Verdict.GAP:
            scan.gap = f"feed gap: revisions {msg.first}..{msg.rev} after {before}"
            return
        if verdict is feed.Verdict.SEEN:
            return
        stats.feed_changes += len(msg.ch)
        self.applied += len(msg.ch)
        view = self.view
        for c in msg.ch:
            key = c.key
            inst = self.checked(key, c.record) if type(c) is feed.Set else None
            if fresh is not None:
                if inst is None:
                    fresh.pop(key, None)
                else:
                    fresh[key] = inst
            else:
                change = view.remove(key) if inst is None else view.put(key, inst)
                if change is not None:
                    changes.append(change)

    def decode_into(
        self, fresh: dict[str, Instance], keys: list[str], values: list[bytes | None]
    ) -> None:
        """Decode the snapshot's records as one JSON list (one msgspec call); record by
        record only when that fails (an unreadable record is skipped and logged)."""
        if None in values:
            keys = [key for key, raw in zip(keys, values, strict=True) if raw is not None]
            values = [raw for raw in values if raw is not None]
        raws = cast(list[bytes], values)
        # Tens of thousands of new objects at once: the cyclic GC would run many
        # times over a heap that holds none of their cycles (there are none).
        paused = gc.isenabled()
        gc.disable()
        try:
            try:
                insts: list[Instance] | None = _records_decoder.decode(
                    b"[" + b",".join(raws) + b"]"
                )
            except msgspec.DecodeError:
                insts = None
            if insts is None or len(insts) != len(raws):
                for key, raw in zip(keys, raws, strict=True):
                    if (one := self.decode(key, raw)) is not None:
                        fresh[key] = one
                return
            checked = self.checked
            for key, inst in zip(keys, insts, strict=True):
                if (shared := checked(key, inst)) is not None:
                    fresh[key] = shared
        finally:
            if paused:
                gc.enable()

    def checked(self, key: str, inst: Instance) -> Instance | None:
        """``inst`` shared (see :meth:`View.share`), or None when it names another key."""
        name = inst.service_name
        if key != f"{self.inst_prefix}{name}:{inst.service_id}" or ":" in name:
            log.warning("ignoring record %s that names another instance", key)
            return None
        return self.view.share(inst)

    def decode(self, key: str, raw: bytes | None) -> Instance | None:
        if raw is None:
            return None
        try:
            inst = model.decode_instance(raw)
        except msgspec.DecodeError as exc:
            log.warning("ignoring unreadable record %s: %s", key, exc)
            return None
        return self.checked(key, inst)
