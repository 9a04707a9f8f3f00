"""The web side of saga-events: the REST gateway a registrar serves with ``--http``.

Modules: :mod:`~saga_events.web.schema` (the JSON shapes, msgspec only),
:mod:`~saga_events.web.routes` (HTTP <-> writer/view calls),
:mod:`~saga_events.web.app` (the Litestar app and its ASGI front),
:mod:`~saga_events.web.metrics` (Prometheus), :mod:`~saga_events.web.server`
(the :class:`Gateway`, uvicorn and its limits). The write logic itself is
:mod:`saga_events.writer`, which has no HTTP in it.

Importing this package costs nothing: Litestar and uvicorn are imported only
when :class:`Gateway` or :func:`run_gateway` is first used (the registrar
without ``--http`` never loads the web stack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import (
        DEFAULT_HTTP_HOST,
        DEFAULT_HTTP_PORT,
        Gateway,
        GatewayError,
        Limits,
        run_gateway,
    )

__all__ = [
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "Gateway",
    "GatewayError",
    "Limits",
    "run_gateway",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from . import server
        except ImportError as exc:  # pragma: no cover - exercised by hand
            raise ImportError(
                "the HTTP gateway needs the server extra: pip install 'saga-events[server]'"
            ) from exc
        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
