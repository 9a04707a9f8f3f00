"""The SSE parser of saga_events.sse_client, after the WHATWG event-stream rules."""

from __future__ import annotations

from saga_events.sse_client import SSEEvent, SSEParser


def parse(*chunks: str) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return events, parser


def test_fields_and_dispatch_on_blank_line() -> None:
    """event, data and id make one event, dispatched by the blank line."""
    events, _ = parse('id: 7\nevent: added\ndata: {"a":1}\n\n')
    assert events == [SSEEvent(event="added", data='{"a":1}', id="7")]


def test_default_type_is_message_and_no_data_no_event() -> None:
    """Without event: the type is message; a block without data dispatches nothing."""
    events, _ = parse("data: x\n\n", "event: lonely\n\n", "data: y\n\n")
    assert events == [SSEEvent("message", "x"), SSEEvent("message", "y")]


def test_multi_line_data_joined_with_newlines() -> None:
    """Several data lines join with \\n; a field without a value is empty."""
    events, _ = parse("data: one\ndata\ndata:  two\n\n")
    assert events == [SSEEvent("message", "one\n\n two")]


def test_comments_are_counted_and_ignored() -> None:
    """Lines starting with a colon are comments (keep-alives)."""
    events, parser = parse(": keep-alive\n\n", ":x\ndata: d\n\n")
    assert events == [SSEEvent("message", "d")]
    assert parser.comments == 2


def test_id_persists_and_null_id_is_ignored() -> None:
    """The last id stays with later events; an id with NUL is ignored."""
    events, parser = parse("id: a\ndata: 1\n\n", "data: 2\n\n", "id: b\0c\ndata: 3\n\n")
    assert [e.id for e in events] == ["a", "a", "a"]
    assert parser.last_id == "a"


def test_retry_only_when_all_digits() -> None:
    """retry: sets the reconnection time only when it is all ASCII digits."""
    _, parser = parse("retry: 1500\n\n")
    assert parser.retry == 1500
    parser.feed("retry: 1x\n\nretry: -5\n\n")
    assert parser.retry == 1500


def test_line_endings_and_chunk_splits() -> None:
    """CRLF, CR and LF all end lines, even when a chunk ends between \\r and \\n."""
    text = "event: a\r\ndata: 1\r\n\r\nevent: b\rdata: 2\r\rdata: 3\n\n"
    whole, _ = parse(text)
    assert whole == [SSEEvent("a", "1"), SSEEvent("b", "2"), SSEEvent("message", "3")]
    for cut in range(len(text) + 1):
        split, _ = parse(text[:cut], text[cut:])
        assert split == whole, cut
    bytewise, _ = parse(*text)
    assert bytewise == whole


def test_unknown_fields_ignored_and_incomplete_event_waits() -> None:
    """Unknown fields change nothing; an event without its blank line is not dispatched yet."""
    events, parser = parse("foo: bar\ndata: x\n")
    assert events == []
    assert parser.feed("\n") == [SSEEvent("message", "x")]
