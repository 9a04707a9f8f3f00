"""Hostile input against the event decoder, the registrar's validation and its rate limit.

No server: these exercise the code every published byte string goes through
before anything reaches Redis.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_events import InvalidEvent, Registrar, model
from saga_events._ratelimit import TokenBuckets
from saga_events.keys import NAME_RE, Keys

REASONS = {
    "oversized",
    "bad_json",
    "unknown_type",
    "bad_name",
    "bad_ttl",
    "bad_url",
    "invalid",
    "channel_mismatch",
}

# Strings made to break key parsing, globbing, hash tags, logs and look-alike checks.
HOSTILE_NAMES = [
    "",
    "pay:ment",
    "payment:",
    ":payment",
    "pay*",
    "*",
    "pay?",
    "[a-z]",
    "{default}",
    "pay{x}ment",
    "pay}",
    "pay ment",
    " payment",
    "payment ",
    "payment\n",
    "payment\r\n",
    "pay\tment",
    "pay\x00ment",
    "\u0440ayment",  # Cyrillic small er, looks like p
    "payme\u0578t",  # Armenian small vo, looks like n
    "\uff10payment",  # fullwidth digit zero
    "pay\u200bment",  # zero-width space
    "payment\u2028",  # line separator
    "-payment",
    ".payment",
    "_payment",
    "a" * 129,
    "a" * 10_240,
    "payment/../admin",
    "pay%3Ament",
]

FORBIDDEN_URLS = [
    "javascript:alert(1)",
    "file:///etc/passwd",
    "data:text/html,hi",
    "ftp://host/x",
    "gopher://host:70/",
    "ldap://host/",
    "http://",
    "//host:80",
    "host:80",
    "http://host:99999",
    "http://host:-1",
    "http://ho st:80",
    "http://host:80/\nHost: evil",
    "",
    "http://" + "a" * 2100,
]

BAD_TTLS: list[Any] = [-1, 0, 999, 3_600_001, 2**63, -(2**63), 1e9, "60000", None, True, [1]]


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "register",
        "service_name": "payment",
        "service_id": "p-1",
        "incarnation": 1,
        "seq": 1,
        "service_url": "http://10.0.0.5:8002",
        "capabilities": ["rest"],
        "metadata": {"zone": "a"},
        "ttl_ms": 30_000,
    }
    base.update(overrides)
    return base


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def check_accepted(ev: model.AnyEvent) -> None:
    """What the registrar may store: names that round-trip through keys, a record that decodes."""
    assert NAME_RE.fullmatch(ev.service_name), ev.service_name
    assert NAME_RE.fullmatch(ev.service_id), ev.service_id
    keys = Keys("default")
    assert keys.parse_inst(keys.inst(ev.service_name, ev.service_id)) == (
        ev.service_name,
        ev.service_id,
    )
    assert 0 <= ev.incarnation < 2**53 and 0 <= ev.seq < 2**53
    if isinstance(ev, model.Announce):
        model.check_url(ev.service_url)
        assert model.MIN_TTL_MS <= ev.ttl_ms <= model.MAX_TTL_MS
        for cap in ev.capabilities:
            assert NAME_RE.fullmatch(cap), cap
        # The stored record is the ordering prefix spliced before the body.
        body = model.encode(model.body_of(ev))
        record = b'{"incarnation":1,"seq":2,"registered_at_ms":3,' + body[1:]
        inst = model.decode_instance(record)
        assert (inst.service_name, inst.service_id) == (ev.service_name, ev.service_id)


def decode_or_reason(data: bytes, channel_service: str | None = "payment") -> str:
    try:
        ev = model.decode_event(data, channel_service)
    except InvalidEvent as exc:
        assert exc.reason in REASONS, exc.reason
        assert exc.detail  # says what is wrong
        return exc.reason
    check_accepted(ev)
    return "ok"


# -- properties ---------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
hostile_text = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.text(max_size=40),
    st.from_regex(model.NAME_PATTERN, fullmatch=True),
)
field_values = st.one_of(
    json_scalar,
    hostile_text,
    st.sampled_from(FORBIDDEN_URLS),
    st.sampled_from(BAD_TTLS),
    st.lists(hostile_text, max_size=4),
    st.dictionaries(hostile_text, hostile_text, max_size=3),
)
event_types = st.sampled_from(["register", "heartbeat", "drain", "leave", "nope", "", None])


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event with a few fields replaced by hostile values (or dropped)."""
    ev = event(type=draw(event_types))
    for name in draw(st.lists(st.sampled_from(sorted(ev)), max_size=4, unique=True)):
        if draw(st.booleans()):
            ev[name] = draw(field_values)
        else:
            del ev[name]
    extra = draw(st.dictionaries(st.text(max_size=10), json_scalar, max_size=2))
    return raw({**extra, **ev})


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_any_bytes_are_decoded_or_rejected_with_a_reason(data: bytes) -> None:
    """Arbitrary bytes never raise anything but InvalidEvent with a known reason."""
    decode_or_reason(data)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_mutated_events_are_valid_or_rejected(data: bytes) -> None:
    """Events with hostile field values are either fully valid or rejected."""
    decode_or_reason(data)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_registrar_validate_survives_any_channel_and_payload(channel: bytes, data: bytes) -> None:
    """validate() never raises, and counts every rejection under a known reason."""
    registrar = Registrar("redis://127.0.0.1:1/0")
    before = sum(registrar.stats.rejected.values())
    ev = registrar.validate(registrar.keys.events_prefix.encode() + channel, data)
    after = sum(registrar.stats.rejected.values())
    if ev is None:
        assert after == before + 1
        assert set(registrar.stats.rejected) <= REASONS
    else:
        assert after == before
        check_accepted(ev)


