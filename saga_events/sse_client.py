"""Follow a gateway's watch stream (``GET /api/v1/watch``) over HTTP: a parser and a follower.

:class:`SSEParser` is an incremental Server-Sent Events parser after the
WHATWG rules (``\\r\\n``, ``\\r`` or ``\\n`` line ends, even split across
chunks; ``data`` lines joined with ``\\n``; comments ignored; ``id`` kept
across events; ``retry`` only when all digits; a field without a colon has
an empty value; one leading space of a value dropped).

:class:`WatchFollower` keeps a local view of the registry (service name →
instance id → instance, in the REST API's JSON shape) from ``snapshot`` /
``added`` / ``updated`` / ``removed``, and ``stale`` from ``stale`` /
``current``. It reconnects by itself, sending ``Last-Event-ID`` (the gateway
then resumes without a snapshot where it can), after a backoff with jitter
(from ``backoff_initial`` doubling to ``backoff_max``; at once after an
``overflow``); a connection silent for ``read_timeout`` seconds (three
keep-alives) counts as lost. ``has_synced`` turns True with the first
snapshot; while disconnected the last view is kept and served, with
``connected`` False.

``await tg.start(follower.run)`` returns once the first snapshot is applied,
and raises :class:`WatchUnsupported` when the server answers 404 or 405 (a
gateway without the endpoint): the caller then polls instead. ``run`` raises
it too if a later reconnect meets such a server. Reads (``instances``,
``services``) are plain dictionary lookups for the event loop's thread.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
import httpx
import msgspec
from anyio.abc import TaskStatus

from .errors import SagaError

log = logging.getLogger("saga_events.sse_client")

WATCH_PATH: Final = "/api/v1/watch"
_LINE_END: Final = re.compile(r"\r\n|\r|\n")

Instance = dict[str, Any]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type, its data, and the last event id seen so far."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class SSEParser:
    """Incremental SSE parser: ``feed(text)`` returns the events completed by ``text``.

    ``retry`` holds the last valid ``retry:`` value (ms), ``last_id`` the last
    event id, ``comments`` counts comment lines (keep-alives).
    """

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry: int | None = None
        self.comments = 0
        self._pending = ""
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[SSEEvent]:
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]  # the second half of a \r\n split across chunks
        self._skip_lf = False
        if not text:
            return []
        buf = self._pending + text
        lines = _LINE_END.split(buf)
        self._pending = lines.pop()
        self._skip_lf = buf.endswith("\r")
        events: list[SSEEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return SSEEvent(event=event, data="\n".join(data), id=self.last_id)


class WatchUnsupported(SagaError):
    """Raised when the server has no watch stream (it answered 404 or 405): poll instead."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"{url} answered {status}: the server has no watch stream")
        self.url = url
        self.status = status


