"""Errors raised by saga-events.

All of them derive from one base class::

    SagaError
     ├── ServiceNotFound          no live instance answers to a name
     ├── RegistryUnavailable      the registry cannot be reached and nothing else answers
     ├── InvalidEvent             an event or a registration failed validation
     ├── NotificationConfigError  keyspace notifications cannot be configured
     ├── RedisServerError         a private redis-server could not be started
     ├── TopologyError            a Redis URL is malformed (also a ValueError)
     └── TopologyUnavailable      a well-formed topology cannot be resolved now (also a
                                  ConnectionError, so reconnect loops retry it)
"""

from __future__ import annotations


class SagaError(Exception):
    """Raised for any error of saga-events; the base of all the others."""


class ServiceNotFound(SagaError, LookupError):
    """Raised when no live, non-draining instance of a service is known."""

    def __init__(self, service: str, capability: str | None = None) -> None:
        self.service = service
        self.capability = capability
        what = f"service {service!r}"
        if capability is not None:
            what += f" with capability {capability!r}"
        super().__init__(f"no live instance of {what}")


class RegistryUnavailable(SagaError):
    """Raised when the registry cannot be reached and neither a cache nor a fallback answers."""

    def __init__(self, service: str, reason: str) -> None:
        self.service = service
        self.reason = reason
        super().__init__(f"cannot discover service {service!r}: {reason}")


class InvalidEvent(SagaError, ValueError):
    """Raised when an event or a registration is rejected; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class NotificationConfigError(SagaError):
    """Raised when the registrar cannot read or set ``notify-keyspace-events``."""

    def __init__(self, message: str, *, setting: str, required: str) -> None:
        self.setting = setting
        self.required = required
        super().__init__(message)


class RedisServerError(SagaError):
    """Raised when a private ``redis-server`` cannot be found or started."""


class TopologyError(SagaError, ValueError):
    """Raised when a Redis URL is malformed; ``part`` names the piece at fault."""

    def __init__(self, url: str, part: str, reason: str) -> None:
        self.url = url
        self.part = part
        self.reason = reason
        super().__init__(f"{url}: {part}: {reason}")


class TopologyUnavailable(SagaError, ConnectionError):
    """Raised when no node answers for a well-formed topology URL (no Sentinel, no owner)."""

    def __init__(self, url: str, part: str, reason: str) -> None:
        self.url = url
        self.part = part
        self.reason = reason
        super().__init__(f"{url}: {part}: {reason}")