# -- named hostile cases ----------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("field", ["service_name", "service_id"])
def test_names_that_break_key_parsing_are_rejected(field: str, name: str) -> None:
    """Separators, globs, hash tags, whitespace, look-alikes and 10 KB names are refused."""
    channel_service = name if field == "service_name" else "payment"
    reason = decode_or_reason(raw(event(**{field: name})), channel_service)
    assert reason in {"bad_name", "oversized"}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_capabilities_are_rejected(name: str) -> None:
    assert decode_or_reason(raw(event(capabilities=["rest", name]))) in {"invalid", "oversized"}


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_urls_with_forbidden_schemes_or_shapes_are_rejected(url: str) -> None:
    """Only absolute URLs with a host and an allowed scheme are accepted."""
    assert decode_or_reason(raw(event(service_url=url))) == "bad_url"


@pytest.mark.parametrize("ttl", BAD_TTLS)
def test_negative_huge_or_mistyped_ttls_are_rejected(ttl: Any) -> None:
    assert decode_or_reason(raw(event(ttl_ms=ttl))) == "bad_ttl"


@pytest.mark.parametrize("value", [-1, 2**53, 2**64, 1.5, "1", None])
@pytest.mark.parametrize("field", ["incarnation", "seq"])
def test_out_of_range_ordering_fields_are_rejected(field: str, value: Any) -> None:
    assert decode_or_reason(raw(event(**{field: value}))) == "invalid"


def test_an_event_for_another_service_is_rejected() -> None:
    assert decode_or_reason(raw(event(service_name="billing"))) == "channel_mismatch"
    assert decode_or_reason(raw(event(type="leave", service_name="billing"))) == (
        "channel_mismatch"
    )


def test_oversized_events_are_rejected_before_parsing() -> None:
    data = raw(event(metadata={"k": "v" * model.MAX_EVENT_BYTES}))
    assert decode_or_reason(data) == "oversized"


def test_a_valid_event_is_accepted() -> None:
    """The property tests above could pass by rejecting everything: this one cannot."""
    assert decode_or_reason(raw(event())) == "ok"
    assert decode_or_reason(raw(event(type="leave"))) == "ok"
    assert decode_or_reason(raw(event(service_name="a" * 128)), "a" * 128) == "ok"


# -- the per-instance rate limit ------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock)
    assert [buckets.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert buckets.allow("b")  # other keys have their own bucket
    clock.now += 0.1  # one token back
    assert buckets.allow("a")
    assert not buckets.allow("a")
    clock.now += 10
    assert sum(buckets.allow("a") for _ in range(10)) == 5


def test_token_bucket_forgets_idle_keys() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock, sweep_every=1.0)
    for i in range(100):
        buckets.allow(i)
    assert len(buckets) == 100
    clock.now += 2.0
    buckets.allow("fresh")
    assert len(buckets) == 1


def test_token_bucket_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBuckets(rate=0, burst=5)


async def _collect(registrar: Registrar, batch: list[Any]) -> list[model.AnyEvent]:
    applied: list[model.AnyEvent] = []

    async def apply_raw(events: list[model.AnyEvent], after_newest: bool = False) -> list[Any]:
        applied.extend(events)
        return []

    registrar._apply_raw = apply_raw  # type: ignore[method-assign]
    events = registrar._admission.decode_batch(batch)
    if events:
        await registrar._apply_intake(events)
    return applied


