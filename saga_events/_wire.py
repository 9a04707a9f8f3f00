"""Raw RESP on redis-py's connections, for the hot paths (internal).

redis-py connects (TLS, AUTH, SELECT, the URL's options); once a connection
is up, the registrar's and the mirror's message paths read and write its
socket themselves: a subscription is read in bulk and its replies parsed by
the connection's own ``hiredis.Reader`` in a tight loop (instead of one
``parse_response`` per message, each with its timeout context and hooks), and
a pipeline is sent as one hand-packed buffer and its replies read the same
way. Where the connection is not the expected hiredis/asyncio kind (another
redis-py version), the same calls fall back to redis-py's public methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast

import anyio
import hiredis
import redis.asyncio as aioredis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

try:  # what the connection's reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH
except ImportError:  # pragma: no cover - another redis-py layout: generic path
    _NOT_ENOUGH = None

READ_SIZE: Final = 1 << 17

#: One command as RESP bytes (hiredis's stub types only a 1-tuple).
pack_command: Callable[[tuple[Any, ...]], bytes] = cast(Any, hiredis.pack_command)


def _raw(conn: Any) -> tuple[hiredis.Reader, asyncio.StreamReader] | None:
    """The connection's hiredis reader and socket stream, if it has them."""
    if _NOT_ENOUGH is None:
        return None
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    stream = getattr(conn, "_reader", None)
    if isinstance(reader, hiredis.Reader) and isinstance(stream, asyncio.StreamReader):
        return reader, stream
    return None


def _take_parsed(reader: hiredis.Reader, out: list[Any], limit: int) -> bool:
    """Move the replies ``reader`` has complete into ``out`` (up to ``limit`` in all);
    True if ``out`` holds any."""
    gets = reader.gets
    while len(out) < limit:
        reply = gets()
        if reply is _NOT_ENOUGH:
            break
        out.append(reply)
    return bool(out)


def _closed() -> RedisConnectionError:
    return RedisConnectionError("Redis closed the connection")


#: parsed replies a tap holds before it pauses the socket (the task is behind)
_TAP_HIGH: Final = 1 << 16


class _Tap(asyncio.Protocol):
    """Stands between a subscribed connection's transport and redis-py's protocol:
    feeds the connection's hiredis reader as data arrives, and hands the parsed
    replies to a synchronous ``handler`` when one is set and nothing older waits
    (the watcher applies feed messages there: no task wakeup per change), else
    keeps them and wakes the reading task. The end of the connection goes to
    redis-py's protocol as before."""

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        reader: hiredis.Reader,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.inner = inner
        self.reader = reader
        self.transport = transport
        self.loop = loop
        self.replies: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None
        self.handler: Callable[[list[Any]], bool] | None = None
        self.closed = False
        self.error: BaseException | None = None
        self.paused = False
        self.last_rx = loop.time()

    def wake(self) -> None:
        self.handler = None  # the task decides before the next message is handled
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        self.reader.feed(data)
        replies = self.replies
        backlog = bool(replies)
        try:
            _take_parsed(self.reader, replies, 1 << 62)
        except Exception as exc:  # a protocol error: the task raises it
            self.error = exc
            self.wake()
            return
        if not replies:
            return
        handler = self.handler
        if handler is not None and not backlog:
            batch = replies[:]
            replies.clear()
            try:
                if not handler(batch):
                    return
            except Exception as exc:  # a bug in the handler: the task raises it
                self.error = exc
        elif len(replies) >= _TAP_HIGH and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def take(self, limit: int) -> list[Any]:
        replies = self.replies
        if len(replies) <= limit:
            out, self.replies = replies, []
        else:
            out, self.replies = replies[:limit], replies[limit:]
        if self.paused and len(self.replies) < _TAP_HIGH // 2:
            self.paused = False
            self.transport.resume_reading()
        return out

    def eof_received(self) -> bool | None:
        self.closed = True
        self.wake()
        return cast(asyncio.Protocol, self.inner).eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wake()
        self.inner.connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _install_tap(conn: Any) -> _Tap | None:
    """Put a :class:`_Tap` on the connection's transport, moving over what its stream
    has buffered; None where the connection is not the expected kind."""
    raw = _raw(conn)
    if raw is None:
        return None
    reader, stream = raw
    transport = getattr(stream, "_transport", None)
    buffered = getattr(stream, "_buffer", None)
    if transport is None or not isinstance(buffered, bytearray) or transport.is_closing():
        return None
    inner = transport.get_protocol()
    if isinstance(inner, _Tap):
        return inner
    if not isinstance(inner, asyncio.StreamReaderProtocol):
        return None  # someone else reads this socket (the registrar's intake): leave it
    if stream.at_eof() or stream.exception() is not None:
        return None
    tap = _Tap(inner, reader, transport, asyncio.get_running_loop())
    if buffered:
        reader.feed(bytes(buffered))
        buffered.clear()
    _take_parsed(reader, tap.replies, 1 << 62)
    transport.set_protocol(tap)
    if getattr(stream, "_paused", False):
        # The stream had paused the socket (its buffer was full); it is empty now,
        # and only the tap reads from here on.
        stream._paused = False  # type: ignore[attr-defined]
    if not transport.is_reading() and not tap.paused:
        transport.resume_reading()
    return tap


