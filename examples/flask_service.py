"""A Flask service using the blocking client: register at start, leave at exit.

    saga-events up                        # in another terminal
    python examples/flask_service.py

The blocking :class:`SagaServiceDiscovery` runs its heartbeats in a
background thread, so Flask's own threads never wait on the registry. It
reads SAGA_SERVICE_URL or SAGA_REDIS_URL; SERVICE_NAME, HOST, PORT and
SERVICE_URL say who this service is. ``/peer/<name>`` shows discovery from a
request handler (any thread may call the client).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from flask import Flask

from saga_events import SagaError, SagaServiceDiscovery

SERVICE_NAME = os.environ.get("SERVICE_NAME", "inventory")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8003"))
SERVICE_URL = os.environ.get("SERVICE_URL", f"http://{HOST}:{PORT}")

log = logging.getLogger(SERVICE_NAME)
saga = SagaServiceDiscovery()  # starts its background thread on first use
app = Flask(SERVICE_NAME)


@app.get("/health")
def health() -> dict[str, object]:
    return {"status": "healthy", "registered": saga.is_registered(SERVICE_NAME)}


@app.get("/peer/<name>")
def peer(name: str) -> tuple[dict[str, object], int]:
    try:
        info = saga.discover_service(name)
    except SagaError as exc:
        return {"error": str(exc)}, 404
    return {"service_url": info.service_url, "source": info.source}, 200


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)  # unwinds app.run() so that the finally below unregisters


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    info = saga.register_service(SERVICE_NAME, SERVICE_URL, ["rest"])
    log.info("registered %s as %s (%s)", SERVICE_NAME, info.service_id, info.source)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app.run(host=HOST, port=PORT)
    finally:
        saga.close()  # says leave; also runs at interpreter exit if forgotten
        log.info("unregistered %s", SERVICE_NAME)


if __name__ == "__main__":
    main()
