"""saga-events: push-based service registry and discovery on Redis."""

from .agent import Agent, SyncAgent
from .client import AsyncSagaServiceDiscovery, SagaServiceDiscovery, ServiceInfo
from .errors import (
    InvalidEvent,
    NotificationConfigError,
    RedisServerError,
    RegistryUnavailable,
    SagaError,
    ServiceNotFound,
)
from .keys import Keys
from .mirror import Added, Change, ChangesOverflow, Mirror, Removed, SyncMirror, Updated
from .model import Drain, Heartbeat, Instance, Leave, Register
from .registrar import ApplyResult, Registrar
from .testing.fake import FakeRegistry

__version__ = "0.1.0"

__all__ = [
    "Added",
    "Agent",
    "ApplyResult",
    "AsyncSagaServiceDiscovery",
    "Change",
    "ChangesOverflow",
    "Drain",
    "FakeRegistry",
    "Heartbeat",
    "Instance",
    "InvalidEvent",
    "Keys",
    "Leave",
    "Mirror",
    "NotificationConfigError",
    "RedisServerError",
    "Register",
    "Registrar",
    "RegistryUnavailable",
    "Removed",
    "SagaError",
    "SagaServiceDiscovery",
    "ServiceInfo",
    "ServiceNotFound",
    "SyncAgent",
    "SyncMirror",
    "Updated",
    "__version__",
]
