"""The package's public surface: ``__all__`` lists exactly what it exports."""

from __future__ import annotations

import types

import saga_events


def test_all_matches_exported_names() -> None:
    """Every public name in the package namespace is in ``__all__`` and vice versa."""
    exported = {
        name
        for name, value in vars(saga_events).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(saga_events.__all__) == exported | {"__version__"}
    assert list(saga_events.__all__) == sorted(saga_events.__all__)
    for name in saga_events.__all__:
        assert hasattr(saga_events, name), name


def test_client_names_are_exported() -> None:
    """The seed's client and its helpers are importable from the package root."""
    for name in (
        "AsyncSagaServiceDiscovery",
        "FakeRegistry",
        "RegistryUnavailable",
        "SagaServiceDiscovery",
        "ServiceInfo",
    ):
        assert name in saga_events.__all__
