"""The mirror's store, its pick policy and the watcher's timing rules, without a server."""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from saga_events.connection import SessionStats, Timing, run_forever
from saga_events.model import Instance
from saga_events.view import Added, Removed, ServiceSnapshot, Updated, View
from saga_events.watcher import Canary, RevCheck


def inst(
    name: str, sid: str, *, draining: bool = False, caps: tuple[str, ...] = (), seq: int = 1
) -> Instance:
    return Instance(
        incarnation=1,
        seq=seq,
        registered_at_ms=0,
        service_name=name,
        service_id=sid,
        service_url=f"http://{sid}:80",
        capabilities=caps,
        draining=draining,
    )


def key(name: str, sid: str) -> str:
    return f"saga:{{default}}:inst:{name}:{sid}"


def test_changes_are_invisible_until_published_then_seen_at_once() -> None:
    """A reader sees a service's old snapshot until publish swaps in the new one."""
    view = View()
    assert view.put(key("a", "1"), inst("a", "1")) == Added(inst("a", "1"))
    assert view.pick("a") is None
    assert view.publish()
    assert view.pick("a") == inst("a", "1")
    before = view.service("a")
    view.put(key("a", "2"), inst("a", "2"))
    assert view.service("a") is before  # the old snapshot stays whole
    view.publish()
    assert [i.service_id for i in view.instances("a")] == ["1", "2"]
    assert before is not None and [i.service_id for i in before.instances] == ["1"]


def test_equal_record_is_no_change_and_updates_report_the_previous() -> None:
    view = View()
    view.put(key("a", "1"), inst("a", "1"))
    assert view.put(key("a", "1"), inst("a", "1")) is None
    assert view.put(key("a", "1"), inst("a", "1", seq=2)) == Updated(
        inst("a", "1", seq=2), inst("a", "1")
    )
    assert view.remove(key("a", "1")) == Removed(inst("a", "1", seq=2))
    assert view.remove(key("a", "1")) is None
    view.publish()
    assert view.service("a") is None and view.services() == {} and len(view) == 0


def test_pick_is_round_robin_over_live_instances_with_the_capability() -> None:
    view = View()
    view.put(key("a", "1"), inst("a", "1", caps=("gpu",)))
    view.put(key("a", "2"), inst("a", "2"))
    view.put(key("a", "3"), inst("a", "3", caps=("gpu",), draining=True))
    view.publish()
    assert {view.pick("a").service_id for _ in range(4)} == {"1", "2"}  # type: ignore[union-attr]
    assert {view.pick("a", "gpu").service_id for _ in range(4)} == {"1"}  # type: ignore[union-attr]
    assert view.pick("a", "tpu") is None
    assert [i.service_id for i in view.instances("a")] == ["1", "2", "3"]
    # Draining and back: the live index follows without a rebuild.
    view.put(key("a", "1"), inst("a", "1", caps=("gpu",), draining=True))
    view.put(key("a", "3"), inst("a", "3", caps=("gpu",)))
    view.publish()
    assert {view.pick("a", "gpu").service_id for _ in range(4)} == {"3"}  # type: ignore[union-attr]
    assert view.stats.sorted_items == 0


def test_replace_emits_only_differences_and_sorts_each_service_once() -> None:
    view = View()
    view.put(key("a", "1"), inst("a", "1"))
    view.put(key("b", "1"), inst("b", "1"))
    view.publish()
    fresh = {
        key("a", "1"): inst("a", "1"),
        key("a", "0"): inst("a", "0"),
        key("c", "9"): inst("c", "9"),
    }
    changes = view.replace(fresh)
    assert sorted(type(c).__name__ for c in changes) == ["Added", "Added", "Removed"]
    view.publish()
    assert view.services().keys() == {"a", "c"}
    assert [i.service_id for i in view.instances("a")] == ["0", "1"]
    assert view.stats.sorted_items == 3  # a (2) and c (1), once each


def test_a_custom_picker_is_used() -> None:
    def first(service: ServiceSnapshot, candidates: tuple[Instance, ...]) -> Instance:
        return candidates[0]

    view = View(first)
    for sid in "312":
        view.put(key("a", sid), inst("a", sid))
    view.publish()
    assert [view.pick("a").service_id for _ in range(3)] == ["1", "1", "1"]  # type: ignore[union-attr]


class CountingId(str):
    """A service id that counts the comparisons made with it."""

    count = 0

    def __lt__(self, other: Any) -> bool:
        CountingId.count += 1
        return str.__lt__(self, other)

    def __gt__(self, other: Any) -> bool:
        CountingId.count += 1
        return str.__gt__(self, other)


