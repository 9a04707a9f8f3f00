"""The registrar's event intake: one callback per socket read, heartbeats held a moment (internal).

At 100k instances the intake gets a burst of a handful of events every
millisecond. Read through a stream and a task, each burst costs event-loop
turns, a task switch and a timeout scope, then a script call (a socket write
and read, a request and a reply in Redis) for those few events: more than
the events themselves. Here the subscribed connection's transport is handed
to a protocol whose ``buffer_updated`` parses the replies (the connection's
own hiredis reader) and decodes, validates and rate-limits the events at
once (``decode``, synchronous); the consumer task wakes only to apply them.

Contract:

* Events are applied in the order received, by one task (``apply``, awaited
  one batch at a time, at most ``batch`` events each).
* A batch made only of ``heartbeat`` events waits up to ``hold`` seconds to
  be applied with those that come meanwhile (heartbeats are due every
  ttl/3: a few ms do not matter); any other event (``register``, ``drain``,
  ``leave``) is applied at once, with everything before it. ``hold <= 0``:
  everything at once.
* Memory is bounded: with ``8 x batch`` events waiting, the socket is not
  read until they are applied (Redis buffers, then disconnects a subscriber
  that stays behind, as for any slow subscriber; the session reconnects).
* The connection stays redis-py's: PINGs, health and topology checks go
  through ``connection.Subscription``; a closed socket ends the session
  (``ConnectionError``), as before. Where the connection is not the
  hiredis/asyncio kind, it falls back to reading batches through
  ``connection.Subscription.read``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import hiredis
import redis.asyncio as aioredis

from . import _wire, connection, model

Decode = Callable[[list[Any]], list[Any]]
Apply = Callable[[list[Any]], Awaitable[None]]


#: Bytes one socket read may bring (the stream's own reads are 256 KiB too).
READ_BUFFER: Final = 1 << 18


class _Intake(asyncio.BufferedProtocol):
    """Stands in for the connection's stream protocol while the session lasts.

    A buffered protocol: the transport reads into one buffer, reused (no new
    256 KiB bytes object per read), whose bytes the hiredis reader copies.
    """

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        reader: hiredis.Reader,
        transport: asyncio.Transport,
        decode: Decode,
        hold: float,
        batch: int,
    ) -> None:
        self._inner = inner
        self._reader = reader
        self._transport = transport
        self._decode = decode
        self.hold = hold
        self.batch = batch
        self.pending: list[Any] = []
        self.rx = 0  # replies received (PONGs too): the session's liveness
        self.failure: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        self._paused = False
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)

    # -- the protocol ----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        # hiredis reads any buffer (its stub says bytes): the bytes are copied in
        self._reader.feed(self._buffer, 0, nbytes)  # type: ignore[arg-type]
        self.take()

    def data_received(self, data: bytes) -> None:  # a transport that reads bytes
        self._reader.feed(data)
        self.take()

    def take(self, replies: list[Any] | None = None) -> None:
        """Parse what the reader holds (after ``replies``) and queue its events."""
        out = replies if replies is not None else []
        gets = self._reader.gets
        try:
            while True:
                reply = gets()
                if reply is _wire.NOT_ENOUGH:
                    break
                out.append(reply)
            if not out:
                return
            self.rx += len(out)
            events = self._decode(out)
        except Exception as exc:  # a protocol error, or a bug: the session ends on it
            self._fail(exc)
            return
        if not events:
            return
        self.pending.extend(events)
        if len(self.pending) >= self.batch or self.hold <= 0:
            self._fire()
        elif any(type(e) is not model.Heartbeat or e.since == e.seq for e in events):
            self._fire()  # a register, drain, leave, or a heartbeat that says it changed
        elif self._timer is None and not self._due:
            self._timer = self._loop.call_later(self.hold, self._fire)
        if len(self.pending) >= 8 * self.batch and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        # Redis closed (CLIENT KILL, the pub/sub output-buffer limit): end the session
        # now. The stream's protocol would keep the transport half-open, and the
        # closing would be noticed only by a PING's failed write, seconds later.
        self._inner.eof_received()  # type: ignore[attr-defined]
        self._fail(_wire.closed())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_wire.closed())
        self._inner.connection_lost(exc)  # lets the stream's writer finish closing

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the consumer's side ---------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._fire()

    def _fire(self) -> None:
        self._due = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, quiet_s: float) -> None:
        """Until events are due (or the session failed), or ``quiet_s`` s passed."""
        if not self._due and self.failure is None:
            self._waiter = waiter = self._loop.create_future()
            quiet = self._loop.call_later(quiet_s, self._wake)
            try:
                await waiter
            finally:
                quiet.cancel()
                self._waiter = None
        self._due = False
        if self.failure is not None and not self.pending:
            # Events received before the failure are applied first (the caller
            # takes them); the session ends once none is left.
            raise self.failure

    def take_batch(self) -> list[Any]:
        """Up to ``batch`` of the waiting events, in order; reading resumes below the bound."""
        events = self.pending[: self.batch]
        del self.pending[: self.batch]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.pending:
            self._due = True  # a backlog: the rest next, without waiting
        if self._paused and len(self.pending) < 8 * self.batch:
            self._paused = False
            self._transport.resume_reading()
        return events


def _take_over(
    sub: connection.Subscription, decode: Decode, hold: float, batch: int
) -> _Intake | None:
    """Put an :class:`_Intake` in the connection's place; None where it cannot."""
    conn = sub.pubsub.connection
    raw = _wire.raw_parts(conn) if conn is not None else None
    writer = getattr(conn, "_writer", None)
    transport = getattr(writer, "transport", None)
    # Duck-typed: uvloop's transports are not asyncio.Transport instances.
    needs = ("get_protocol", "set_protocol", "pause_reading", "resume_reading")
    if raw is None or transport is None or not all(hasattr(transport, n) for n in needs):
        return None
    reader, stream = raw
    buffered = getattr(stream, "_buffer", None)
    if not isinstance(buffered, bytearray) or transport.is_closing():
        return None
    if stream.at_eof() or stream.exception() is not None:
        return None  # the slow path's read meets the end and the session starts over
    intake = _Intake(transport.get_protocol(), reader, transport, decode, hold, batch)
    transport.set_protocol(intake)
    early, sub.pending = sub.pending, []
    if buffered:  # bytes the stream read before the switch
        reader.feed(bytes(buffered))
        buffered.clear()
    if getattr(stream, "_paused", False):
        # The stream had paused the socket (its buffer was full): it is empty now,
        # and only the intake reads from here on.
        stream._paused = False
    intake.take(early)
    if not transport.is_reading() and not intake._paused:
        transport.resume_reading()
    return intake


