"""The parser against WHATWG HTML 9.2.6 "Interpreting an event stream", as raw bytes.

Every stream is parsed whole, one byte at a time, and split in two at every position; all
must give the same events and leave the parser in the same state.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_handler.parser import EventStreamParser, MessageEvent

M = MessageEvent


def _parse(chunks: Iterable[bytes], *, keep_comments: bool = False) -> tuple[object, ...]:
    parser = EventStreamParser(keep_comments=keep_comments)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events, parser.last_event_id, parser.retry, parser.comments


def parse_every_way(stream: bytes, *, keep_comments: bool = False) -> EventStreamParser:
    """Parse whole, byte by byte and split everywhere; return the parser fed whole."""
    whole = _parse([stream], keep_comments=keep_comments)
    byte_by_byte = _parse(
        (stream[i : i + 1] for i in range(len(stream))), keep_comments=keep_comments
    )
    assert byte_by_byte == whole
    for cut in range(len(stream) + 1):
        assert _parse([stream[:cut], stream[cut:]], keep_comments=keep_comments) == whole
    parser = EventStreamParser(keep_comments=keep_comments)
    parser.feed(stream)
    return parser


def events_every_way(stream: bytes) -> list[MessageEvent]:
    parser = EventStreamParser()
    events = parser.feed(stream)
    parse_every_way(stream)
    return events


CASES: list[tuple[str, bytes, list[MessageEvent]]] = [
    # The examples of WHATWG 9.2.6.
    ("spec-stocks", b"data: YHOO\ndata: +2\ndata: 10\n\n", [M("YHOO\n+2\n10")]),
    (
        "spec-ids",
        b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n"
        b"data:  third event\n\n",
        [M("first event", id="1"), M("second event", id=""), M(" third event", id="")],
    ),
    ("spec-empty-data", b"data\n\ndata\ndata\n\ndata:", [M(""), M("\n")]),
    ("spec-one-space", b"data:test\n\ndata: test\n\n", [M("test"), M("test")]),
    (
        "spec-event-types",
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
        [M("73857293", event="add"), M("2153", event="remove"), M("113411", event="add")],
    ),
    # BOM: one, at the very start of the stream only.
    ("bom-stripped", b"\xef\xbb\xbfdata: x\n\n", [M("x")]),
    ("second-bom-kept", b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n", [M("y")]),
    ("bom-in-value-kept", b"data: \xef\xbb\xbfx\n\n", [M("\ufeffx")]),
    ("bom-later-kept", b"data: a\n\n\xef\xbb\xbfdata: b\n\n", [M("a")]),
    # Line endings: CRLF, LF, CR, in any mix; CRLF is one break.
    ("crlf", b"data: a\r\ndata: b\r\n\r\n", [M("a\nb")]),
    ("cr", b"data: a\rdata: b\r\r", [M("a\nb")]),
    ("mixed", b"data: a\r\ndata: b\rdata: c\n\r\n", [M("a\nb\nc")]),
    ("lf-cr-is-two-breaks", b"data: a\n\rdata: b\n\n", [M("a"), M("b")]),
    ("cr-cr-lf", b"data: a\r\r\ndata: b\n\n", [M("a"), M("b")]),
    ("cr-lf-lf", b"data: a\r\n\ndata: b\n\n", [M("a"), M("b")]),
    (
        "not-line-breaks",
        "data: a\u2028b\u2029c\x0bd\x0ce\x85f\n\n".encode(),
        [M("a\u2028b\u2029c\x0bd\x0ce\x85f")],
    ),
    # Field parsing.
    ("one-space-only", b"data:  x\n\n", [M(" x")]),
    ("no-space", b"data:x\n\n", [M("x")]),
    ("tab-kept", b"data:\tx\n\n", [M("\tx")]),
    ("colon-in-value", b"data: a: b:c\n\n", [M("a: b:c")]),
    ("no-colon-empty-value", b"data\n\n", [M("")]),
    ("trailing-lf-stripped-once", b"data: a\ndata:\ndata\n\n", [M("a\n\n")]),
    ("unknown-field-ignored", b"foo: bar\ndata: x\nfoo\n\n", [M("x")]),
    ("names-case-sensitive", b"Data: x\nEVENT: y\n\ndata: z\n\n", [M("z")]),
    ("name-with-space-unknown", b"data : x\n\n", []),
    ("comment-ignored", b": hi\n:\ndata: x\n: there\n\n", [M("x")]),
    ("nul-in-data-kept", b"data: a\x00b\n\n", [M("a\x00b")]),
    # Event type.
    ("empty-type-is-message", b"event:\ndata: x\n\n", [M("x")]),
    ("last-type-wins", b"event: a\nevent: b\ndata: x\n\n", [M("x", event="b")]),
    (
        "type-reset-after-dispatch",
        b"event: a\ndata: 1\n\ndata: 2\n\n",
        [
            M("1", event="a"),
            M("2"),
        ],
    ),
    ("type-reset-without-data", b"event: a\n\ndata: 2\n\n", [M("2")]),
    ("type-space-kept", b"event:  a\ndata: x\n\n", [M("x", event=" a")]),
    # id: sticky, reset by an empty id, ignored when it contains NUL.
    ("sticky-id", b"id: 1\ndata: a\n\ndata: b\n\n", [M("a", id="1"), M("b", id="1")]),
    ("id-without-data-is-kept", b"id: 7\n\ndata: b\n\n", [M("b", id="7")]),
    (
        "id-pending-until-dispatch",
        b"id: 1\ndata: a\n\nid: 2\ndata: b\n\n",
        [
            M("a", id="1"),
            M("b", id="2"),
        ],
    ),
    (
        "empty-id-resets",
        b"id: 1\ndata: a\n\nid\ndata: b\n\nid: 3\n\nid:\ndata: c\n\n",
        [
            M("a", id="1"),
            M("b", id=""),
            M("c", id=""),
        ],
    ),
    (
        "id-with-nul-ignored",
        b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
        [
            M("a", id="1"),
            M("b", id="1"),
        ],
    ),
    ("id-space-kept", b"id:  1\ndata: a\n\n", [M("a", id=" 1")]),
    ("id-unicode", "id: \u00e9\u2028\ndata: a\n\n".encode(), [M("a", id="\u00e9\u2028")]),
    # retry: ASCII digits only, per block on the event.
    ("retry", b"retry: 1500\ndata: a\n\n", [M("a", retry=1500)]),
    ("retry-per-block", b"retry: 10\ndata: a\n\ndata: b\n\n", [M("a", retry=10), M("b")]),
    ("retry-last-valid-wins", b"retry: 1\nretry: 2\nretry: x\ndata: a\n\n", [M("a", retry=2)]),
    ("retry-leading-zeros", b"retry: 007\ndata: a\n\n", [M("a", retry=7)]),
    ("retry-not-digits", b"retry: 15x\ndata: a\n\n", [M("a")]),
    ("retry-negative", b"retry: -1\ndata: a\n\n", [M("a")]),
    ("retry-two-spaces", b"retry:  15\ndata: a\n\n", [M("a")]),
    ("retry-empty", b"retry\nretry:\ndata: a\n\n", [M("a")]),
    ("retry-non-ascii-digits", "retry: \u0661\u0662\ndata: a\n\n".encode(), [M("a")]),
    ("retry-float", b"retry: 1.5\ndata: a\n\n", [M("a")]),
    # Blocks without data dispatch nothing.
    ("no-data-not-dispatched", b"event: x\n\nid: 1\n\nretry: 5\n\n: c\n\n\n\n", []),
    # The end of the stream: an unterminated event is discarded.
    ("unterminated-discarded", b"data: a\n\ndata: b\n", [M("a")]),
    ("unterminated-no-newline", b"data: a\n\ndata: b", [M("a")]),
    ("unterminated-cr", b"data: a\r\rdata: b\r", [M("a")]),
    # UTF-8: decoded with replacement, a character split anywhere still decoded.
    (
        "multibyte",
        "data: caf\u00e9 \u20ac \U0001f600\n\n".encode(),
        [M("caf\u00e9 \u20ac \U0001f600")],
    ),
    ("invalid-bytes", b"data: \xff\xfe\n\n", [M("\ufffd\ufffd")]),
    ("truncated-sequence", b"data: \xe2\x82\n\n", [M("\ufffd")]),
    ("truncated-then-ascii", b"data: \xf0\x9f\x98x\n\n", [M("\ufffdx")]),
    ("overlong", b"data: \xc0\xaf\n\n", [M("\ufffd\ufffd")]),
    ("encoded-surrogate", b"data: \xed\xa0\x80\n\n", [M("\ufffd\ufffd\ufffd")]),
    ("invalid-in-name", b"d\xffata: x\n\ndata: y\n\n", [M("y")]),
    ("partial-bom", b"\xef\xbbdata: x\n\ndata: y\n\n", [M("y")]),
]


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_whatwg_case(stream: bytes, expected: list[MessageEvent]) -> None:
    assert events_every_way(stream) == expected


def test_last_event_id_is_set_at_dispatch_even_without_data() -> None:
    parser = parse_every_way(b"id: 1\n")
    assert parser.last_event_id == ""  # not dispatched yet
    parser = parse_every_way(b"id: 1\n\n")
    assert parser.last_event_id == "1"
    parser = parse_every_way(b"id: 1\n\nid\n\n")
    assert parser.last_event_id == ""
    parser = parse_every_way(b"id: 1\n\nid: \x00\n\n")
    assert parser.last_event_id == "1"


def test_retry_is_set_at_once_even_without_data_or_dispatch() -> None:
    assert EventStreamParser().retry is None
    assert parse_every_way(b"retry: 3000\n").retry == 3000
    assert parse_every_way(b"retry: 3000\n\nretry: x\n\n").retry == 3000
    assert parse_every_way(b"retry: 3000\n\nretry: 0\n\n").retry == 0
    assert parse_every_way(b"retry: -5\n\n").retry is None


def test_retry_with_too_many_digits_is_ignored() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"retry: " + b"9" * 5000 + b"\ndata: a\n\n") == [M("a")]
    assert parser.retry is None


def test_comments_are_kept_only_when_asked() -> None:
    stream = b": keep-alive\n:\n:  two spaces\n:x\ndata: a\n: mid\n\n"
    assert parse_every_way(stream).comments == []
    parser = parse_every_way(stream, keep_comments=True)
    assert parser.comments == ["keep-alive", "", " two spaces", "x", "mid"]


def test_feed_returns_only_the_events_it_completed() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b") == [M("a")]
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == [M("b")]
    assert parser.feed(b"\n") == []  # the LF of a CRLF split across feeds
    assert parser.feed(b"data: c\n\n") == [M("c")]
    assert parser.feed(b"") == []


def test_lf_after_cr_is_skipped_only_once() -> None:
    parser = EventStreamParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [M("a")]


def test_message_event_defaults() -> None:
    event = MessageEvent("x")
    assert (event.data, event.event, event.id, event.retry) == ("x", "message", "", None)


_FRAGMENTS = st.sampled_from(
    [
        b"data",
        b"event",
        b"id",
        b"retry",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"1",
        b"x",
        b"\x00",
        b"\xef\xbb\xbf",
        b"\xe2\x82",
        b"\xac",
        b"\xff",
        "\u2028".encode(),
    ]
)


@given(
    stream=st.one_of(st.binary(), st.lists(_FRAGMENTS).map(b"".join)),
    cuts=st.lists(st.integers(min_value=0)),
)
def test_any_chunking_gives_the_same_result(stream: bytes, cuts: list[int]) -> None:
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    bounds = [0, *points, len(stream)]
    chunks = [stream[a:b] for a, b in pairwise(bounds)]
    assert b"".join(chunks) == stream
    assert _parse(chunks, keep_comments=True) == _parse([stream], keep_comments=True)
    assert _parse((stream[i : i + 1] for i in range(len(stream))), keep_comments=True) == _parse(
        [stream], keep_comments=True
    )
