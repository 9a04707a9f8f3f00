"""Shared by the integration tests: the integration marker, and a Redis Cluster with
the notification flags on every node."""

from collections.abc import Iterator

import pytest

from saga_events.embedded_topology import EmbeddedCluster, client
from saga_events.notify import REQUIRED_FLAGS


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def cluster() -> Iterator[EmbeddedCluster]:
    """Three primaries with one replica each (node timeout 1 s), the notification flags
    on every node (mirrors on replicas need them there; CONFIG is not replicated), stopped
    after the test. A module may define its own ``cluster``."""
    with EmbeddedCluster(primaries=3, replicas=1) as c:
        for node in c.nodes:
            with client(node) as conn:
                conn.config_set("notify-keyspace-events", REQUIRED_FLAGS)
        yield c
