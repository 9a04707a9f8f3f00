"""Wire model and key names: no server needed."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from saga_events import InvalidEvent, model
from saga_events.keys import Keys, is_valid_name

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(
    inc=st.integers(0, 2**53 - 1),
    seq=st.integers(0, 2**53 - 1),
    reg=st.integers(0, 2**45),
    name=names,
    sid=names,
    caps=st.lists(names, max_size=3),
    meta=st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=8), max_size=3),
    draining=st.booleans(),
)
def test_registrar_splice_decodes_as_an_instance(
    inc: int,
    seq: int,
    reg: int,
    name: str,
    sid: str,
    caps: list[str],
    meta: dict[str, str],
    draining: bool,
) -> None:
    """What the Lua script stores (ordering fields spliced before the encoded body) is
    exactly the encoding of an Instance with the same fields."""
    body = model.RecordBody(
        service_name=name,
        service_id=sid,
        service_url="http://h:1",
        capabilities=tuple(caps),
        metadata=meta,
        draining=draining,
    )
    spliced = (
        f'{{"incarnation":{inc},"seq":{seq},"registered_at_ms":{reg},'.encode()
        + model.encode(body)[1:]
    )
    inst = model.decode_instance(spliced)
    assert model.encode_record(inst) == spliced
    assert (inst.incarnation, inst.seq, inst.registered_at_ms) == (inc, seq, reg)
    fields = msgspec.structs.asdict(inst)
    for ordering in ("incarnation", "seq", "registered_at_ms"):
        del fields[ordering]
    assert fields.pop("override") is None  # only an operator's drain adds one
    assert fields == msgspec.structs.asdict(body)


def test_events_round_trip_through_the_decoder() -> None:
    """Every event type decodes to itself; the channel must name the same service."""
    events: list[model.AnyEvent] = [
        model.Register(
            service_name="a", service_id="i", incarnation=1, seq=1, service_url="http://x"
        ),
        model.Heartbeat(
            service_name="a", service_id="i", incarnation=1, seq=2, service_url="http://x"
        ),
        model.Drain(service_name="a", service_id="i", incarnation=1, seq=3, service_url="http://x"),
        model.Leave(service_name="a", service_id="i", incarnation=1, seq=4),
    ]
    for event in events:
        assert model.decode_event(model.encode(event), "a") == event
    with pytest.raises(InvalidEvent) as info:
        model.decode_event(model.encode(events[0]), "b")
    assert info.value.reason == "channel_mismatch"


def test_unknown_fields_are_ignored() -> None:
    """A newer agent may send fields this registrar does not know."""
    raw = (
        b'{"type":"leave","service_name":"a","service_id":"i","incarnation":1,"seq":1,'
        b'"zone":"eu-1"}'
    )
    assert isinstance(model.decode_event(raw, "a"), model.Leave)


def test_iso_utc_matches_the_seed_shape() -> None:
    assert model.iso_utc(1735689600000) == "2025-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    "key, parsed",
    [
        ("saga:{default}:inst:payment:p-1", ("payment", "p-1")),
        ("saga:{default}:inst:payment", None),
        ("saga:{default}:index", None),
        ("saga:{other}:inst:payment:p-1", None),
        ("saga:{default}:inst:pay ment:p", None),
    ],
)
def test_keys_parse_only_instance_records(key: str, parsed: tuple[str, str] | None) -> None:
    assert Keys().parse_inst(key) == parsed


def test_names_reject_key_breaking_characters() -> None:
    for bad in ["", "a:b", "a*", "{a}", "a b", "-a", "a" * 129, "caf\u00e9"]:
        assert not is_valid_name(bad), bad
    for good in ["a", "payment", "my-python-service", "A.b_c-9", "a" * 128]:
        assert is_valid_name(good), good
    with pytest.raises(ValueError, match="namespace"):
        Keys("bad ns")


def test_an_operator_drained_record_decodes_and_encodes_back_the_same() -> None:
    """The apply script's splice of an override (its key's JSON plus self_draining)
    is exactly the encoding of an Instance with that override."""
    raw = (
        b'{"incarnation":1,"seq":2,"registered_at_ms":3,"service_name":"a","service_id":"b",'
        b'"service_url":"http://h:1","capabilities":[],"metadata":{},"ttl_ms":60000,'
        b'"draining":true,"override":{"by":"al","reason":"r","at_ms":5,"until_ms":null,'
        b'"self_draining":false}}'
    )
    inst = model.decode_instance(raw)
    assert inst.draining and not inst.self_draining
    assert inst.override == model.DrainOverride(by="al", reason="r", at_ms=5)
    assert model.encode_record(inst) == raw