@pytest.mark.anyio
async def test_a_flood_from_one_instance_is_rate_limited_and_counted() -> None:
    """Past its burst, one instance's events are rejected as rate_limited; others pass."""
    registrar = Registrar("redis://127.0.0.1:1/0", rate_limit=5, rate_burst=10)
    channel = registrar.keys.events("payment").encode()
    flood = [
        [b"pmessage", b"p", channel, raw(event(type="heartbeat", seq=i))] for i in range(1, 501)
    ]
    other = [b"pmessage", b"p", channel, raw(event(service_id="p-2"))]
    applied = await _collect(registrar, [*flood, other])
    ids = [e.service_id for e in applied]
    assert ids.count("p-2") == 1
    assert 10 <= ids.count("p-1") <= 12  # the burst, plus what refilled meanwhile
    assert registrar.stats.rejected["rate_limited"] == 500 - ids.count("p-1")
    assert registrar.stats.received == 501


def test_rate_limit_can_be_turned_off() -> None:
    registrar = Registrar("redis://127.0.0.1:1/0", rate_limit=None)
    ev = msgspec.json.decode(raw(event()), type=model.Register)
    assert all(registrar._admission.within_rate(ev) for _ in range(10_000))


def test_token_bucket_sweep_forgets_only_the_idle_keys() -> None:
    """The table is in order of last use: the sweep reads the idle front and stops."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock, sweep_every=1.0)
    for i in range(50):
        buckets.allow(i)
    clock.now += 0.8
    for i in range(25, 50):  # used again: moved to the end
        buckets.allow(i)
    buckets.allow("late")
    clock.now += 0.4  # past the sweep; 0..24 idle 1.2 s (refill 0.5 s), the rest 0.4 s
    assert buckets.allow("fresh")
    assert len(buckets) == 25 + 1 + 1
    for i in range(25, 50):
        assert buckets.allow(i)  # kept (with its tokens: 5 - 2 + 4 refilled, capped)


def test_a_batch_takes_its_tokens_at_one_time() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock)
    assert [buckets.take("a", 1000.0) for _ in range(6)] == [True] * 5 + [False]
    assert buckets.take("a", 1000.1) and not buckets.take("a", 1000.1)


def test_a_remembered_event_on_another_channel_is_a_channel_mismatch() -> None:
    registrar = Registrar("redis://127.0.0.1:1/0", own_view=False)
    raw = model.encode(
        model.Heartbeat(
            service_name="svc", service_id="i-1", incarnation=1, seq=2, service_url="http://h:1"
        )
    )
    assert registrar.validate(b"saga:{default}:events:svc", raw) is not None
    assert registrar.validate(b"saga:{default}:events:svc", raw) is not None  # remembered
    assert registrar.validate(b"saga:{default}:events:other", raw) is None
    assert registrar.stats.rejected["channel_mismatch"] == 1


def test_the_channel_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from saga_events import _fastdecode

    monkeypatch.setattr(_fastdecode, "MAX_CHANNELS", 8)
    registrar = Registrar("redis://127.0.0.1:1/0", own_view=False)
    for i in range(100):
        channel = f"saga:{{default}}:events:s{i}".encode()
        raw = model.encode(
            model.Leave(service_name=f"s{i % 50}", service_id="a", incarnation=1, seq=1)
        )
        event = registrar.validate(channel, raw)
        assert (event is not None) == (i < 50)  # s50.. carry another service's name
        assert len(registrar._admission._fast._channels) <= 8
    assert registrar.stats.rejected["channel_mismatch"] == 50


def test_a_key_used_within_a_sweep_interval_keeps_its_bucket() -> None:
    """Idle past its refill time (full again) but used every sweep interval: kept, not
    forgotten and re-created at every sweep (an agent heartbeating every 20 s)."""
    clock = FakeClock()
    buckets = TokenBuckets(rate=10, burst=5, clock=clock, sweep_every=30.0)
    for i in range(100):
        buckets.allow(i)
    for _ in range(5):
        clock.now += 20.0  # refill takes 0.5 s: every bucket is full again
        assert buckets.allow(0)  # a sweep is due every other round
        assert len(buckets) >= 50
        for i in range(1, 50):
            assert buckets.allow(i)
    assert len(buckets) == 50  # the other 50, idle 100 s, are forgotten
