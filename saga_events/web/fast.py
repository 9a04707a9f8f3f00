"""The hot paths of the REST API without the framework: the GETs and the register.

One job: answer ``GET /api/v1/services/{name}`` and ``GET /api/v1/services``
(no query string) straight from the gateway's view, and a well-formed
``POST /api/v1/services/register`` straight through the writer, with the
bytes Litestar would send, and let everything else (filters, bad names,
404s, bodies the route would refuse, a missing token) go through the app
unchanged.

Contract:

* **Same answer.** The body is what ``msgspec.json.encode`` gives for the
  route's :class:`~saga_events.web.schema.ServiceInfo` /
  :class:`~saga_events.web.schema.ServiceList` (Litestar's encoder), the
  headers are ``content-type: application/json`` and ``content-length``; an
  instance is chosen by the same round-robin (``Context.choose``). When the
  fast path cannot answer (no live instance, a name the route would refuse,
  any query string), it returns None and the app answers.
* **Encoded once.** An instance's JSON is encoded once per (record, last
  heartbeat): the view's records are immutable, so a cached entry is valid
  while the view holds the same record object.
* **Register.** A body that decodes strictly into
  :class:`~saga_events.web.schema.RegisterRequest` (Litestar's looser
  decoding gives the same request for it), within the body limit, with the
  token when one is set, is registered as the route does
  (:func:`registration`); anything else goes to the app. A failure of the
  write is answered by the app's own rules (``web.app.Failures``).
* **Last heartbeats** (``deadline - ttl``, from the registrar's deadlines
  set) are read from Redis in one pipeline and kept for ``max_age`` seconds
  (0.5 by default); a write through this gateway (register, heartbeat,
  DELETE, drain) forgets its service's entries at once, so an HTTP client
  sees its own heartbeat. A heartbeat an agent sends through Redis shows in
  ``last_heartbeat`` within ``max_age``. Redis down: the registration time
  stands in, as before, and is not kept.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import msgspec

from .. import model
from ..writer import Registration, Writer
from .schema import RegisterRequest, ServiceInfo

JSON_HEADERS: Final = (b"content-type", b"application/json")
DEFAULT_MAX_AGE: Final = 0.5
_PREFIX: Final = "/api/v1/services/"
_NAME: Final = re.compile(model.NAME_PATTERN)
_encode: Final = msgspec.json.Encoder().encode
_register_decoder: Final = msgspec.json.Decoder(RegisterRequest)

Key = tuple[str, str]


class Heartbeats:
    """Last heartbeat times of instances, read from Redis and kept ``max_age`` seconds."""

    def __init__(
        self,
        writer: Writer,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.writer = writer
        self.max_age = max_age
        self.clock = clock
        # name -> id -> (when read, the record it was read for, last heartbeat ms)
        self._known: dict[str, dict[str, tuple[float, model.Instance, int | None]]] = {}
        self._size = 0  # entries stored since the last clear (an upper bound)
        self._forgets = 0  # a read that began before a forget() keeps nothing

    def forget(self, name: str) -> None:
        """A write to ``name`` through this gateway: read its instances afresh."""
        self._forgets += 1
        self._known.pop(name, None)

    async def of(self, insts: list[model.Instance]) -> list[int | None]:
        """``deadline - ttl`` per instance (None where unknown), reading only what is old."""
        now = self.clock()
        known = self._known
        out: list[int | None] = []
        missing: list[int] = []
        for i, inst in enumerate(insts):
            service = known.get(inst.service_name)
            entry = service.get(inst.service_id) if service is not None else None
            if entry is not None and entry[1] is inst and now - entry[0] < self.max_age:
                out.append(entry[2])
            else:
                out.append(None)
                missing.append(i)
        if missing:
            wanted = [insts[i] for i in missing]
            forgets = self._forgets
            beats, read = await self._read(wanted)
            read = read and forgets == self._forgets
            now = self.clock()
            if self._size > 4 * max(1024, len(self.writer.view)):
                known.clear()  # removed instances' entries: dropped in bulk, rarely
                self._size = 0
            for i, inst, beat in zip(missing, wanted, beats, strict=True):
                out[i] = beat
                if read:
                    known.setdefault(inst.service_name, {})[inst.service_id] = (now, inst, beat)
                    self._size += 1
        return out

    async def _read(self, insts: list[model.Instance]) -> tuple[list[int | None], bool]:
        return await self.writer.read_heartbeats(insts)


class Encoded:
    """Each instance's :class:`ServiceInfo` JSON, encoded once per (record, heartbeat)."""

    def __init__(self) -> None:
        self._bytes: dict[Key, tuple[model.Instance, int | None, bytes]] = {}

    def of(self, inst: model.Instance, beat: int | None) -> bytes:
        key = (inst.service_name, inst.service_id)
        entry = self._bytes.get(key)
        if entry is not None and entry[0] is inst and entry[1] == beat:
            return entry[2]
        raw = _encode(ServiceInfo.of(inst, beat))
        if len(self._bytes) > 65536:
            self._bytes.clear()
        self._bytes[key] = (inst, beat, raw)
        return raw