def _timed_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Subscription:
    """Bulk reader of a subscribed redis-py ``PubSub``'s replies.

    On a hiredis/asyncio connection the first read puts a :class:`_Tap` on the
    socket: replies are parsed as they arrive, and :attr:`handler` (when set by
    the reading task, while it waits in :meth:`read`) gets them synchronously;
    it returns True to wake the task (which then decides, the handler unset).
    Once tapped, the connection is read through this object only.
    """

    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self._pubsub = pubsub
        self._tap: _Tap | None = None
        self._tried = False
        #: the event loop's time of the last data received (tapped connections)
        self.last_rx = 0.0

    def set_handler(self, handler: Callable[[list[Any]], bool] | None) -> None:
        """Set (or with None, unset) the synchronous handler; a no-op untapped."""
        if self._tap is not None:
            self._tap.handler = handler

    async def read(self, wait: float, limit: int) -> list[Any]:
        """Wait up to ``wait`` s for a reply; return it with every further
        reply already received (at most ``limit``), or ``[]`` on timeout (or
        when a handler asked for the task). Returning replies unsets the handler."""
        tap = self._tap
        if tap is None:
            if not self._tried:
                self._tried = True
                conn = self._pubsub.connection
                tap = self._tap = _install_tap(conn) if conn is not None else None
            if tap is None:
                self.set_handler(None)
                return await self._read_untapped(wait, limit)
        try:
            if not tap.replies and tap.error is None and not tap.closed:
                waiter = tap.loop.create_future()
                tap.waiter = waiter
                timer = tap.loop.call_later(wait, _timed_out, waiter)
                try:
                    await waiter
                finally:
                    tap.waiter = None
                    timer.cancel()
            if tap.error is not None:
                raise tap.error
            if tap.replies:
                # The task holds these until it has applied them, and may await
                # meanwhile: later replies wait for it (not the handler), in order.
                tap.handler = None
                return tap.take(limit)
            if tap.closed:
                raise _closed()
            return []
        finally:
            self.last_rx = tap.last_rx

    async def _read_untapped(self, wait: float, limit: int) -> list[Any]:
        conn = self._pubsub.connection
        raw = _raw(conn) if conn is not None else None
        if raw is None:
            out = await self._read_generic(wait, limit)
        else:
            reader, stream = raw
            out = []
            if not _take_parsed(reader, out, limit):
                with anyio.move_on_after(wait):
                    while True:
                        data = await stream.read(READ_SIZE)
                        if not data:
                            raise _closed()
                        reader.feed(data)
                        if _take_parsed(reader, out, limit):
                            break
        if out:
            self.last_rx = asyncio.get_running_loop().time()
        return out

    async def _read_generic(self, wait: float, limit: int) -> list[Any]:
        reply = await self._pubsub.parse_response(block=False, timeout=wait)
        if reply is None:
            return []
        out = [reply]
        while len(out) < limit:
            more = await self._pubsub.parse_response(block=False, timeout=0)
            if more is None:
                break
            out.append(more)
        return out


