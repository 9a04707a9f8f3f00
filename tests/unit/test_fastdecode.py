"""The registrar's fast decode path gives what model.decode_event gives, or steps aside."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saga_events import _fastdecode, model
from saga_events.errors import InvalidEvent

SCHEMES = frozenset({"http", "grpc"})


def slow(raw: bytes, service: str) -> model.AnyEvent | str:
    try:
        return model.decode_event(raw, service, schemes=SCHEMES)
    except InvalidEvent as exc:
        return exc.reason


def check(raw: bytes, service: str = "svc", decoder: Any = None) -> None:
    fast = (decoder or _fastdecode.FastDecoder(SCHEMES)).decode(raw, service)
    want = slow(raw, service)
    if fast is not None:  # None: the caller takes the slow path, always allowed
        assert isinstance(want, model.Event), f"fast path accepted {raw!r}: slow says {want}"
        assert type(fast) is type(want) and fast == want


def test_the_fast_path_knows_the_models_fields() -> None:
    assert _fastdecode.ENABLED  # else a model change turned it off: teach it the field


def good(**over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "heartbeat",
        "service_name": "svc",
        "service_id": "i-1",
        "incarnation": 1_700_000_000_000_000,
        "seq": 2,
        "service_url": "http://10.0.0.1:80",
        "capabilities": ["rest"],
        "metadata": {"zone": "a", "note": "x y"},
        "ttl_ms": 60_000,
    }
    event.update(over)
    return {k: v for k, v in event.items() if v is not DROP}


DROP = object()


def test_a_well_formed_event_takes_the_fast_path_and_equals_the_slow_one() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    for kind in ("register", "heartbeat", "drain"):
        raw = json.dumps(good(type=kind)).encode()
        for _ in range(2):  # first checked, then remembered
            fast = dec.decode(raw, "svc")
            assert fast is not None and fast == model.decode_event(raw, "svc", schemes=SCHEMES)
    leave = json.dumps({"type": "leave", "service_name": "svc", "service_id": "a",
                        "incarnation": 1, "seq": 9}).encode()  # fmt: skip
    assert dec.decode(leave, "svc") == model.decode_event(leave, "svc")


HOSTILE: list[dict[str, Any]] = [
    good(service_name="svc\n"),
    good(service_id="-x"),
    good(service_id="x" * 129),
    good(incarnation=2**53),
    good(seq=-1),
    good(seq=2.0),
    good(seq=True),
    good(ttl_ms=999),
    good(ttl_ms=3_600_001),
    good(service_url=""),
    good(service_url="ftp://h:1"),
    good(service_url="http://u:p@h:1"),
    good(service_url="http://h:99999"),
    good(service_url="http://" + "h" * 2050),
    good(capabilities=["ok", "bad cap"]),
    good(metadata={"": "v"}),
    good(metadata={"k\x1b": "v"}),
    good(metadata={"k": "v\x00"}),
    good(metadata={"k" * 129: "v"}),
    good(metadata={"k": "v" * 2049}),
    good(metadata={"k": 1}),
    good(metadata={"k": "v\x7f"}),  # raw in JSON (only < 0x20 must be escaped)
    good(metadata={"k": "v\x85"}),
    good(metadata={"k\x9f": "v"}),
    good(service_url="http://h\u200b:1"),
    good(service_id="\u00e9"),
    good(capabilities=["\u00e9"]),
    good(type="bogus"),
    good(service_url=DROP),
    good(extra={"unknown": "ignored"}),
]


def test_hostile_events_never_pass_the_fast_path_unlike_the_slow_one() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    for event in HOSTILE:
        check(json.dumps(event, ensure_ascii=False).encode(), decoder=dec)
    check(json.dumps(good()).encode(), service="other", decoder=dec)  # channel mismatch
    check(json.dumps(good(service_id="\u00e9")).encode(), decoder=dec)  # an escape
    check(b'{"type":"heartbeat","seq":1,"seq":2}', decoder=dec)
    check(b"[1, 2]", decoder=dec)
    check(b"x" * (model.MAX_EVENT_BYTES + 1), decoder=dec)


text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(
    ["svc", "i-1", "rest", "a.b_c-d", "http://h:1", "grpc://h", "x\ty", "", "\x7f", "\u200b"]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    kind=st.sampled_from(["register", "heartbeat", "drain", "leave", "x"]),
    name=text,
    sid=text,
    url=text,
    caps=st.lists(text, max_size=3),
    meta=st.dictionaries(text, text, max_size=3),
    nums=st.tuples(st.integers(-1, 2**54), st.integers(-1, 2**54), st.integers(0, 4_000_000)),
)
def test_fast_and_slow_agree_on_generated_events(
    kind: str, name: str, sid: str, url: str, caps: list[str], meta: dict[str, str],
    nums: tuple[int, int, int],
) -> None:  # fmt: skip
    event = good(
        type=kind, service_name=name, service_id=sid, service_url=url, capabilities=caps,
        metadata=meta, incarnation=nums[0], seq=nums[1], ttl_ms=nums[2],
    )  # fmt: skip
    raw = json.dumps(event, ensure_ascii=False).encode()
    check(raw, service=name)
