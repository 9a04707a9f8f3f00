"""An API gateway that registers itself and routes to services it discovers.

    saga-events up                        # in another terminal
    python examples/gateway.py            # then: curl localhost:8000/orders/orders/7

``GET /<service>/<path>`` is forwarded to an instance of ``<service>`` found
through the registry; when the registry has none (or cannot be reached), a
static fallback URL answers instead (SAGA_FALLBACKS, ``name=url,name=url``).
Responses carry ``x-saga-source`` (registry, cache, stale, fallback) and
``x-saga-instance``. Unknown services get 502 with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from saga_events import AsyncSagaServiceDiscovery, SagaError

HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
SERVICE_URL = os.environ.get("SERVICE_URL", f"http://{HOST}:{PORT}")
DEFAULT_FALLBACKS = "authentication=http://localhost:8001,payment=http://localhost:8002"

log = logging.getLogger("gateway")

# Headers that describe one hop, not the message (RFC 9110, section 7.6.1).
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length",
}  # fmt: skip


def parse_fallbacks(text: str) -> dict[str, str]:
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {name.strip(): url.strip() for name, url in pairs}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    fallbacks = parse_fallbacks(os.environ.get("SAGA_FALLBACKS", DEFAULT_FALLBACKS))
    async with (
        AsyncSagaServiceDiscovery(fallbacks=fallbacks) as saga,
        httpx.AsyncClient(timeout=10) as http,
    ):
        info = await saga.register_service("gateway", SERVICE_URL, ["rest", "graphql", "grpc"])
        log.info("registered gateway as %s (%s)", info.service_id, info.source)
        app.state.saga, app.state.http = saga, http
        yield


app = FastAPI(title="gateway", lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy"}


@app.api_route("/{service}/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def route(service: str, path: str, request: Request) -> Response:
    saga: AsyncSagaServiceDiscovery = request.app.state.saga
    http: httpx.AsyncClient = request.app.state.http
    try:
        target = await saga.discover_service(service)
    except SagaError as exc:
        return JSONResponse({"error": f"no route to {service!r}: {exc}"}, status_code=502)
    try:
        upstream = await http.request(
            request.method,
            f"{target.service_url.rstrip('/')}/{path}",
            params=request.query_params,
            content=await request.body(),
            headers={k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP},
        )
    except httpx.HTTPError as exc:
        log.warning("%s at %s failed: %s", service, target.service_url, exc)
        return JSONResponse({"error": f"{service!r} did not answer: {exc}"}, status_code=502)
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
    headers.pop("content-encoding", None)  # httpx already decoded the body
    headers["x-saga-source"] = target.source
    headers["x-saga-instance"] = target.service_id
    return Response(upstream.content, status_code=upstream.status_code, headers=headers)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    uvicorn.run(app, host=HOST, port=PORT, log_level="warning")
