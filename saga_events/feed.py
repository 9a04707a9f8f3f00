"""The change feed: the message format of ``saga:{ns}:feed`` and how to read it.

One job: turn the feed's raw messages into ordered record changes with their
revisions, and say when one is missing.

Contract:

* Every registrar script that changes records (``apply``, ``reap``,
  ``restore`` in ``saga_events/lua``) increments ``saga:{ns}:rev`` and, in the
  same script, PUBLISHes one message on ``saga:{ns}:feed``::

      {"rev": R, "ch": [["set", key, record], ["del", key], ...]}

  ``R`` is the revision after the last change, the changes took the revisions
  ``R - len(ch) + 1 .. R`` in order, and ``record`` is the stored record
  bytes spliced in (not re-encoded). One change per message from ``apply``
  and ``restore``; a reap sends all its removals in one.
* :func:`decode` reads a message with one msgspec call (the records decoded
  into :class:`~saga_events.model.Instance` on the way); a message that is not
  this shape raises :class:`msgspec.DecodeError` (the watcher counts and drops
  it: the revision then shows the gap).
* :class:`Revisions` holds the last revision applied and decides, per message,
  apply / already seen / gap. The feed is exact: any message whose first
  revision is not ``last + 1`` means one was lost (or the counter was reset),
  and only a resync repairs that.
* :func:`encode` builds the same bytes as the scripts (tests, tools).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

import msgspec

from .model import Instance

__all__ = ["Del", "Message", "Revisions", "Set", "Verdict", "decode", "encode"]


class Set(msgspec.Struct, array_like=True, tag="set", frozen=True):
    """A record created or rewritten: its key and the record as stored."""

    key: str
    record: Instance


class Del(msgspec.Struct, array_like=True, tag="del", frozen=True):
    """A record removed (leave, reap)."""

    key: str


class Message(msgspec.Struct, frozen=True):
    """One feed message: the changes of one script and the revision after the last."""

    rev: int
    ch: list[Set | Del]

    @property
    def first(self) -> int:
        """The revision of the first change."""
        return self.rev - len(self.ch) + 1


_decoder: Final = msgspec.json.Decoder(Message)


def decode(data: bytes) -> Message:
    """One feed message; raises msgspec.DecodeError (a ValidationError too) on anything else."""
    return _decoder.decode(data)


def encode(rev: int, changes: list[tuple[str, bytes | None]]) -> bytes:
    """The message a script publishes: ``(key, record bytes)`` for a set, ``(key, None)``
    for a del; ``rev`` is the revision after the last change."""
    parts = [
        b'["del",' + msgspec.json.encode(key) + b"]"
        if record is None
        else b'["set",' + msgspec.json.encode(key) + b"," + record + b"]"
        for key, record in changes
    ]
    return b'{"rev":' + str(rev).encode() + b',"ch":[' + b",".join(parts) + b"]}"


class Verdict(Enum):
    APPLY = "apply"
    SEEN = "seen"  # wholly at or before the last revision applied (a snapshot covered it)
    GAP = "gap"


class Revisions:
    """The last revision applied from the feed (or read with a snapshot)."""

    def __init__(self) -> None:
        #: None before the first snapshot, or when the snapshot found no rev key
        self.last: int | None = None
        #: while the snapshot's buffer is applied, messages at or before this are skipped
        self.snapshot: int | None = None

    def start(self, rev: int | None) -> None:
        """A snapshot read at revision ``rev`` (None: no rev key, counts from 0)."""
        self.last = rev if rev is not None else 0
        self.snapshot = self.last

    def watching(self) -> None:
        """The snapshot's buffer is applied: from now on every message must follow on."""
        self.snapshot = None

    def check(self, msg: Message) -> Verdict:
        """Whether ``msg`` follows the last revision; updates it when it does."""
        last = self.last if self.last is not None else 0
        if not msg.ch:  # no script sends one: only a revision to check
            return Verdict.SEEN if msg.rev <= last else Verdict.GAP
        if msg.first == last + 1:
            self.last = msg.rev
            return Verdict.APPLY
        if self.snapshot is not None and msg.rev <= self.snapshot:
            return Verdict.SEEN
        return Verdict.GAP
