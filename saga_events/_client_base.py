"""What the client reports and keeps: ServiceInfo, Registration, the Backend seam (internal).

Contract: :class:`ServiceInfo` is the one instance shape of the client and of
the REST API (exported as ``saga_events.ServiceInfo``); :class:`Registration`
is what the client keeps announcing for a name, checked by
:func:`identity.check_announce` (:func:`check_registration`); :class:`Backend`
is the transport seam (Redis, REST, the in-memory fake). Pure data, no I/O.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import msgspec
from anyio.abc import TaskGroup

from . import identity, model
from .errors import InvalidEvent
from .health import HealthCheck, HealthGate
from .model import Instance

Source = Literal["registry", "stale", "cache", "fallback", "local"]


# msgspec lets a frozen Struct extend a non-frozen one; mypy's dataclass rule does not know.
class ServiceInfo(model.InstanceInfo, frozen=True, kw_only=True):  # type: ignore[misc]
    """One service instance as the client reports it (the seed's shape).

    ``source`` says where the answer came from: ``registry`` (a live answer),
    ``cache`` (REST mode, younger than ``cache_ttl``), ``stale`` (the registry
    cannot be reached; the last answer it gave), ``fallback`` (the static
    ``fallbacks`` map) or ``local`` (a registration not confirmed yet).
    ``last_heartbeat`` is None where it is not known: a push mirror does not
    see heartbeats (by design they cost mirrors nothing). ``ttl_seconds`` and
    ``draining`` are the record's (None and False where not known).

    It is also the REST API's shape: :meth:`from_json` decodes the gateway's
    answer for one instance (unknown fields ignored) and :meth:`to_dict` gives
    it back. Its first fields are :class:`model.InstanceInfo`'s, shared with
    the REST API's own ``web.schema.ServiceInfo``.
    """

    capabilities: tuple[str, ...] = ()
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl_seconds: float | None = None
    draining: bool = False
    source: Source = "registry"

    @classmethod
    def from_instance(
        cls,
        inst: Instance,
        source: Source = "registry",
        last_heartbeat: datetime | None = None,
    ) -> ServiceInfo:
        return cls(
            service_id=inst.service_id,
            service_name=inst.service_name,
            service_url=inst.service_url,
            capabilities=inst.capabilities,
            registered_at=inst.registered_at,
            last_heartbeat=last_heartbeat,
            metadata=dict(inst.metadata),
            ttl_seconds=inst.ttl_ms / 1000,
            draining=inst.draining,
            source=source,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ServiceInfo:
        """Decode the REST API's JSON for one instance; ``source`` is ``registry``.

        Raises ``msgspec.ValidationError``/``DecodeError`` (``msgspec.MsgspecError``)
        for a body of another shape.
        """
        info = _wire_decoder.decode(raw)
        # ``source`` is ours to say, not the server's.
        return info if info.source == "registry" else info.with_source("registry")

    def with_source(self, source: Source) -> ServiceInfo:
        return msgspec.structs.replace(self, source=source)

    def to_dict(self) -> dict[str, Any]:
        """The seed's JSON shape (ISO-8601 UTC times), plus ``metadata`` and ``source``."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        out["capabilities"] = list(self.capabilities)
        for field in ("registered_at", "last_heartbeat"):
            value = getattr(self, field)
            out[field] = _iso(value) if value is not None else None
        return out


def _iso(dt: datetime) -> str:
    return model.iso_utc(int(dt.timestamp() * 1000))


def _now() -> datetime:
    return datetime.now(UTC)


_wire_decoder: Final = msgspec.json.Decoder(ServiceInfo)


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """What the client keeps announcing for one registered name."""

    service_name: str
    service_url: str
    service_id: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    ttl: float = 60.0

    def local_info(self) -> ServiceInfo:
        return ServiceInfo(
            service_id=self.service_id,
            service_name=self.service_name,
            service_url=self.service_url,
            capabilities=self.capabilities,
            metadata=dict(self.metadata),
            source="local",
        )


def check_registration(reg: Registration, schemes: frozenset[str]) -> None:
    """Check ``reg`` by the registrar's own rules (:func:`identity.check_announce`).

    The same check in both modes, and the agent's: a registration the
    registrar would drop (e.g. an over-long metadata key) is refused here, not
    published to be rejected out of sight.
    """
    identity.check_announce(
        reg.service_name,
        reg.service_id,
        reg.service_url,
        reg.capabilities,
        reg.metadata,
        round(reg.ttl * 1000),
        schemes=schemes,
    )


Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class HealthOptions:
    """The client's ``health_check`` options, handed to each registration's gate."""

    check: HealthCheck
    timeout: float = 2.0
    executor: concurrent.futures.Executor | None = None

    def gate(self) -> HealthGate:
        return HealthGate(self.check, self.timeout, self.executor)


@dataclass(frozen=True, slots=True)
class Filters:
    """A discovery's selectors: capability, metadata ``where`` and ``prefer`` pairs
    (see :meth:`saga_events.Mirror.pick`). Hashable: REST mode caches by it."""

    capability: str | None = None
    where: Pairs = ()
    prefer: Pairs = ()

    @classmethod
    def of(
        cls,
        capability: str | None = None,
        where: Mapping[str, str] | None = None,
        prefer: Mapping[str, str] | None = None,
    ) -> Filters | None:
        """The filters, or None when there are none (the seed's plain discovery)."""
        if capability is None and not where and not prefer:
            return None
        for label, pairs in (("where", where), ("prefer", prefer)):
            for k, v in (pairs or {}).items():
                if not isinstance(k, str) or not isinstance(v, str) or not k:
                    raise InvalidEvent(
                        "bad_filter",
                        f"{label} needs non-empty str keys and str values: {k!r}={v!r}",
                    )
        return cls(
            capability, tuple(sorted((where or {}).items())), tuple(sorted((prefer or {}).items()))
        )

    def params(self) -> list[tuple[str, str | int | float | bool | None]]:
        """The HTTP query parameters (``where=key:value``, repeated; see docs/API.md)."""
        out: list[tuple[str, str | int | float | bool | None]] = []
        if self.capability is not None:
            out.append(("capability", self.capability))
        out += [("where", f"{k}:{v}") for k, v in self.where]
        out += [("prefer", f"{k}:{v}") for k, v in self.prefer]
        return out

    def matches(self, info: ServiceInfo, pairs: Pairs) -> bool:
        if self.capability is not None and self.capability not in info.capabilities:
            return False
        return all(info.metadata.get(k) == v for k, v in pairs)

    def choose(self, live: list[ServiceInfo]) -> list[ServiceInfo]:
        """The candidates among ``live``: those matching ``where`` (and ``prefer``, if any do)."""
        base = [i for i in live if self.matches(i, self.where)]
        if self.prefer:
            preferred = [i for i in base if self.matches(i, self.prefer)]
            if preferred:
                return preferred
        return base


class Backend(Protocol):
    """A transport of the client (internal): Redis, REST, or the in-memory fake."""

    mode: str

    async def start(self, tg: TaskGroup) -> None: ...

    async def register(self, reg: Registration) -> tuple[ServiceInfo, bool]:
        """Start announcing ``reg``; return what is registered and whether it is confirmed."""
        ...

    async def refresh(self, name: str) -> bool: ...

    async def unregister(self, name: str) -> bool: ...

    def is_registered(self, name: str) -> bool: ...

    async def discover(self, name: str, filters: Filters | None = None) -> ServiceInfo: ...

    async def aclose(self) -> None: ...
