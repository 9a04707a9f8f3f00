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


# -- the memo: an agent's repeated announce is not decoded again ------------------


def canonical(kind: str = "heartbeat", **over: Any) -> bytes:
    """An event as an Agent publishes it: the model's own encoding."""
    cls = {"register": model.Register, "heartbeat": model.Heartbeat, "drain": model.Drain}[kind]
    fields: dict[str, Any] = {k: v for k, v in good(**over).items() if k != "type"}
    fields["capabilities"] = tuple(fields.get("capabilities", ()))
    return model.encode(cls(**fields))


def test_a_repeated_announce_hits_the_memo_and_equals_the_slow_path() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    check(canonical("register", seq=1, since=1), decoder=dec)  # decoded, remembered
    assert len(dec._memo) == 1 and dec.memo_hits == 0
    for kind, seq in [("heartbeat", 2), ("heartbeat", 3), ("drain", 4), ("heartbeat", 2**53 - 1)]:
        raw = canonical(kind, seq=seq, since=1)
        check(raw, decoder=dec)
        event = dec.decode(raw, "svc")
        assert type(event).__name__.lower() == kind and event is not None and event.seq == seq
    assert dec.memo_hits == 8 and len(dec._memo) == 1


def test_the_memo_never_answers_for_another_channel() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    dec.decode(canonical(seq=1), "svc")
    assert dec.decode(canonical(seq=2), "other") is None  # the slow path: channel_mismatch
    assert slow(canonical(seq=2), "other") == "channel_mismatch"


def test_a_hit_with_since_after_seq_takes_the_slow_path() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    assert dec.decode(canonical(seq=5, since=5), "svc") is not None
    assert dec.decode(canonical(seq=4, since=5), "svc") is None  # the model names the reason
    assert dec.decode(canonical(seq=5, since=6), "svc") is None  # never remembered either


def test_seq_digits_that_are_not_a_json_counter_take_the_slow_path() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    raw = canonical(seq=7)
    dec.decode(raw, "svc")
    for digits in [b"07", b"00", b"-1", b"7.0", b"7e0", b"", b" 7", b"9007199254740992", b"1" * 40]:
        bad = raw.replace(b'"seq":7,', b'"seq":' + digits + b",")
        assert dec.decode(bad, "svc") is None or slow(bad, "svc") == dec.decode(bad, "svc")
        check(bad, decoder=dec)
    assert dec.memo_hits == 0


def test_only_canonical_bytes_are_remembered() -> None:
    dec = _fastdecode.FastDecoder(SCHEMES)
    raw = canonical(seq=1)
    for variant in [
        raw.replace(b'"seq":1,', b'"seq": 1,'),
        raw.replace(b',"service_url"', b', "service_url"'),
        raw.replace(b'"seq":1,', b'"seq":1,"seq":1,'),  # a duplicate key
        json.dumps(json.loads(raw)).encode(),  # another encoder's spacing
    ]:
        check(variant, decoder=dec)
    assert not dec._memo
    dec.decode(raw, "svc")
    assert len(dec._memo) == 1


def test_a_duplicate_seq_after_a_remembered_prefix_is_not_a_hit() -> None:
    """The bytes after the first seq must be the remembered ones, byte for byte."""
    dec = _fastdecode.FastDecoder(SCHEMES)
    raw = canonical(seq=1, metadata={"zone": "a"})
    dec.decode(raw, "svc")
    tricked = raw.replace(b'"seq":1,', b'"seq":1,"seq":9,')
    check(tricked, decoder=dec)
    assert dec.memo_hits == 0


def test_the_memo_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(_fastdecode, "MEMO_SIZE", 10)
    dec = _fastdecode.FastDecoder(SCHEMES)
    for i in range(100):
        dec.decode(canonical(service_id=f"i-{i}", seq=1), "svc")
        assert len(dec._memo) <= 10
    check(canonical(service_id="i-99", seq=2), decoder=dec)
    assert dec.memo_hits == 1


def test_the_memo_costs_about_a_kilobyte_an_instance() -> None:
    """What a remembered instance costs (the bench's event shape); a regression guard,
    not a timing: memory is deterministic for one Python."""
    import tracemalloc

    dec = _fastdecode.FastDecoder(SCHEMES)
    raws = [
        canonical(
            "register",
            service_id=f"i-{i}",
            seq=1,
            service_url=f"http://10.0.{i >> 8}.{i & 255}:8080",
            capabilities=["rest", "grpc"],
            metadata={"zone": "eu-west-1a", "version": "1.4.2"},
        )
        for i in range(5000)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for raw in raws:
        dec.decode(raw, "svc")
    per_instance = (tracemalloc.get_traced_memory()[0] - before) / len(raws)
    tracemalloc.stop()
    assert len(dec._memo) == 5000
    assert per_instance < 2500, f"{per_instance:.0f} bytes an instance"  # 961 on Python 3.11


seqs = st.integers(0, 2**53 - 1) | st.sampled_from([0, 1, 9, 10, 2**53 - 1])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    first=st.sampled_from(["register", "heartbeat", "drain"]),
    then=st.sampled_from(["register", "heartbeat", "drain"]),
    seq0=seqs,
    seq1=seqs,
    since=st.none() | seqs,
    sid=text,
    url=text,
    meta=st.dictionaries(text, text, max_size=3),
)
def test_memo_hits_agree_with_the_slow_path(
    first: str, then: str, seq0: int, seq1: int, since: int | None, sid: str, url: str,
    meta: dict[str, str],
) -> None:  # fmt: skip
    dec = _fastdecode.FastDecoder(SCHEMES)
    over = {"service_id": sid, "service_url": url, "metadata": meta, "since": since}
    try:
        raw0 = canonical(first, seq=seq0, **over)
        raw1 = canonical(then, seq=seq1, **over)
    except Exception:  # not encodable (a lone surrogate): no agent sends it
        return
    check(raw0, decoder=dec)
    check(raw1, decoder=dec)
    check(raw1.replace(b'"type":"', b'"type": "'), decoder=dec)
