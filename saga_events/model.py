"""Wire models: the events agents publish and the records the registrar stores.

Wire format version 1. Rules for changing it (msgspec's schema evolution):
new fields get defaults, a field's type never changes, unknown fields are
ignored by readers.

A stored record is the JSON of :class:`Instance`. Its first three fields,
``incarnation``, ``seq`` and ``registered_at_ms``, are written by the
registrar's Lua script in front of the body that the registrar encoded
(:class:`RecordBody`), so the script never decodes JSON: it compares bodies
as strings and splices the ordering fields in front.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from .errors import InvalidEvent

MAX_EVENT_BYTES: Final = 16 * 1024
MIN_TTL_MS: Final = 1_000
MAX_TTL_MS: Final = 3_600_000
DEFAULT_TTL_MS: Final = 60_000
DEFAULT_URL_SCHEMES: Final = frozenset({"http", "https", "grpc", "grpcs", "tcp", "redis"})

# \Z, not $: "$" also matches before a trailing newline, and "name\n" must not pass.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z"

Name = Annotated[str, Meta(pattern=NAME_PATTERN)]
Counter = Annotated[int, Meta(ge=0, lt=2**53)]
TtlMs = Annotated[int, Meta(ge=MIN_TTL_MS, le=MAX_TTL_MS)]
Capability = Annotated[str, Meta(pattern=NAME_PATTERN)]
Url = Annotated[str, Meta(min_length=1, max_length=2048)]
# Metadata is shown on terminals and in logs: no C0 control (ESC, NUL...), DEL
# or C1 control. A value may hold a tab (a list some tools write that way); a
# key may not. \Z, not $: see NAME_PATTERN.
META_KEY_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*\Z"
META_VALUE_PATTERN: Final = r"^[^\x00-\x08\x0a-\x1f\x7f-\x9f]*\Z"
MetaKey = Annotated[str, Meta(min_length=1, max_length=128, pattern=META_KEY_PATTERN)]
MetaValue = Annotated[str, Meta(max_length=2048, pattern=META_VALUE_PATTERN)]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every event carries.

    ``incarnation`` identifies one run of an agent (start time in ms times 1000
    plus a random suffix); ``seq`` grows with every event of that run. The
    registrar applies an event only when ``(incarnation, seq)`` is newer than
    what it stored for the instance.
    """

    service_name: Name
    service_id: Name
    incarnation: Counter
    seq: Counter


class Announce(Event, frozen=True, kw_only=True):
    """An event that carries the whole record, so any one of them rebuilds it.

    ``since`` (optional): the seq at which this agent last changed the
    record's content (url, capabilities, metadata, ttl, draining), so
    ``0 <= since <= seq``; it lets a registrar apply an unchanged heartbeat as a
    deadline touch (``saga_events/_touch.py``). Without it the event is applied
    in full, as before the field existed.
    """

    service_url: Url
    capabilities: tuple[Capability, ...] = ()
    metadata: dict[MetaKey, MetaValue] = msgspec.field(default_factory=dict)
    ttl_ms: TtlMs = DEFAULT_TTL_MS
    since: Counter | None = None


class Register(Announce, frozen=True, kw_only=True, tag="register"):
    """An instance starts (or re-announces itself)."""


class Heartbeat(Announce, frozen=True, kw_only=True, tag="heartbeat"):
    """An instance is still alive; a changed record in it is an update."""


class Drain(Announce, frozen=True, kw_only=True, tag="drain"):
    """An instance is alive but takes no new traffic."""


class Leave(Event, frozen=True, kw_only=True, tag="leave"):
    """An instance stops; nothing older than this event can bring it back."""


AnyEvent = Register | Heartbeat | Drain | Leave


class RecordBody(msgspec.Struct, frozen=True, kw_only=True):
    """The part of a stored record that an announcing event determines."""

    service_name: str
    service_id: str
    service_url: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_ms: int = DEFAULT_TTL_MS
    draining: bool = False


class InstanceInfo(msgspec.Struct, kw_only=True):
    """The fields every public shape of one instance starts with, in this order.

    The client's :class:`saga_events.ServiceInfo` (frozen, datetimes) and the
    REST API's ``web.schema.ServiceInfo`` (ISO strings) both derive from it:
    one definition of what names an instance, each keeps its own public shape.
    """

    service_id: str
    service_name: str
    service_url: str