async def roundtrip(
    conn: aioredis.connection.AbstractConnection,
    packed: bytes,
    replies: int,
    reply_timeout: float | None,
) -> list[Any]:
    """Send hand-packed commands and return their ``replies`` replies, error
    replies as exception objects (like ``execute(raise_on_error=False)``).

    On any exception the connection is in an unknown state: disconnect it.
    """
    await conn.send_packed_command(packed, check_health=False)
    raw = _raw(conn)
    out: list[Any] = []
    with anyio.fail_after(reply_timeout):
        if raw is None:
            for _ in range(replies):
                try:
                    out.append(await conn.read_response())
                except ResponseError as exc:
                    out.append(exc)
            return out
        reader, stream = raw
        while True:
            _take_parsed(reader, out, replies)
            if len(out) >= replies:
                return out
            data = await stream.read(READ_SIZE)
            if not data:
                raise _closed()
            reader.feed(data)


#: For the registrar's intake reader (``_intake``): the pieces above, by name.
NOT_ENOUGH: Final = _NOT_ENOUGH
raw_parts: Final = _raw
closed: Final = _closed

_MOVED_TAGS: Final = ("READONLY", "MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")
_MOVED_CLASSES: Final = (ReadOnlyError, MovedError, AskError, TryAgainError, ClusterDownError)


def _moved_on(error: Exception) -> bool:
    """An error reply saying the data lives elsewhere now (also inside a script's error).

    The connection's parser may have made it a MovedError/AskError already, whose text
    has lost the tag ("5718 127.0.0.1:7001"): the class counts too."""
    if isinstance(error, _MOVED_CLASSES):
        return True
    text = str(error)
    return any(tag in text for tag in _MOVED_TAGS)


class Pipe:
    """One connection of a client's pool, kept for hand-packed pipelines.

    Calls are serialised (a lock), so replies never interleave. A call that
    fails or is cancelled drops the connection (its replies may still be in
    flight); the next call takes a fresh one from the pool.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._conn: aioredis.connection.AbstractConnection | None = None
        # asyncio's lock: anyio's yields to the event loop on every acquire
        # (~8 µs and a loop turn per batch); this class is asyncio-only anyway.
        self._lock = asyncio.Lock()

    async def execute(self, packed: bytes, replies: int) -> list[Any]:
        async with self._lock:
            conn = self._conn
            if conn is None:
                pool = self._client.connection_pool
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                self._conn = conn
            try:
                out = await roundtrip(conn, packed, replies, getattr(conn, "socket_timeout", None))
            except BaseException:
                await self._drop(conn)
                raise
            if any(isinstance(r, Exception) and _moved_on(r) for r in out):
                # The node is no longer the registry's master (a failover, a slot
                # moved): these replies are refusals; the next call resolves the
                # node again instead of writing to a replica for good. The
                # resolving connection (topology URLs) would do this on its own
                # read path, which the hand-packed round trip bypasses.
                topology = getattr(conn, "_topology", None)
                if topology is not None:
                    topology.refresh()
                await self._drop(conn)
            return out

    async def _drop(self, conn: aioredis.connection.AbstractConnection) -> None:
        self._conn = None
        with anyio.CancelScope(shield=True):
            await conn.disconnect()
            await self._client.connection_pool.release(conn)

    async def release(self) -> None:
        """Give the connection back to the pool (at shutdown)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self._client.connection_pool.release(conn)