async def consume(
    client: aioredis.Redis,
    *,
    patterns: Sequence[str],
    decode: Decode,
    apply: Apply,
    hold: float,
    batch: int,
    on_connect: Callable[[connection.Subscription], Awaitable[None]],
    on_error: Callable[[BaseException], None],
    timing: connection.Timing,
) -> None:
    """Follow ``patterns`` forever (``connection.run_forever``, crash-only), each
    received batch through ``decode`` (sync, in the read callback) to ``apply``."""

    async def session(healthy: Callable[[], None]) -> None:
        async with connection.subscribe(client, patterns=patterns, timing=timing) as sub:
            intake = _take_over(sub, decode, hold, batch)
            await on_connect(sub)
            healthy()
            if intake is None:
                while True:
                    replies = await sub.read(limit=batch)
                    events = decode(replies) if replies else []
                    if events:
                        await apply(events)
            loop = asyncio.get_running_loop()
            seen = intake.rx
            while True:
                await intake.wait(timing.ping_interval)
                if intake.pending:  # what came during this apply waits for its own turn
                    await apply(intake.take_batch())
                if intake.rx != seen:
                    seen = intake.rx
                    sub.last_rx = loop.time()
                await sub.check_health()

    await connection.run_forever(
        session, name="registrar", timing=timing, on_error=on_error, crash_only=True
    )
