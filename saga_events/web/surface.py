"""The web surface's routes in one list: the watch stream, Prometheus SD and the dashboard.

The app builder adds ``web_routes(hub, mirror)`` to its route handlers and
runs ``hub.run`` (a :class:`~saga_events.web.watch.WatchHub`) in the
gateway's task group; nothing else is needed. Every route here is a read
and needs no token.
"""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

from ..mirror import Mirror
from .sd import sd_route
from .ui_routes import ui_routes
from .watch import WatchHub, watch_route


def web_routes(hub: WatchHub, mirror: Mirror) -> list[HTTPRouteHandler]:
    """``/api/v1/watch``, ``/api/v1/sd/prometheus``, ``/ui`` (+ its files) and ``/``."""
    return [watch_route(hub), sd_route(mirror), *ui_routes()]
