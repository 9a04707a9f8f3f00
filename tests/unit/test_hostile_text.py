"""Registry text a client should never be handed: URLs to dial, metadata, terminal output."""

from __future__ import annotations

import json

import pytest

from saga_events import model
from saga_events.cli import _change_line, escape_text, mask_url
from saga_events.errors import InvalidEvent


def event(url: str = "http://10.0.0.5:80", metadata: dict[str, str] | None = None) -> bytes:
    body = {"type": "register", "service_name": "payment", "service_id": "p-1",
            "incarnation": 1, "seq": 1, "service_url": url, "metadata": metadata or {}}  # fmt: skip
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "url",
    [
        "http://pay\u202ement.example/",  # RIGHT-TO-LEFT OVERRIDE
        "http://pay\u2066ment.example/",  # LEFT-TO-RIGHT ISOLATE
        "http://pay\u200bment.example/",  # ZERO WIDTH SPACE
        "http://pay\u200dment.example/",  # ZERO WIDTH JOINER
        "http://pay\ufeffment.example/",  # BOM
        "http://payment.example/\u00a0",  # NO-BREAK SPACE
        "http://payment.example/\u2028",  # LINE SEPARATOR
        "http://payment.example/\x1b[31m",  # ESC (C0)
        "http://payment.example/\x00",  # NUL
        "http://payment.example/\x85",  # NEXT LINE (C1)
        "http://payment.example/\x9b31m",  # CSI (C1)
        "http://payment.example/\x7f",  # DEL
        "http://user:secret@payment.example/",
        "http://user@payment.example/",
        "http://@payment.example/",
    ],
)
def test_urls_a_client_should_not_dial_are_refused(url: str) -> None:
    """Bidi, zero-width, separators, C0/C1 controls and userinfo: a clear bad_url."""
    with pytest.raises(InvalidEvent) as info:
        model.decode_event(event(url), "payment")
    assert info.value.reason == "bad_url"
    assert "secret" not in info.value.detail  # a refused password is not logged either


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:80/", "https://b\u00fccher.example/pfad", "grpc://[::1]:50051"]
)
def test_ordinary_urls_still_pass(url: str) -> None:
    assert model.decode_event(event(url), "payment").service_url == url  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "metadata",
    [
        {"k": "v\x1b[2J"},
        {"k": "v\x00"},
        {"k": "line\nbreak"},
        {"k": "v\r"},
        {"k": "\x9b"},
        {"k": "\x7f"},
        {"k\x1b": "v"},
        {"k\t": "v"},
    ],
)
def test_metadata_with_control_characters_is_refused(metadata: dict[str, str]) -> None:
    """ESC, NUL, CR/LF, DEL and C1 in keys and values; a tab in a key."""
    with pytest.raises(InvalidEvent):
        model.decode_event(event(metadata=metadata), "payment")


def test_metadata_value_may_hold_a_tab_and_unicode() -> None:
    ev = model.decode_event(event(metadata={"zone": "eu\twest", "owner": "J\u00fcrgen"}), "payment")
    assert ev.metadata == {"zone": "eu\twest", "owner": "J\u00fcrgen"}  # type: ignore[union-attr]


def test_escape_text_leaves_no_raw_control_or_format_character() -> None:
    raw = "http://a\x1b[31m\u202eb\u200b\x85\x00 c\\d\U000e0001\u00e4"
    shown = escape_text(raw)
    assert shown == "http://a\\x1b[31m\\u202eb\\u200b\\x85\\x00 c\\\\d\\U000e0001\u00e4"
    assert all(ch == " " or ch.isprintable() for ch in shown)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6399/0", "redis://127.0.0.1:6399/0"),
        ("redis://:s3cret@h:1/0", "redis://:****@h:1/0"),
        ("rediss://saga-registrar:s3cret@h:1/0", "rediss://saga-registrar:****@h:1/0"),
    ],
)
def test_mask_url_hides_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_watch_lines_are_escaped() -> None:
    row = {"service_name": "pay", "service_id": "p-1", "draining": True,
           "service_url": "http://x\x1b[2J\u202e/"}  # fmt: skip
    line = _change_line("added", row)
    assert line == "added    pay/p-1 http://x\\x1b[2J\\u202e/ (draining)"