class WatchFollower:
    """A local view of a gateway's registry, kept current by its watch stream.

    See the module docstring for the contract. ``client`` may be shared (it
    is not closed); ``headers`` go with every request (e.g. a token).
    """

    def __init__(
        self,
        base_url: str,
        *,
        service: str | None = None,
        client: httpx.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        read_timeout: float = 45.0,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = base_url.rstrip("/") + WATCH_PATH
        self.service = service
        self._client = client
        self.headers = dict(headers or {})
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = httpx.Timeout(connect_timeout, read=read_timeout)
        self.last_event_id: str | None = None
        self.has_synced = False
        self.connected = False
        self.stale = False
        self.supported: bool | None = None  # None until the server has answered once
        self.connects = 0
        self.snapshots = 0
        self.events = 0
        self.overflows = 0
        self.failures = 0  # connection attempts or sessions that ended in an error
        self._clock = clock
        self._down_since: float | None = clock()
        self._view: dict[str, dict[str, Instance]] = {}
        self._changed = anyio.Event()

    # -- reading -------------------------------------------------------------------

    @property
    def current(self) -> bool:
        """True while connected, synced and not stale: the view is the gateway's."""
        return self.connected and self.has_synced and not self.stale

    def down_for(self) -> float:
        """Seconds since the view stopped being :attr:`current` (0.0 while it is)."""
        if self._down_since is None:
            return 0.0
        return max(0.0, self._clock() - self._down_since)

    def instances(self, name: str) -> list[Instance]:
        """The instances of ``name`` (draining ones included), sorted by id."""
        insts = self._view.get(name, {})
        return [insts[k] for k in sorted(insts)]

    def services(self) -> dict[str, list[Instance]]:
        """Every service with at least one instance, and its instances."""
        return {name: self.instances(name) for name in sorted(self._view) if self._view[name]}

    async def wait_until(
        self,
        predicate: Callable[[WatchFollower], bool],
        timeout: float = 10.0,  # noqa: ASYNC109 - mirrors Mirror.wait_until
    ) -> None:
        """Wait until ``predicate(self)`` holds, re-checked after each event; TimeoutError."""
        with anyio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the stream until cancelled; see the module docstring."""
        client = self._client or httpx.AsyncClient()
        started = False

        def synced() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        attempt = 0
        try:
            while True:
                try:
                    if await self._session(client, synced):
                        attempt = 0
                        continue  # an overflow: reconnect at once, resuming
                except WatchUnsupported:
                    raise
                except (httpx.HTTPError, msgspec.DecodeError, _BadStatus) as exc:
                    log.info("watch stream %s lost: %s", self.url, exc)
                    self.failures += 1
                    self._wake()
                finally:
                    if self.connected:
                        self.connected = False
                        self._wake()
                delay = min(self.backoff_max, self.backoff_initial * 2**attempt)
                attempt = min(attempt + 1, 30)
                await anyio.sleep(random.uniform(delay / 2, delay))
        finally:
            if self._client is None:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    async def _session(self, client: httpx.AsyncClient, synced: Callable[[], None]) -> bool:
        """One connection; True when it ended by an overflow (reconnect at once)."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache", **self.headers}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        params = {"service": self.service} if self.service else None
        async with client.stream(
            "GET", self.url, headers=headers, params=params, timeout=self.timeout
        ) as response:
            if response.status_code in (404, 405):
                self.supported = False
                self._wake()
                raise WatchUnsupported(self.url, response.status_code)
            if response.status_code != 200:
                raise _BadStatus(f"{self.url} answered {response.status_code}")
            self.supported = True
            self.connects += 1
            self.connected = True
            self._wake()
            parser = SSEParser()
            async for chunk in response.aiter_text():
                for event in parser.feed(chunk):
                    try:
                        overflow = self._handle(event)
                    except (KeyError, TypeError, AttributeError) as exc:
                        raise _BadStatus(f"malformed {event.event} event: {exc!r}") from None
                    if overflow:
                        return True
                    if self.has_synced:
                        synced()
        return False

    def _handle(self, event: SSEEvent) -> bool:
        """Apply one event to the view; True for an overflow."""
        self.events += 1
        kind = event.event
        if kind == "overflow":
            self.overflows += 1
            log.info("watch stream overflow: %s", event.data)
            return True
        if event.id is not None:
            self.last_event_id = event.id
        if kind == "snapshot":
            body = msgspec.json.decode(event.data)
            services = body["services"].items()
            self._view = {name: {i["service_id"]: i for i in insts} for name, insts in services}
            self.stale = bool(body.get("stale", False))
            self.snapshots += 1
            self.has_synced = True
        elif kind in ("added", "updated", "removed"):
            inst = msgspec.json.decode(event.data)
            name, sid = inst["service_name"], inst["service_id"]
            if kind == "removed":
                insts = self._view.get(name, {})
                insts.pop(sid, None)
                if not insts:
                    self._view.pop(name, None)
            else:
                self._view.setdefault(name, {})[sid] = inst
        elif kind in ("stale", "current"):
            self.stale = kind == "stale"
        self._wake()
        return False

    def _wake(self) -> None:
        if self.current:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = self._clock()
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


class _BadStatus(Exception):
    pass
