"""The registrar's fast path for decoding events (internal).

One job: decode an event's bytes to the same :data:`model.AnyEvent` that
:func:`model.decode_event` returns, for the common, well-formed case, at a
fraction of its cost. msgspec checks ``model``'s ``pattern`` constraints with
Python's ``re`` on every string of every event (about 20 µs an event here,
most of a heartbeat's decode); heartbeats repeat the same names, URLs and
metadata, so this decoder decodes without those constraints and checks each
string once, remembering the strings that passed.

Contract: :meth:`FastDecoder.decode` returns either exactly what
``model.decode_event(raw, service, schemes=...)`` would return, or None, and
then the caller takes the slow path (which also names the reason of a
rejection). Anything unusual goes to the slow path: a backslash escape, a
channel mismatch, a value outside a constraint, a field set that differs
from the model's (checked at import: a field added to ``model`` turns this
path off until it learns the field).
"""

from __future__ import annotations

import functools
import operator
import re
import types
import typing
from typing import Any, Final

import msgspec

from . import model
from .errors import InvalidEvent

_NAME: Final = re.compile(model.NAME_PATTERN)
_META_KEY: Final = re.compile(model.META_KEY_PATTERN)
_META_VALUE: Final = re.compile(model.META_VALUE_PATTERN)
_COUNTER_END: Final = 2**53
#: Remembered strings per kind; past this many a table starts over (bounded memory).
MAX_REMEMBERED: Final = 1 << 20


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    service_name: str
    service_id: str
    incarnation: int
    seq: int


class _Announce(_Event, frozen=True, kw_only=True):
    service_url: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_ms: int = model.DEFAULT_TTL_MS
    since: int | None = None


class _Register(_Announce, frozen=True, kw_only=True, tag="register"):
    pass


class _Heartbeat(_Announce, frozen=True, kw_only=True, tag="heartbeat"):
    pass


class _Drain(_Announce, frozen=True, kw_only=True, tag="drain"):
    pass


class _Leave(_Event, frozen=True, kw_only=True, tag="leave"):
    pass


_decoder: Final = msgspec.json.Decoder(_Register | _Heartbeat | _Drain | _Leave)
_ANNOUNCES: Final[dict[type[_Announce], type[model.Register | model.Heartbeat | model.Drain]]] = {
    _Register: model.Register,
    _Heartbeat: model.Heartbeat,
    _Drain: model.Drain,
}


def _plain(t: Any) -> Any:
    """A type without its ``Annotated`` constraints, at any depth."""
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _plain(typing.get_args(t)[0])
    if origin is None:
        return t
    if origin is types.UnionType:  # X | None
        return functools.reduce(operator.or_, [_plain(a) for a in typing.get_args(t)])
    return origin[tuple(_plain(a) for a in typing.get_args(t))]


def _fields(cls: type[msgspec.Struct]) -> tuple[tuple[Any, ...], ...]:
    return tuple(
        (f.name, f.encode_name, _plain(f.type), f.default, f.default_factory)
        for f in msgspec.structs.fields(cls)
    )


def _same_shape() -> bool:
    """Whether the model's events have exactly the fields and tags this path knows."""
    pairs: list[tuple[type[msgspec.Struct], type[msgspec.Struct]]] = [
        (model.Register, _Register),
        (model.Heartbeat, _Heartbeat),
        (model.Drain, _Drain),
        (model.Leave, _Leave),
    ]
    return all(
        _fields(m) == _fields(f) and m.__struct_config__.tag == f.__struct_config__.tag
        for m, f in pairs
    )


ENABLED: Final = _same_shape()


class FastDecoder:
    """Decode events for one registrar (its URL schemes); see the module doc."""

    def __init__(self, schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES) -> None:
        self.schemes = schemes
        self._names: set[str] = set()
        self._meta_keys: set[str] = set()
        self._meta_values: set[str] = set()
        self._urls: set[str] = set()

    def _name_ok(self, name: str) -> bool:
        names = self._names
        if name in names:
            return True
        if _NAME.search(name) is None:
            return False
        if len(names) >= MAX_REMEMBERED:
            names.clear()
        names.add(name)
        return True

    def _url_ok(self, url: str) -> bool:
        urls = self._urls
        if url in urls:
            return True
        if not 1 <= len(url) <= 2048:
            return False
        try:
            model.check_url(url, self.schemes)
        except InvalidEvent:
            return False
        if len(urls) >= MAX_REMEMBERED:
            urls.clear()
        urls.add(url)
        return True

    def _metadata_ok(self, metadata: dict[str, str]) -> bool:
        keys, values = self._meta_keys, self._meta_values
        for k, v in metadata.items():
            if k not in keys:
                if not 1 <= len(k) <= 128 or _META_KEY.search(k) is None:
                    return False
                if len(keys) >= MAX_REMEMBERED:
                    keys.clear()
                keys.add(k)
            if v not in values:
                if len(v) > 2048 or _META_VALUE.search(v) is None:
                    return False
                if len(values) >= MAX_REMEMBERED:
                    values.clear()
                values.add(v)
        return True

    def decode(self, raw: bytes, service: str) -> model.AnyEvent | None:
        """The event ``raw`` holds, as ``model.decode_event`` gives it; None: take that path."""
        if not ENABLED or len(raw) > model.MAX_EVENT_BYTES or b"\\" in raw:
            return None
        try:
            e = _decoder.decode(raw)
        except Exception:
            return None
        if (
            e.service_name != service
            or not 0 <= e.incarnation < _COUNTER_END
            or not 0 <= e.seq < _COUNTER_END
            or not self._name_ok(e.service_name)
            or not self._name_ok(e.service_id)
        ):
            return None
        if isinstance(e, _Leave):
            return model.Leave(
                service_name=e.service_name,
                service_id=e.service_id,
                incarnation=e.incarnation,
                seq=e.seq,
            )
        assert isinstance(e, _Announce)
        if (
            not model.MIN_TTL_MS <= e.ttl_ms <= model.MAX_TTL_MS
            or not self._url_ok(e.service_url)
            or not all(self._name_ok(c) for c in e.capabilities)
            or not self._metadata_ok(e.metadata)
            or (e.since is not None and not 0 <= e.since <= e.seq)
        ):
            return None
        return _ANNOUNCES[type(e)](
            service_name=e.service_name,
            service_id=e.service_id,
            incarnation=e.incarnation,
            seq=e.seq,
            service_url=e.service_url,
            capabilities=e.capabilities,
            metadata=e.metadata,
            ttl_ms=e.ttl_ms,
            since=e.since,
        )
