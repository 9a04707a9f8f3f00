"""The REST API's JSON shapes, defined once: requests, answers and errors.

Contract: these msgspec structs *are* the wire format of the HTTP API (the
seed's shape: times are ISO-8601 UTC strings, ``ttl_seconds`` in seconds).
The gateway answers with them and the OpenAPI document is generated from
them; a client that reads the REST API should decode into
:class:`ServiceInfo` here rather than define its own copy. This module
imports neither Litestar nor uvicorn (only msgspec), so a client may import
it without the server extra.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from .. import model

#: epoch second -> its "YYYY-mm-ddTHH:MM:SS." text (bounded; cleared when full)
_SECONDS: Final[dict[int, str]] = {}
#: below this (2**32 s, the year 2106) ms / 1000 as a float rounds back to each ms
_EXACT_MS: Final = 2**32 * 1000


def iso_utc(ms: int) -> str:
    """:func:`saga_events.model.iso_utc`'s text, the date part formatted once per second
    (it was a few % of a register's CPU)."""
    if not 0 <= ms < _EXACT_MS:
        return model.iso_utc(ms)  # where its float seconds lose the milliseconds
    sec, milli = divmod(ms, 1000)
    head = _SECONDS.get(sec)
    if head is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        head = _SECONDS[sec] = model.iso_utc(sec * 1000)[:-4]
    return f"{head}{milli:03d}Z"


NAME_RULE: Final = "1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"

# The OpenAPI document states the rules in ECMA-262 regex syntax (``$``, not
# Python's ``\Z``); saga_events.model then applies the exact rules to every
# write, so a name with a trailing newline still gets a 422.
NAME_DOC_PATTERN: Final = model.NAME_PATTERN.removesuffix(r"\Z") + "$"

_URL_DOC_PATTERN: Final = (
    f"^({'|'.join(sorted(model.DEFAULT_URL_SCHEMES))})"
    r"://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][!-~]*)?$"
)

HttpName = Annotated[
    str, Meta(pattern=NAME_DOC_PATTERN, description=f"{NAME_RULE}.", examples=["gateway"])
]
HttpUrl = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=2048,
        description=(
            "Absolute URL with a host; scheme one of http, https, grpc, grpcs, tcp, redis "
            "(the registrar's allow-list)."
        ),
        examples=["http://localhost:8000"],
        extra_json_schema={"extra": {"pattern": _URL_DOC_PATTERN}},
    ),
]
HttpCapabilities = Annotated[
    list[HttpName],
    Meta(
        description="What the instance offers, e.g. rest, graphql, grpc.",
        examples=[["rest", "graphql", "grpc"]],
        extra_json_schema={"extra": {"items": {"type": "string", "pattern": NAME_DOC_PATTERN}}},
    ),
]
HttpMetadata = Annotated[
    dict[model.MetaKey, model.MetaValue],
    Meta(
        description="Free-form string labels (keys 1-128, values up to 2048 characters).",
        extra_json_schema={
            "extra": {
                "propertyNames": {"minLength": 1, "maxLength": 128},
                "additionalProperties": {"type": "string", "maxLength": 2048},
            }
        },
    ),
]


class RegisterRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/services/register``; unknown fields are ignored."""

    service_name: HttpName
    service_url: HttpUrl
    capabilities: HttpCapabilities = []
    service_id: HttpName | None = None
    metadata: HttpMetadata = {}
    ttl_seconds: Annotated[
        float,
        Meta(
            ge=model.MIN_TTL_MS / 1000,
            le=model.MAX_TTL_MS / 1000,
            description="Seconds until the instance expires unless heartbeated (default 60).",
        ),
    ] = model.DEFAULT_TTL_MS / 1000


class ServiceInfo(model.InstanceInfo, kw_only=True, omit_defaults=True):
    """One live instance, in the seed's shape (times are ISO-8601 UTC); its first
    fields are :class:`model.InstanceInfo`'s, as the client's ServiceInfo's are.
    The ``drained_*`` fields appear only while an operator drains it."""

    capabilities: list[str]
    registered_at: str
    last_heartbeat: str
    metadata: dict[str, str]
    ttl_seconds: float
    draining: bool
    # An operator's drain (additions to the seed's shape; absent when none).
    drained_by: str | None = None
    drain_reason: str | None = None
    drained_until: str | None = None

    @classmethod
    def of(cls, inst: model.Instance, last_heartbeat_ms: int | None = None) -> ServiceInfo:
        """The wire shape of a registry record (``last_heartbeat`` defaults to its
        registration time where the heartbeat time is not known)."""
        return cls(
            service_id=inst.service_id,
            service_name=inst.service_name,
            service_url=inst.service_url,
            capabilities=list(inst.capabilities),
            registered_at=iso_utc(inst.registered_at_ms),
            last_heartbeat=iso_utc(
                inst.registered_at_ms if last_heartbeat_ms is None else last_heartbeat_ms
            ),
            metadata=dict(inst.metadata),
            ttl_seconds=inst.ttl_ms / 1000,
            draining=inst.draining,
            drained_by=ov.by if (ov := inst.override) is not None else None,
            drain_reason=ov.reason if ov is not None else None,
            drained_until=(
                iso_utc(ov.until_ms) if ov is not None and ov.until_ms is not None else None
            ),
        )


class HeartbeatStatus(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A health report in a heartbeat (for services that are not Python)."""

    status: Literal["failing", "passing"]
    reason: Annotated[str, msgspec.Meta(max_length=200)] = ""


class DrainRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Who drains and why (optional body of a drain; headers X-Saga-By and
    X-Saga-Reason are the alternative)."""

    by: str | None = None
    reason: str | None = None


class DrainResult(msgspec.Struct, kw_only=True):
    """The instances a drain or undrain acted on, as they are now."""

    service_name: str
    instances: list[ServiceInfo]


class ServiceList(msgspec.Struct, kw_only=True):
    """Every service with at least one instance, and its instances."""

    services: dict[str, list[ServiceInfo]]
    count: int
    stale: bool


class HeartbeatResult(msgspec.Struct, kw_only=True):
    """Which instances of a service a heartbeat kept alive."""

    service_name: str
    service_ids: list[str]
    last_heartbeat: str


class DeregisterResult(msgspec.Struct, kw_only=True):
    """Which instances of a service a DELETE removed."""

    service_name: str
    removed: list[str]


class RedisHealth(msgspec.Struct, kw_only=True):
    ok: bool
    latency_ms: float | None
    error: str | None


class RegistrarHealth(msgspec.Struct, kw_only=True):
    rid: str
    subscribed: bool
    uptime_seconds: float
    # False while the keyspace notification flags the mirrors need are missing
    # (a registrar without CONFIG checks them; ``saga-events setup`` sets them).
    notifications_ok: bool | None = None
    notifications_problem: str = ""


class MirrorHealth(msgspec.Struct, kw_only=True):
    synced: bool
    stale: bool
    instances: int


class Health(msgspec.Struct, kw_only=True):
    """``ok`` when Redis answers; ``degraded`` when it answers but the view lags."""

    status: Literal["ok", "degraded", "unavailable"]
    redis: RedisHealth
    registrar: RegistrarHealth
    mirror: MirrorHealth


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every error answer: the HTTP status, a short reason code, and what is wrong.

    ``detail`` speaks about the caller's request only: no key names, Redis
    errors or other internals (those go to the gateway's log).
    """

    status_code: int
    error: str
    detail: str
