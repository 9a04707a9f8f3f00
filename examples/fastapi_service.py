"""A FastAPI service that registers itself in its lifespan, stays alive, and leaves.

    saga-events up                          # in another terminal
    python examples/fastapi_service.py      # then: curl localhost:8030/api/v1/services/orders

The client reads SAGA_SERVICE_URL (REST, default http://localhost:8030) or
SAGA_REDIS_URL (Redis mode). SERVICE_NAME, HOST, PORT and SERVICE_URL say
who this service is. The client heartbeats by itself (every ttl/3) and
registers again if the registry forgot it; leaving the ``async with`` block at
shutdown (Ctrl-C or SIGTERM) unregisters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request

from saga_events import AsyncSagaServiceDiscovery

SERVICE_NAME = os.environ.get("SERVICE_NAME", "orders")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8002"))
SERVICE_URL = os.environ.get("SERVICE_URL", f"http://{HOST}:{PORT}")

log = logging.getLogger(SERVICE_NAME)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncSagaServiceDiscovery() as saga:
        # Does not raise when the registry is down: the service starts anyway,
        # and the client keeps trying in the background.
        info = await saga.register_service(SERVICE_NAME, SERVICE_URL, ["rest"])
        log.info("registered %s as %s (%s)", SERVICE_NAME, info.service_id, info.source)
        app.state.saga = saga
        yield
    log.info("unregistered %s", SERVICE_NAME)


app = FastAPI(title=SERVICE_NAME, lifespan=lifespan)


@app.get("/health")
async def health(request: Request) -> dict[str, object]:
    saga: AsyncSagaServiceDiscovery = request.app.state.saga
    return {
        "status": "healthy",
        "service": SERVICE_NAME,
        "registered": saga.is_registered(SERVICE_NAME),
    }


@app.get("/orders/{order_id}")
async def get_order(order_id: int) -> dict[str, object]:
    return {"order_id": order_id, "status": "shipped", "served_by": SERVICE_NAME}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    uvicorn.run(app, host=HOST, port=PORT, log_level="warning")
