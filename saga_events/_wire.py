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


class Subscription:
    """Bulk reader of a subscribed redis-py ``PubSub``'s replies."""

    def __init__(self, pubsub: aioredis.client.PubSub) -> None:
        self._pubsub = pubsub

    async def read(self, wait: float, limit: int) -> list[Any]:
        """Wait up to ``wait`` s for a reply; return it with every further
        reply already received (at most ``limit``), or ``[]`` on timeout."""
        conn = self._pubsub.connection
        raw = _raw(conn) if conn is not None else None
        if raw is None:
            return await self._read_generic(wait, limit)
        reader, stream = raw
        out: list[Any] = []
        if _take_parsed(reader, out, limit):
            return out
        with anyio.move_on_after(wait):
            while True:
                data = await stream.read(READ_SIZE)
                if not data:
                    raise _closed()
                reader.feed(data)
                if _take_parsed(reader, out, limit):
                    return out
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
