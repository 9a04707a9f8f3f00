"""Every decoder failure is a ``bad_json`` (or a field's reason) rejection, never a crash."""

from __future__ import annotations

import pytest

from saga_events import Registrar, model
from saga_events._ratelimit import TokenBuckets
from saga_events.errors import InvalidEvent

HEAD = b'{"type":"register","service_name":"svc","service_id":"s","seq":1,'
URL = b'"service_url":"http://10.0.0.1:80"'

CASES = {
    "deep array": b'{"type":"leave","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "deep object": b'{"type":"leave","x":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
    "deep at the top": b"[" * 8000,
    "oversized": b'{"type":"leave","pad":"' + b"x" * 20_000 + b'"}',
    "latin-1": HEAD + b'"incarnation":1,"service_url":"http://h\xe9:80"}',
    "utf-16": '{"type":"leave","service_name":"svc"}'.encode("utf-16"),
    "utf-8 bom": b"\xef\xbb\xbf" + HEAD + b'"incarnation":1,' + URL + b"}",
    "lone surrogate": HEAD + b'"incarnation":1,"service_url":"http://h\\ud800:80"}',
    "surrogate in metadata": HEAD + b'"incarnation":1,' + URL + b',"metadata":{"\\udfff":"v"}}',
    "huge int": HEAD + b'"incarnation":' + b"9" * 5000 + b"," + URL + b"}",
    "huge float": HEAD + b'"incarnation":1e400,' + URL + b"}",
    "float for int": HEAD + b'"incarnation":1.5,' + URL + b"}",
    "NaN": HEAD + b'"incarnation":NaN,' + URL + b"}",
    "Infinity": HEAD + b'"incarnation":Infinity,' + URL + b"}",
    "negative": HEAD + b'"incarnation":-1,' + URL + b"}",
    "nul bytes": b"\x00" * 100,
    "empty": b"",
    "truncated": HEAD[:-5],
}


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_decoder_rejects_with_a_reason(raw: bytes) -> None:
    with pytest.raises(InvalidEvent) as info:
        model.decode_event(raw, "svc")
    assert info.value.reason


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_registrar_validate_counts_and_never_raises(raw: bytes) -> None:
    registrar = Registrar("redis://127.0.0.1:1/0", own_view=False)
    assert registrar.validate(b"saga:{default}:events:svc", raw) is None
    assert sum(registrar.stats.rejected.values()) == 1


def test_unknown_fields_are_skipped_whatever_they_hold() -> None:
    raw = HEAD + b'"incarnation":1,"z":' + b"9" * 9000 + b',"w":[[[1e999]]],' + URL + b"}"
    assert model.decode_event(raw, "svc").service_id == "s"


def test_a_decoder_bug_is_a_bad_json_rejection(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> model.AnyEvent:
        raise MemoryError("a decoder bug")

    monkeypatch.setattr(model, "decode_event", broken)
    registrar = Registrar("redis://127.0.0.1:1/0", own_view=False)
    assert registrar.validate(b"saga:{default}:events:svc", b"{}") is None
    assert registrar.stats.rejected["bad_json"] == 1


def test_bucket_table_is_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(1.0, 2, clock=lambda: now[0], max_keys=100)
    assert all(buckets.allow(i) for i in range(10_000))  # fresh ids
    assert len(buckets) == 100
    # the most recently used survive: a drained bucket stays drained while in use
    assert buckets.allow("hot") and buckets.allow("hot") and not buckets.allow("hot")
    for i in range(50):
        buckets.allow(("other", i))
    assert not buckets.allow("hot")


def test_per_service_rate_limit_stops_fresh_ids() -> None:
    registrar = Registrar(
        "redis://127.0.0.1:1/0", service_rate_limit=10, service_rate_burst=20, own_view=False
    )
    events = [
        model.Leave(service_name="svc", service_id=f"id{i}", incarnation=1, seq=1)
        for i in range(100)
    ]
    allowed = sum(registrar._admission.within_rate(e) for e in events)
    assert allowed <= 21
    assert registrar.stats.rejected["rate_limited"] >= 79
