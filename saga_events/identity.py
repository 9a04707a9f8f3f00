"""Identity: names, instance ids and the epoch format, in one place.

Contract:

* :func:`is_valid_name` is the one rule for service names, instance ids,
  capabilities and namespaces (``model.NAME_PATTERN``).
* Instance ids come in two kinds, and every part of saga-events uses one of
  these two functions, never its own scheme:

  - :func:`process_service_id` names one *process*: ``<host>-<pid>-<random>``.
    Two workers of one app (gunicorn, uvicorn) get two ids, so a recycled
    worker's ``leave`` never hides a live sibling. A process that dies
    without leaving is reaped one ttl later, like any crash.
  - :func:`stable_service_id` names a (service, url) pair for writers that
    have no process of their own to name (HTTP registrations without a
    ``service_id``): the same pair always gives the same id, so a client that
    re-registers refreshes its instance instead of adding a twin.

* :func:`check_announce` is the one check of a record before it is sent
  (agent, client, gateway): it runs the record through
  :func:`model.decode_event`, the registrar's own validator.
* The epoch (``saga:{ns}:epoch``) is ``<started_ms>-<hex>:<state>`` with state
  ``rebuilding`` or ``ready``; :func:`new_epoch` makes one and
  :func:`parse_epoch` is the only parser. The Lua scripts compare the state
  suffix only (``:rebuilding``), which this format keeps at the end.

Everything here is pure and can be shared between threads.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from . import model
from .errors import InvalidEvent
from .model import NAME_PATTERN

NAME_RE: Final = re.compile(NAME_PATTERN)
"""Service names, instance ids and namespaces: no ``:``, glob or hash-tag characters."""

REBUILDING: Final = "rebuilding"
READY: Final = "ready"
EpochState = Literal["rebuilding", "ready"]


def is_valid_name(value: str) -> bool:
    """Return True when ``value`` may be used as a service name, id or namespace."""
    return NAME_RE.fullmatch(value) is not None


def host_slug() -> str:
    """This host's name reduced to the name rules (at most 60 characters)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:60]
    return host or "host"


def process_service_id() -> str:
    """An id for one process's instance: ``<host>-<pid>-<6 hex>``, new on every call."""
    return f"{host_slug()}-{os.getpid()}-{secrets.token_hex(3)}"


def stable_service_id(service_name: str, service_url: str) -> str:
    """The id of a (name, url) pair: ``<name>-<12 hex of sha256(name, url)>``.

    Used where no process owns the instance (an HTTP registration that names
    no id); the same pair always maps to the same id.
    """
    digest = hashlib.sha256(f"{service_name}\n{service_url}".encode()).hexdigest()[:12]
    return f"{service_name[:100]}-{digest}"


@dataclass(frozen=True, slots=True)
class Epoch:
    """A parsed epoch value: ``id`` is ``<started_ms>-<hex>``."""

    id: str
    started_ms: int | None
    state: str

    @property
    def rebuilding(self) -> bool:
        return self.state == REBUILDING

    def __str__(self) -> str:
        return f"{self.id}:{self.state}"


def new_epoch(now_ms: int, state: EpochState) -> Epoch:
    """A fresh epoch that started at ``now_ms`` (Redis's clock where there is one)."""
    return Epoch(f"{now_ms}-{secrets.token_hex(4)}", now_ms, state)


def parse_epoch(value: bytes | str | None) -> Epoch | None:
    """Parse a stored epoch; None when there is none. Never raises."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    # The state is the suffix after the last colon, as the Lua scripts read it.
    epoch_id, colon, state = text.rpartition(":")
    if not colon:
        epoch_id, state = text, ""
    started, _, _ = epoch_id.partition("-")
    return Epoch(epoch_id, int(started) if started.isdigit() else None, state)


def check_announce(
    service_name: str,
    service_id: str,
    service_url: str,
    capabilities: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
    ttl_ms: int = model.DEFAULT_TTL_MS,
    *,
    schemes: frozenset[str] = model.DEFAULT_URL_SCHEMES,
) -> None:
    """Raise :class:`InvalidEvent` unless the registrar would accept this record.

    The one check of a record before it is sent, used by the agent, the
    client (both modes) and the gateway: it builds the ``register`` event and
    runs it through :func:`model.decode_event`, the registrar's own validator,
    on the service's own channel. Nothing else decides what is valid; the
    only addition is a TTL message in seconds, the unit callers pass.
    """
    if not model.MIN_TTL_MS <= ttl_ms <= model.MAX_TTL_MS:
        raise InvalidEvent(
            "bad_ttl",
            f"ttl {ttl_ms / 1000:g} s is outside "
            f"[{model.MIN_TTL_MS / 1000:g} s, {model.MAX_TTL_MS / 1000:g} s]",
        )
    event = model.Register(
        service_name=service_name,
        service_id=service_id,
        incarnation=0,
        seq=0,
        service_url=service_url,
        capabilities=tuple(capabilities),
        metadata=dict(metadata or {}),
        ttl_ms=ttl_ms,
    )
    model.decode_event(model.encode(event), service_name, schemes=schemes)