class DrainOverride(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's drain of one instance (Eureka's OUT_OF_SERVICE): who, why,
    when (ms since the epoch) and until when (None: until undrained).

    Stored under ``saga:{ns}:override:<service>:<id>``; the registrar's apply
    script copies it into the record, adding ``self_draining`` (whether the
    instance's own announce says draining), while the key stands.
    """

    by: str
    reason: str = ""
    at_ms: int = 0
    until_ms: int | None = None
    self_draining: bool = False


class Instance(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One live instance as stored in Redis and served by the mirror.

    The field order is part of the format: the first three fields are spliced
    by the registrar's script in front of a :class:`RecordBody`.
    """

    incarnation: int
    seq: int
    registered_at_ms: int
    service_name: str
    service_id: str
    service_url: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_ms: int = DEFAULT_TTL_MS
    draining: bool = False
    override: DrainOverride | None = None  # an operator's drain; forces draining

    @property
    def registered_at(self) -> datetime:
        """When this incarnation was first registered (Redis clock), UTC."""
        return datetime.fromtimestamp(self.registered_at_ms / 1000, tz=UTC)

    @property
    def self_draining(self) -> bool:
        """Whether the instance itself says draining (an operator's drain aside)."""
        return self.override.self_draining if self.override is not None else self.draining

    def has_capability(self, capability: str | None) -> bool:
        return capability is None or capability in self.capabilities


def iso_utc(ms: int) -> str:
    """Format a time in ms since the epoch as the seed's ISO-8601 UTC form."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


_event_decoder: Final = msgspec.json.Decoder(AnyEvent)
_instance_decoder: Final = msgspec.json.Decoder(Instance)
_encoder: Final = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


def encode_record(inst: Instance) -> bytes:
    """A record as the apply script stores it: no ``override`` field unless an operator
    drained it (so an agent's next announce of a restored record is a refresh)."""
    raw = _encoder.encode(inst)
    if inst.override is None and raw.endswith(b',"override":null}'):
        raw = raw[: -len(b',"override":null}')] + b"}"
    return raw


def decode_instance(raw: bytes | str) -> Instance:
    return _instance_decoder.decode(raw)


def body_of(event: Announce) -> RecordBody:
    return RecordBody(
        service_name=event.service_name,
        service_id=event.service_id,
        service_url=event.service_url,
        capabilities=event.capabilities,
        metadata=event.metadata,
        ttl_ms=event.ttl_ms,
        draining=isinstance(event, Drain),
    )


# Whitespace (what str.isspace() calls whitespace: \s in a str pattern) and
# C0/C1 control characters. One regex search instead of a per-character loop:
# the registrar checks the URL of every heartbeat; only a non-ASCII URL pays
# for the per-character check of Unicode categories below.
_BAD_URL_CHARS: Final = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def _bad_unicode(url: str) -> str | None:
    """The first character no dialable URL holds: Unicode controls, format characters
    (bidi overrides, zero-width), separators, surrogates, private use, unassigned."""
    import unicodedata

    for ch in url:
        if ord(ch) > 0x7E and unicodedata.category(ch)[0] in "CZ":
            return ch
    return None


def check_url(url: str, schemes: frozenset[str] = DEFAULT_URL_SCHEMES) -> None:
    """Raise :class:`InvalidEvent` unless ``url`` is a URL a client should dial.

    Absolute, with an allowed scheme and a host; no whitespace, no control,
    bidi or zero-width character, no userinfo (``user:password@``: credentials
    do not belong in a registry every reader sees).
    """
    if _BAD_URL_CHARS.search(url):
        raise InvalidEvent("bad_url", f"service_url {url!r} contains whitespace or control chars")
    if not url.isascii():
        bad = _bad_unicode(url)
        if bad is not None:
            raise InvalidEvent(
                "bad_url",
                f"service_url {url!r} contains U+{ord(bad):04X} (a control, bidi, "
                "zero-width or separator character)",
            )
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise InvalidEvent("bad_url", f"service_url {url!r} is not a URL: {exc}") from None
    if parts.scheme not in schemes:
        allowed = ", ".join(sorted(schemes))
        raise InvalidEvent(
            "bad_url", f"service_url {url!r}: scheme {parts.scheme!r} is not one of {allowed}"
        )
    if not parts.hostname:
        raise InvalidEvent("bad_url", f"service_url {url!r} has no host")
    if "@" in parts.netloc:
        raise InvalidEvent(
            "bad_url",
            f"service_url of host {parts.hostname!r} carries userinfo (user:password@): "
            "credentials do not belong in the registry",
        )


def _reason_for(message: str) -> str:
    if "`$.type`" in message or "tag" in message:
        return "unknown_type"
    if "`$.service_name`" in message or "`$.service_id`" in message:
        return "bad_name"
    if "`$.ttl_ms`" in message:
        return "bad_ttl"
    if "`$.service_url`" in message:
        return "bad_url"
    if "`$.since`" in message:
        return "bad_since"
    return "invalid"


def decode_event(
    raw: bytes,
    channel_service: str | None = None,
    *,
    schemes: frozenset[str] = DEFAULT_URL_SCHEMES,
) -> AnyEvent:
    """Decode and validate one event; raise :class:`InvalidEvent` with a reason code.

    Never raises anything else, whatever ``raw`` holds: a failure of the
    decoder itself (nesting depth, encodings, numbers) is ``bad_json``.

    ``channel_service`` is the service name of the channel the event came on;
    an event that speaks for another service is rejected.
    """
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversized", f"event of {len(raw)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        event: AnyEvent = _event_decoder.decode(raw)
        if b"\\u" in raw:
            # A \\uXXXX escape may decode to a lone surrogate, which no encoder
            # can write back: refuse it here, not when the record is stored.
            _encoder.encode(event)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(_reason_for(str(exc)), str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidEvent("bad_json", str(exc)) from None
    except Exception as exc:  # RecursionError (depth), UnicodeError, MemoryError, any other
        raise InvalidEvent("bad_json", f"undecodable event ({type(exc).__name__}: {exc})") from None
    if channel_service is not None and event.service_name != channel_service:
        raise InvalidEvent(
            "channel_mismatch",
            f"event for service {event.service_name!r} sent on the channel of {channel_service!r}",
        )
    if isinstance(event, Announce):
        if event.since is not None and event.since > event.seq:
            raise InvalidEvent(
                "bad_since",
                f"since {event.since} is after the event's own seq {event.seq} "
                "(since is the seq of the agent's last content change)",
            )
        check_url(event.service_url, schemes)
    return event


def new_incarnation(now_ms: int | None = None) -> int:
    """A fresh incarnation: the time in ms times 1000 plus a random suffix."""
    import secrets

    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return ms * 1000 + secrets.randbelow(1000)
