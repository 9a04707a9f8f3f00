"""The gateway's pure parts: its clock, its derived ids, its token check, its metrics."""

from __future__ import annotations

import shutil

import anyio
import pytest

from saga_events import Mirror, Registrar, model
from saga_events.identity import stable_service_id
from saga_events.keys import is_valid_name
from saga_events.web import Gateway
from saga_events.writer import HybridClock
from tests.gateway_helpers import metric_samples


def test_hybrid_clock_never_goes_back_when_the_wall_clock_does() -> None:
    """Ticks grow strictly even when the injected wall clock steps back or stands still."""
    wall = iter([1_000, 1_000, 999, 5_000, 4_000])
    clock = HybridClock(now_ms=lambda: next(wall))
    ticks = [clock.tick() for _ in range(5)]
    assert ticks == [1_000_000, 1_000_001, 1_000_002, 5_000_000, 5_000_001]


def test_hybrid_clock_fits_the_events_counter_field() -> None:
    """A tick of today's clock is a valid incarnation (< 2**53)."""
    tick = HybridClock().tick()
    assert 0 < tick < 2**53
    event = model.Register(
        service_name="a", service_id="b", incarnation=tick, seq=1, service_url="http://x"
    )
    assert model.decode_event(model.encode(event)) == event


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("gateway", "http://localhost:8000"),
        ("a" * 128, "https://example.com/" + "p" * 2000),
        ("x.y_z-1", "grpc://[::1]:50051"),
    ],
)
def test_derived_ids_are_stable_valid_names(name: str, url: str) -> None:
    """The same (name, url) gives the same id, a valid name; another url another id."""
    sid = stable_service_id(name, url)
    assert sid == stable_service_id(name, url)
    assert is_valid_name(sid)
    assert sid != stable_service_id(name, url + "/other")
    assert sid.startswith(name[:100])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("env", "explicit", "expected"),
    [("", None, None), ("from-env", None, "from-env"), ("from-env", "given", "given"),
     ("from-env", "", None)],
)  # fmt: skip
async def test_token_comes_from_argument_or_environment_and_empty_means_none(
    monkeypatch: pytest.MonkeyPatch, env: str, explicit: str | None, expected: str | None
) -> None:
    """SAGA_API_TOKEN='' leaves writes open instead of demanding an empty bearer token."""
    monkeypatch.setenv("SAGA_API_TOKEN", env)
    nowhere = "redis://127.0.0.1:9/0"  # never contacted: constructors do no I/O
    gateway = Gateway(Registrar(nowhere), Mirror(nowhere), nowhere, token=explicit)
    assert gateway.token == expected
    assert gateway.authorized(None) is (expected is None)
    if expected:
        assert gateway.authorized(f"Bearer {expected}")
        assert gateway.authorized(f"bearer  {expected} ")
        assert not gateway.authorized(f"Bearer {expected}x")
        assert not gateway.authorized(f"Basic {expected}")


@pytest.mark.anyio
async def test_metrics_print_every_digit_of_large_counters() -> None:
    """A counter past a million keeps every digit (not 1.23457e+06), so rate() stays right."""
    nowhere = "redis://127.0.0.1:9/0"  # never contacted: constructors do no I/O
    gateway = Gateway(Registrar(nowhere), Mirror(nowhere), nowhere)
    gateway.registrar.stats.received = 1_234_567
    gateway.stats.received = 12_345_678_901
    gateway.registrar.stats.applied["created"] = 2**40 + 1
    samples = metric_samples(gateway.metrics_text())
    assert samples['saga_events_received_total{source="pubsub"}'] == 1_234_567
    assert samples['saga_events_received_total{source="http"}'] == 12_345_678_901
    assert samples['saga_events_applied_total{status="created"}'] == 2**40 + 1
    assert samples["saga_registry_services"] == 0
    assert samples["saga_mirror_stale_seconds"] == 0


@pytest.mark.anyio
@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed; .ci/run installs Debian's prometheus",
)
async def test_metrics_pass_promtool_check() -> None:
    """``promtool check metrics`` accepts the exposition (names, types, help, histograms)."""
    nowhere = "redis://127.0.0.1:9/0"  # never contacted: constructors do no I/O
    gateway = Gateway(Registrar(nowhere), Mirror(nowhere), nowhere)
    gateway.registrar.stats.applied["created"] = 3
    gateway.stats.rejected["bad_json"] = 2
    gateway.stats.responses[("POST", 200)] = 5
    gateway.metrics.revision = 42
    gateway.metrics.latency.labels("/api/v1/services/register", "POST").observe(0.004)
    text = gateway.metrics_text()
    assert "saga_registry_revision 42.0" in text.splitlines()
    with anyio.fail_after(60):
        run = await anyio.run_process(
            ["promtool", "check", "metrics"], input=text.encode(), check=False
        )
    said = (run.stdout + run.stderr).decode()
    assert run.returncode == 0, said
    assert not said.strip(), said  # not even a lint warning


def test_the_answers_time_text_is_the_models() -> None:
    """web.schema.iso_utc (the date part kept per second) writes model.iso_utc's text."""
    import random

    from saga_events.web.schema import _SECONDS, iso_utc

    rng = random.Random(13)
    values = [0, 999, 1000, 1_732_960_000_123, 1_732_960_000_999, 253_402_300_799_999]
    values += [rng.randrange(0, 4_102_444_800_000) for _ in range(5000)]
    values += [1_732_960_000_000 + k for k in range(0, 3000, 7)]  # one second's cache, reused
    values += [2**32 * 1000 + k for k in range(-2000, 2000, 3)]  # where it hands over
    for ms in values:
        assert iso_utc(ms) == model.iso_utc(ms), ms
    assert len(_SECONDS) <= 4096
