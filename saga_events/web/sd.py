"""Prometheus service discovery: the registry as ``http_sd_config`` target groups.

``GET /api/v1/sd/prometheus[?service=NAME][&capability=CAP]`` answers the JSON
list that Prometheus's ``http_sd_configs`` reads: one target group per live
instance (draining ones included, labelled so), ``targets: ["host:port"]``
from the instance's URL (the scheme's default port when the URL names none:
http/grpc 80, https/grpcs 443, redis/rediss 6379; an instance whose URL has
neither, e.g. ``tcp://host``, is left out), and these labels:

* ``__meta_saga_service``, ``__meta_saga_service_id``
* ``__meta_saga_capabilities``: ``,rest,grpc,`` (a leading and a trailing
  comma, as Prometheus's Consul discovery writes tags, so a relabel regex
  ``.*,rest,.*`` matches a whole capability); empty without capabilities
* ``__meta_saga_draining``: ``true`` / ``false``
* ``__meta_saga_url_scheme`` and ``__meta_saga_url`` (the whole URL)
* ``__meta_saga_metadata_<key>`` for every metadata entry, the key made a
  label name (every character outside ``[a-zA-Z0-9_]`` becomes ``_``); when
  two keys give one name, the first key in sorted order wins.

Groups come sorted by (service, id), so the answer is stable. The function
:func:`prometheus_targets` is pure; :func:`sd_route` serves it from the
gateway's mirror (no Redis round trip). A read: no token needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Final
from urllib.parse import urlsplit

import msgspec
from litestar import get
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from .. import model
from ..mirror import Mirror
from ..model import Instance

DEFAULT_PORTS: Final = {
    "http": 80,
    "grpc": 80,
    "https": 443,
    "grpcs": 443,
    "redis": 6379,
    "rediss": 6379,
}
META: Final = "__meta_saga_"
_NOT_LABEL: Final = re.compile(r"[^a-zA-Z0-9_]")
_NAME_DOC_PATTERN: Final = model.NAME_PATTERN.removesuffix(r"\Z") + "$"


class TargetGroup(msgspec.Struct, kw_only=True):
    """One ``http_sd_config`` target group: one instance's address and its labels."""

    targets: list[str]
    labels: dict[str, str]


def label_name(key: str) -> str:
    """A metadata key as a Prometheus label name suffix: ``[a-zA-Z0-9_]`` only."""
    return _NOT_LABEL.sub("_", key)


def target_of(url: str) -> tuple[str, str] | None:
    """``(host:port, scheme)`` of an instance URL; None when it names no port and its
    scheme has no default, or it has no host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        return None
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
        if port is None:
            return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}", scheme


def prometheus_targets(
    instances: Iterable[Instance], *, service: str | None = None, capability: str | None = None
) -> list[TargetGroup]:
    """The ``http_sd_config`` target groups of ``instances`` (see the module docstring)."""
    groups: list[TargetGroup] = []
    for inst in sorted(instances, key=lambda i: (i.service_name, i.service_id)):
        if service is not None and inst.service_name != service:
            continue
        if capability is not None and capability not in inst.capabilities:
            continue
        target = target_of(inst.service_url)
        if target is None:
            continue
        address, scheme = target
        labels = {
            f"{META}service": inst.service_name,
            f"{META}service_id": inst.service_id,
            f"{META}capabilities": (
                "," + ",".join(inst.capabilities) + "," if inst.capabilities else ""
            ),
            f"{META}draining": "true" if inst.draining else "false",
            f"{META}url_scheme": scheme,
            f"{META}url": inst.service_url,
        }
        for key in sorted(inst.metadata):
            labels.setdefault(f"{META}metadata_{label_name(key)}", inst.metadata[key])
        groups.append(TargetGroup(targets=[address], labels=labels))
    return groups


def sd_route(mirror: Mirror) -> HTTPRouteHandler:
    """The ``GET /api/v1/sd/prometheus`` route handler, reading ``mirror``."""

    @get(
        "/api/v1/sd/prometheus",
        summary="Prometheus http_sd_config targets",
        description=(
            "Target groups for Prometheus's http_sd_configs: host:port of each live instance "
            "with __meta_saga_service, __meta_saga_service_id, __meta_saga_capabilities "
            "(',a,b,'), __meta_saga_draining, __meta_saga_url_scheme, __meta_saga_url and "
            "__meta_saga_metadata_<key> labels."
        ),
    )
    async def prometheus_sd(
        service: Annotated[
            str | None,
            Parameter(pattern=_NAME_DOC_PATTERN, required=False, description="Only this service."),
        ] = None,
        capability: Annotated[
            str | None,
            Parameter(
                pattern=_NAME_DOC_PATTERN,
                required=False,
                description="Only instances offering this capability.",
            ),
        ] = None,
    ) -> list[TargetGroup]:
        if service is not None:
            insts: Iterable[Instance] = mirror.instances(service)
        else:
            insts = mirror.snapshot().values()
        return prometheus_targets(insts, service=service, capability=capability)

    return prometheus_sd