class FastReads:
    """The framework-free answers of the two hot GETs (see the module docstring)."""

    def __init__(
        self,
        writer: Writer,
        heartbeats: Heartbeats,
        choose: Callable[[str], model.Instance | None],
    ) -> None:
        self.writer = writer
        self.heartbeats = heartbeats
        self.choose = choose
        self.encoded = Encoded()

    def route(self, path: str) -> Callable[[], Coroutine[Any, Any, bytes | None]] | None:
        """The answering coroutine function for a GET of ``path``, or None (the app answers)."""
        if path == "/api/v1/services":
            return self.listing
        if path.startswith(_PREFIX):
            name = path[len(_PREFIX) :]
            if name != "register" and _NAME.match(name) is not None:

                async def one() -> bytes | None:
                    return await self.one(name)

                return one
        return None

    async def one(self, name: str) -> bytes | None:
        inst = self.choose(name)
        if inst is None:
            return None  # the app's 404
        (beat,) = await self.heartbeats.of([inst])
        return self.encoded.of(inst, beat)

    async def listing(self) -> bytes:
        view = self.writer.view
        services = view.services()
        flat = [i for insts in services.values() for i in insts]
        beats = iter(await self.heartbeats.of(flat))
        encoded = self.encoded.of
        parts: list[bytes] = []
        for name, insts in services.items():
            items = b",".join([encoded(i, next(beats)) for i in insts])
            parts.append(_encode(name) + b":[" + items + b"]")
        stale = b"true" if view.stale else b"false"
        return (
            b'{"services":{'
            + b",".join(parts)
            + b'},"count":'
            + str(len(flat)).encode()
            + b',"stale":'
            + stale
            + b"}"
        )


def registration(data: RegisterRequest) -> Registration:
    """What a register request asks the writer for (the route's and the fast path's)."""
    return Registration(
        service_name=data.service_name,
        service_url=data.service_url,
        capabilities=tuple(data.capabilities),
        service_id=data.service_id,
        metadata=dict(data.metadata),
        ttl_ms=round(data.ttl_seconds * 1000),
    )


class FastRegister:
    """``POST /api/v1/services/register`` without the framework (see the module docstring)."""

    def __init__(
        self,
        writer: Writer,
        heartbeats: Heartbeats,
        authorized: Callable[[str | None], bool],
        max_body_bytes: int,
    ) -> None:
        self.writer = writer
        self.heartbeats = heartbeats
        self.authorized = authorized
        self.max_body_bytes = max_body_bytes

    def request(self, body: bytes, authorization: str | None) -> RegisterRequest | None:
        """The request the route would read from ``body``, or None (the app answers)."""
        if len(body) > self.max_body_bytes or not self.authorized(authorization):
            return None
        try:
            return _register_decoder.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None

    async def answer(self, data: RegisterRequest) -> bytes:
        """The 200 answer's body; raises what the writer raises (the route would too)."""
        inst, now_ms = await self.writer.register(registration(data))
        self.heartbeats.forget(data.service_name)
        return _encode(ServiceInfo.of(inst, now_ms))
