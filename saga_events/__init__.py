"""saga-events: push-based service registry and discovery on Redis."""

from .agent import Agent, SyncAgent
from .errors import (
    InvalidEvent,
    NotificationConfigError,
    RedisServerError,
    SagaError,
    ServiceNotFound,
)
from .keys import Keys
from .mirror import Added, Change, ChangesOverflow, Mirror, Removed, SyncMirror, Updated
from .model import Drain, Heartbeat, Instance, Leave, Register
from .registrar import ApplyResult, Registrar

__version__ = "0.1.0"

__all__ = [
    "Added",
    "Agent",
    "ApplyResult",
    "Change",
    "ChangesOverflow",
    "Drain",
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
    "Removed",
    "SagaError",
    "ServiceNotFound",
    "SyncAgent",
    "SyncMirror",
    "Updated",
    "__version__",
]
