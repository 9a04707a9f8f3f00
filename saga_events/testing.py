"""Helpers for testing code that uses saga-events, and for saga-events' own tests.

* :func:`registry_truth` reads what Redis holds for a namespace.
* :func:`wait_mirror_matches` waits until a mirror equals that truth.
"""

from __future__ import annotations

import anyio
import msgspec

from . import model
from ._redis import RedisLike, connect
from .keys import Keys
from .mirror import Mirror
from .model import Instance


async def registry_truth(redis: RedisLike, namespace: str = "default") -> dict[str, Instance]:
    """Every instance record in Redis for ``namespace``, keyed by Redis key.

    Found by SCAN (not by the index), so a record missing from the index still
    counts; records that do not decode are reported as errors.
    """
    client = connect(redis)
    keys = Keys(namespace)
    try:
        found: dict[str, Instance] = {}
        async for raw_key in client.scan_iter(match=f"{keys.inst_prefix}*", count=1000):
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            raw = await client.get(key)
            if raw is None:
                continue
            try:
                found[key] = model.decode_instance(raw)
            except msgspec.DecodeError as exc:
                raise AssertionError(f"record {key} does not decode: {exc}") from None
        return found
    finally:
        if isinstance(redis, str):
            await client.aclose()


def _diff(view: dict[str, Instance], truth: dict[str, Instance]) -> str:
    lines = []
    for key in sorted(set(view) | set(truth)):
        a, b = view.get(key), truth.get(key)
        if a != b:
            lines.append(f"  {key}: mirror={a!r} redis={b!r}")
    return "\n".join(lines)


async def wait_mirror_matches(
    mirror: Mirror,
    redis: RedisLike,
    *,
    namespace: str = "default",
    timeout: float = 5.0,  # noqa: ASYNC109 - a plain bound, used by tests
    expected: set[str] | None = None,
) -> dict[str, Instance]:
    """Wait until ``mirror``'s view equals Redis's truth (and, if given, has
    exactly the ``expected`` keys); return the truth or raise AssertionError."""
    truth: dict[str, Instance] = {}
    with anyio.move_on_after(timeout):
        while True:
            truth = await registry_truth(redis, namespace)
            view = mirror.snapshot()
            if view == truth and (expected is None or set(truth) == expected):
                return truth
            await anyio.sleep(0.02)
    view = mirror.snapshot()
    msg = f"mirror differs from Redis after {timeout} s:\n{_diff(view, truth)}"
    if expected is not None and set(truth) != expected:
        msg += f"\nexpected keys {sorted(expected)}, Redis has {sorted(truth)}"
    raise AssertionError(msg)
