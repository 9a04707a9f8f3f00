"""Testing with saga-events: the pytest plugin, an in-memory fake, the chaos harness, a clock.

* :mod:`saga_events.testing.plugin` -- the pytest plugin (entry point ``saga_events``):
  the ``saga_*`` fixtures, :class:`SagaTestRegistry`, :func:`registry_truth`,
  :func:`wait_mirror_matches`, :func:`eventually`.
* :mod:`saga_events.testing.fake` -- :class:`FakeRegistry`, a registry in a dictionary.
* :mod:`saga_events.testing.chaos` -- the chaos harness (``python -m
  saga_events.testing.chaos``): :func:`run_chaos`, :class:`ChaosConfig`.
* :mod:`saga_events.testing.clock` -- :class:`Clock` and :class:`FakeClock`, for tests
  of TTL and backoff logic without real waits.

Contract: every name is importable from here (``from saga_events.testing import
eventually``), but a submodule is imported only when one of its names is first used, so
``import saga_events`` (which takes :class:`FakeRegistry` from here) never imports pytest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chaos import FAULTS, ChaosConfig, ChaosReport, Deployment, Violation, run_chaos
    from .clock import Clock, FakeClock, SystemClock
    from .fake import FakeRegistry
    from .plugin import (
        SagaTestRegistry,
        eventually,
        registry_truth,
        saga_client,
        saga_fake,
        saga_http_url,
        saga_mirror,
        saga_redis,
        saga_redis_url,
        saga_registry,
        wait_mirror_matches,
    )

_WHERE: dict[str, str] = {
    "FakeRegistry": "fake",
    "Clock": "clock",
    "FakeClock": "clock",
    "SystemClock": "clock",
    **dict.fromkeys(
        ("FAULTS", "ChaosConfig", "ChaosReport", "Deployment", "Violation", "run_chaos"), "chaos"
    ),
    **dict.fromkeys(
        (
            "SagaTestRegistry",
            "eventually",
            "registry_truth",
            "saga_client",
            "saga_fake",
            "saga_http_url",
            "saga_mirror",
            "saga_redis",
            "saga_redis_url",
            "saga_registry",
            "wait_mirror_matches",
        ),
        "plugin",
    ),
}

__all__ = [
    "FAULTS",
    "ChaosConfig",
    "ChaosReport",
    "Clock",
    "Deployment",
    "FakeClock",
    "FakeRegistry",
    "SagaTestRegistry",
    "SystemClock",
    "Violation",
    "eventually",
    "registry_truth",
    "run_chaos",
    "saga_client",
    "saga_fake",
    "saga_http_url",
    "saga_mirror",
    "saga_redis",
    "saga_redis_url",
    "saga_registry",
    "wait_mirror_matches",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
