"""The dashboard's routes: ``GET /ui`` (the page), its script and style, and ``/`` → ``/ui``.

The page is three static files shipped as package data (``saga_events/web/ui``),
read once when the routes are built; no build step, no external request. It
is a client of the public API (``/api/v1/watch``, ``/health``) like any
other. Every answer carries a strict Content-Security-Policy (scripts and
styles from the gateway only, no inline script, no frames, no plugins) and
``X-Content-Type-Options: nosniff``; the script puts registry text on the
page only as text, never as HTML. Reads: no token needed.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.response import Redirect

CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


def ui_file(name: str) -> bytes:
    """One of the dashboard's files from the package data."""
    return resources.files("saga_events.web").joinpath("ui", name).read_bytes()


def ui_routes() -> list[HTTPRouteHandler]:
    """The route handlers of ``/``, ``/ui``, ``/ui/app.js`` and ``/ui/app.css``."""
    files = {name: (ui_file(name), media) for name, media in _FILES.items()}

    def serve(name: str) -> Response[bytes]:
        body, media = files[name]
        return Response(body, media_type=media, headers=SECURITY_HEADERS)

    @get(
        ["/ui", "/ui/"],
        media_type="text/html",
        summary="The live dashboard",
        description=(
            "An HTML page (with /ui/app.js and /ui/app.css) showing services, instances, "
            "health and recent changes, live from /api/v1/watch; / redirects here."
        ),
        response_description="The dashboard page (text/html).",
    )
    async def ui_index() -> Response[bytes]:

        return serve("index.html")

    @get("/ui/app.js", include_in_schema=False)
    async def ui_script() -> Response[bytes]:
        return serve("app.js")

    @get("/ui/app.css", include_in_schema=False)
    async def ui_style() -> Response[bytes]:
        return serve("app.css")

    @get("/", include_in_schema=False)
    async def root() -> Redirect:
        return Redirect("/ui", status_code=302)

    return [ui_index, ui_script, ui_style, root]
