"""Operator drain: take instances out of rotation whatever their heartbeats say.

One job: set and clear the override key of an instance
(``saga:{ns}:override:<service>:<id>``, see
:class:`~saga_events.model.DrainOverride`) and re-apply the instance's record
through the registrar's script, so that the record shows it at once.

Contract:

* :func:`drain` writes the override (JSON ``by``, ``reason``, ``at_ms``,
  ``until_ms``; a ``duration`` is the key's TTL), then re-applies each
  target's record with the next seq: the apply script stores it draining with
  the override inside (rev incremented). From then on every announce of the
  instance (agent heartbeats, HTTP re-registers) is stored the same way while
  the key stands, across registrar restarts.
* :func:`undrain` deletes the key and re-applies the record without it.
* A ``duration`` is also put on the schedule of
  :mod:`saga_events.override_ends` (in Redis's clock): when the key expires,
  a registrar re-applies the record without the override within about one
  ``liveness_interval`` (1 s), without waiting for the instance's next
  heartbeat. A leave or a reap deletes the key with the record.
* Both act on the live instances the writer's view holds (``not_found`` when
  none) and return once that view shows the change (or after its
  ``write_timeout``). Bad input (empty ``by``, a duration <= 0) is refused
  before any write.
"""

from __future__ import annotations

from typing import Final

from . import model, override_ends
from .writer import Writer, WriteRejected

MAX_TEXT: Final = 256  # by and reason, characters


def _check_text(label: str, value: str) -> str:
    if len(value) > MAX_TEXT or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise WriteRejected(
            "invalid", "invalid", f"{label} must be at most {MAX_TEXT} printable characters"
        )
    return value


async def drain(
    writer: Writer,
    name: str,
    service_id: str | None,
    *,
    by: str,
    reason: str = "",
    duration: float | None = None,
) -> list[model.Instance]:
    """Drain the live instances of ``name`` (or only ``service_id``); return them drained."""
    by = _check_text("by", by.strip() or "operator")
    reason = _check_text("reason", reason)
    if duration is not None and not (0 < duration <= 365 * 86400):
        raise WriteRejected("invalid", "invalid", "duration must be > 0 seconds and <= a year")
    targets = writer.targets(name, service_id)
    now_ms = await override_ends.redis_ms(writer.redis)  # the clock of the key's PX
    px = round(duration * 1000) if duration is not None else None
    until_ms = now_ms + px if px is not None else None
    raw = model.encode(
        override_ends.OverrideKey(by=by, reason=reason, at_ms=now_ms, until_ms=until_ms)
    )
    keys = writer.registrar.keys
    for inst in targets:
        await writer.redis.set(keys.override(name, inst.service_id), raw, px=px)
        await override_ends.schedule(writer.redis, keys, name, inst.service_id, until_ms)
        await _reapply(writer, name, inst.service_id)
    return await _shown(writer, name, [i.service_id for i in targets], drained=True)


async def undrain(writer: Writer, name: str, service_id: str | None) -> list[model.Instance]:
    """End the operator's drain of the instances of ``name`` (or only ``service_id``)."""
    targets = writer.targets(name, service_id)
    keys = writer.registrar.keys
    for inst in targets:
        await writer.redis.delete(keys.override(name, inst.service_id))
        await override_ends.unschedule(writer.redis, keys, name, inst.service_id)
        if inst.override is not None:
            await _reapply(writer, name, inst.service_id)
    return await _shown(writer, name, [i.service_id for i in targets], drained=False)


async def _reapply(writer: Writer, name: str, sid: str) -> None:
    """Announce the stored record again: the script adds or drops the override."""
    if not await override_ends.reapply(writer.registrar, writer.redis, name, sid):
        raise WriteRejected(
            "conflict",
            "conflict",
            f"instance {name}/{sid} is being changed by another writer; retry",
        )


async def _shown(
    writer: Writer, name: str, ids: list[str], *, drained: bool
) -> list[model.Instance]:
    wanted = set(ids)

    def current() -> list[model.Instance]:
        return [i for i in writer.view.instances(name) if i.service_id in wanted]

    def done() -> bool:
        return all((i.override is not None) == drained for i in current())

    await writer._wait_view(done)
    return current()