def test_one_change_to_a_large_service_costs_log_n_comparisons_not_a_resort() -> None:
    """Issue 9 "Low": n changes to one service must not cost n sorts (n² log n)."""
    view = View()
    n = 4000
    CountingId.count = 0
    for i in range(n):
        sid = CountingId(f"i-{(i * 7919) % n:05d}")  # arrival order is not id order
        view.put(key("big", sid), inst("big", sid))
        view.publish()  # one batch per change: the worst case for the watcher
    comparisons = CountingId.count
    assert view.stats.sorted_items == 0
    assert view.stats.publishes == n
    # bisect: at most ~2·log2(n) comparisons per change (ids and live ids).
    assert comparisons <= 2 * n * (math.log2(n) + 2), comparisons
    assert [i.service_id for i in view.instances("big")] == sorted(f"i-{i:05d}" for i in range(n))
    # Removing every other one, and draining a few, keeps the order and costs the same.
    CountingId.count = 0
    for i in range(0, n, 2):
        view.remove(key("big", f"i-{i:05d}"))
    view.publish()
    assert CountingId.count <= n * (math.log2(n) + 2)
    assert len(view.service("big").live) == n // 2  # type: ignore[union-attr]


# -- the watcher's rules about time, on an injected clock ---------------------------------


def test_canary_is_lost_once_after_the_timeout_and_back_once() -> None:
    canary = Canary(3.5, now=100.0)
    assert not canary.lost(103.5)
    assert canary.lost(103.6)
    assert not canary.lost(110.0)  # reported once
    assert canary.beat(111.0)  # back, once
    assert not canary.beat(111.5)
    assert not canary.lost(114.9)
    assert canary.lost(115.1)


def test_rev_check_finds_a_loss_at_the_first_check_after_it() -> None:
    """Counts are exact past the barrier: one missing notification is a loss at once."""
    check = RevCheck()
    assert not check.lost(before=10, applied=0, after=10)  # the offset: 10
    assert not check.lost(before=15, applied=5, after=17)  # 2 more came while reading
    assert not check.lost(before=17, applied=7, after=17)
    # A change whose notification is lost: rev runs ahead of the count.
    assert check.lost(before=18, applied=7, after=18)


def test_rev_check_narrows_its_bounds_under_churn() -> None:
    """A count read while rev moved bounds the offset; the bounds narrow, a loss leaves them."""
    check = RevCheck()
    assert not check.lost(before=10, applied=3, after=12)  # offset in [7, 9]
    assert check.bounds == (7, 9)
    assert not check.lost(before=20, applied=12, after=21)  # [8, 9]
    assert check.bounds == (8, 9)
    # A later check that still meets the bounds: nothing concluded, bounds kept.
    assert not check.lost(before=25, applied=16, after=27)  # [9, 11]
    assert check.bounds == (9, 9)
    # Two notifications lost: every later interval is 2 higher, above the bounds.
    assert check.lost(before=30, applied=19, after=32)  # [11, 13] vs [9, 9]


def test_rev_check_without_rev_and_after_a_snapshot() -> None:
    """No rev key: nothing to compare. A snapshot forgets the offset."""
    check = RevCheck()
    assert not check.lost(None, 50, None)
    assert not check.lost(7, 50, 7)
    check.forget()
    assert check.bounds is None
    assert not check.lost(3, 0, 3)  # a new Redis: a new offset
    assert check.lost(4, 0, 4)


@pytest.mark.anyio
async def test_run_forever_retries_refusals_with_backoff_and_never_raises() -> None:
    """NOPERM and connection errors are logged, counted and retried; only cancellation ends it."""
    sleeps: list[float] = []
    errors: list[BaseException] = []
    calls = 0

    async def session(healthy: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise NoPermissionError("NOPERM this user has no permissions to run 'psubscribe'")
        if calls == 4:
            raise RedisConnectionError("gone")
        healthy()
        raise RedisConnectionError("gone again")

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 6:
            raise anyio.get_cancelled_exc_class()()
        await anyio.lowlevel.checkpoint()

    stats = SessionStats()
    with pytest.raises(anyio.get_cancelled_exc_class()):
        await run_forever(
            session, name="t", timing=Timing(backoff_base=1.0, backoff_cap=8.0),
            on_error=errors.append, stats=stats, sleep=fake_sleep,
        )  # fmt: skip
    assert stats.refusals == 3 and stats.transient_errors == 3
    assert isinstance(errors[0], NoPermissionError)
    assert "NOPERM" in (stats.last_error or "") or "gone" in (stats.last_error or "")
    # Backoff grows while failing (full jitter: in [d/2, d]) and resets once healthy.
    assert 0.5 <= sleeps[0] <= 1 and 1 <= sleeps[1] <= 2 and 2 <= sleeps[2] <= 4
    assert sleeps[4] <= 1.0


def test_a_mirror_can_be_built_outside_an_event_loop() -> None:
    """Constructing is not connecting: no loop, no network, health fields set in __init__."""
    from saga_events import Mirror

    mirror = Mirror("redis://127.0.0.1:1")
    assert mirror.stale and not mirror.has_synced and mirror.last_error is None
    assert mirror.stats.resyncs == 0 and len(mirror) == 0
