"""Discover a service with retries and backoff, then call it: a plain script.

    python examples/discover_with_retries.py orders /health --attempts 6

Retries cover a service that is still starting or a registry that is briefly
unreachable: each failed attempt waits twice as long as the one before (with
jitter, capped). Prints one JSON object on success; exits 1 with the reason
when every attempt failed. Reads SAGA_SERVICE_URL or SAGA_REDIS_URL.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time

import httpx

from saga_events import SagaError, SagaServiceDiscovery, ServiceInfo

log = logging.getLogger("discover")


def discover_with_retries(
    saga: SagaServiceDiscovery,
    name: str,
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
) -> ServiceInfo:
    """``saga.discover_service(name)``, retried; raises the last error after ``attempts``."""
    for attempt in range(1, attempts + 1):
        try:
            return saga.discover_service(name)
        except SagaError as exc:
            if attempt == attempts:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("attempt %d/%d: %s; retrying in %.2f s", attempt, attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service")
    parser.add_argument("path", nargs="?", default="", help="GET this path on the service")
    parser.add_argument("--attempts", type=int, default=5)
    parser.add_argument("--base-delay", type=float, default=0.5)
    parser.add_argument("--max-delay", type=float, default=8.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise

    with SagaServiceDiscovery() as saga:
        try:
            info = discover_with_retries(
                saga,
                args.service,
                attempts=args.attempts,
                base_delay=args.base_delay,
                max_delay=args.max_delay,
            )
        except SagaError as exc:
            log.error("giving up on %s after %d attempts: %s", args.service, args.attempts, exc)
            return 1
    result: dict[str, object] = {
        "service": info.service_name,
        "service_url": info.service_url,
        "service_id": info.service_id,
        "source": info.source,
    }
    if args.path:
        response = httpx.get(f"{info.service_url.rstrip('/')}{args.path}", timeout=10)
        result["status"] = response.status_code
        result["body"] = response.json()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
