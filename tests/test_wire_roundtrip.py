"""One table of (event, bytes) cases, run both ways: encode, and parse back as a browser would.

The parser side is fed whole and one byte at a time. A hypothesis property then checks that
every event the encoder accepts reaches the client unchanged, and that it refuses exactly
the values that could not.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event as note_case
from hypothesis import given
from hypothesis import strategies as st

from sse_handler.event import ServerSentEvent
from sse_handler.parser import EventStreamParser, MessageEvent

E = ServerSentEvent
M = MessageEvent

# (event, frame, what an EventSource sees: the event, or None when nothing is dispatched)
WIRE: list[tuple[ServerSentEvent, bytes, MessageEvent | None]] = [
    (E(data="hello"), b"data: hello\n\n", M("hello")),
    (E(data=""), b"data: \n\n", M("")),
    (E(data="a\n"), b"data: a\ndata: \n\n", M("a\n")),
    (E(data="\n"), b"data: \ndata: \n\n", M("\n")),
    (E(data="a\r\nb\rc\nd"), b"data: a\ndata: b\ndata: c\ndata: d\n\n", M("a\nb\nc\nd")),
    (E(data="a\r\n\r\nb"), b"data: a\ndata: \ndata: b\n\n", M("a\n\nb")),
    (E(data=" lead"), b"data:  lead\n\n", M(" lead")),
    (E(data=":not a comment"), b"data: :not a comment\n\n", M(":not a comment")),
    (E(data="\ufeffbom"), b"data: \xef\xbb\xbfbom\n\n", M("\ufeffbom")),
    (E(data="a\x00b"), b"data: a\x00b\n\n", M("a\x00b")),
    (
        E(data="a\u2028b\u2029c\x0bd\x0ce\x85f"),
        "data: a\u2028b\u2029c\x0bd\x0ce\x85f\n\n".encode(),
        M("a\u2028b\u2029c\x0bd\x0ce\x85f"),
    ),
    (E(data="\U0001f600\u00e9"), b"data: \xf0\x9f\x98\x80\xc3\xa9\n\n", M("\U0001f600\u00e9")),
    (E(data=b"raw\r\nbytes"), b"data: raw\ndata: bytes\n\n", M("raw\nbytes")),
    (E(data="caf\u00e9".encode()), b"data: caf\xc3\xa9\n\n", M("caf\u00e9")),
    (
        E(data={"a": [1, 2], "t": "x\ny"}),
        b'data: {"a":[1,2],"t":"x\\ny"}\n\n',
        M('{"a":[1,2],"t":"x\\ny"}'),
    ),
    (
        E(data=["\u00e9", None, True]),
        'data: ["\u00e9",null,true]\n\n'.encode(),
        M('["\u00e9",null,true]'),
    ),
    (E(data="x", event="update"), b"event: update\ndata: x\n\n", M("x", event="update")),
    (E(data="x", event=""), b"data: x\n\n", M("x")),
    (E(data="x", event=" spaced"), b"event:  spaced\ndata: x\n\n", M("x", event=" spaced")),
    (E(data="x", id="42"), b"id: 42\ndata: x\n\n", M("x", id="42")),
    (E(data="x", id=""), b"id: \ndata: x\n\n", M("x", id="")),
    (E(data="x", id=" 1"), b"id:  1\ndata: x\n\n", M("x", id=" 1")),
    (E(data="x", retry=0), b"retry: 0\ndata: x\n\n", M("x", retry=0)),
    (E(data="x", retry=2500), b"retry: 2500\ndata: x\n\n", M("x", retry=2500)),
    (E(data="x", comment="note"), b": note\ndata: x\n\n", M("x")),
    (
        E(data="d\ne", event="e", id="7", retry=10, comment="c1\nc2"),
        b": c1\n: c2\nevent: e\nid: 7\nretry: 10\ndata: d\ndata: e\n\n",
        M("d\ne", event="e", id="7", retry=10),
    ),
    # No data: nothing is dispatched (id and retry still reach the parser's state).
    (E(id="9"), b"id: 9\n\n", None),
    (E(retry=1000), b"retry: 1000\n\n", None),
    (E(comment="keep-alive"), b": keep-alive\n\n", None),
    (E(comment=""), b":\n\n", None),
    (E(event="lonely"), b"event: lonely\n\n", None),
]


def _feed_all(chunks: list[bytes]) -> tuple[list[MessageEvent], EventStreamParser]:
    parser = EventStreamParser()
    return [event for chunk in chunks for event in parser.feed(chunk)], parser


def _parse_both_ways(frame: bytes) -> tuple[list[MessageEvent], EventStreamParser]:
    events, parser = _feed_all([frame])
    one_by_one, slow = _feed_all([frame[i : i + 1] for i in range(len(frame))])
    assert one_by_one == events
    assert (slow.last_event_id, slow.retry) == (parser.last_event_id, parser.retry)
    return events, parser


@pytest.mark.parametrize(("event", "frame", "seen"), WIRE, ids=[repr(c[1]) for c in WIRE])
def test_encode(event: ServerSentEvent, frame: bytes, seen: MessageEvent | None) -> None:
    assert event.encode() == frame


@pytest.mark.parametrize(("event", "frame", "seen"), WIRE, ids=[repr(c[1]) for c in WIRE])
def test_parse(event: ServerSentEvent, frame: bytes, seen: MessageEvent | None) -> None:
    events, parser = _parse_both_ways(frame)
    assert events == ([] if seen is None else [seen])
    assert parser.last_event_id == (event.id or "")
    assert parser.retry == event.retry


def test_frames_concatenate_into_one_stream() -> None:
    stream = b"".join(event.encode() for event, _, _ in WIRE)
    events, parser = _parse_both_ways(stream)
    # Ids are sticky across events: each sees the last id set before it.
    expected: list[MessageEvent] = []
    last_id = ""
    for event, _, seen in WIRE:
        last_id = event.id if event.id is not None else last_id
        if seen is not None:
            expected.append(M(seen.data, seen.event, last_id, seen.retry))
    assert events == expected
    assert parser.last_event_id == last_id
    assert parser.retry == 1000


# --- property: what the encoder accepts arrives unchanged; what it refuses could not --------

# Surrogate-free text, biased towards everything that is or looks like a line break (CRLF
# as one piece, so that the pair actually occurs).
_TRICKY = [
    "\r",
    "\n",
    "\r\n",
    "\0",
    " ",
    ":",
    "\u2028",
    "\u2029",
    "\x0b",
    "\x0c",
    "\x85",
    "\ufeff",
]
_TEXT = st.lists(
    st.sampled_from(_TRICKY) | st.characters(exclude_categories=["Cs"]), max_size=12
).map("".join)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda children: st.lists(children) | st.dictionaries(_TEXT, children),
    max_leaves=8,
)
_DATA = st.one_of(
    st.none(),
    _TEXT,
    _TEXT.map(str.encode),
    st.binary(),  # mostly invalid UTF-8: must be refused
    st.lists(_JSON),
    st.dictionaries(_TEXT, _JSON),
)


def _expected_data(data: str | bytes | dict[str, Any] | list[Any]) -> str:
    """What ``MessageEvent.data`` must be: the text, line breaks normalised to LF."""
    if isinstance(data, bytes):
        text = data.decode("utf-8")
    elif isinstance(data, str):
        text = data
    else:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _is_valid(data: object, event: str | None, id: str | None, retry: int | None) -> bool:
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return (
        (event is None or not {"\r", "\n"} & set(event))
        and (id is None or not {"\r", "\n", "\0"} & set(id))
        and (retry is None or retry >= 0)
    )


@given(
    data=_DATA,
    event=st.none() | st.text() | _TEXT,
    id=st.none() | st.text() | _TEXT,
    retry=st.none() | st.integers(min_value=-(2**40), max_value=2**63),
    comment=st.none() | _TEXT,
)
def test_accepted_events_arrive_unchanged(
    data: str | bytes | dict[str, Any] | list[Any] | None,
    event: str | None,
    id: str | None,
    retry: int | None,
    comment: str | None,
) -> None:
    # Values that write no line at all (everything None, or only event="") are refused too.
    writes_nothing = data is None and not event and id is None and retry is None
    writes_nothing = writes_nothing and comment is None
    if not _is_valid(data, event, id, retry) or writes_nothing:
        note_case("refused")
        with pytest.raises(ValueError):
            ServerSentEvent(data=data, event=event, id=id, retry=retry, comment=comment)
        return
    frame = ServerSentEvent(data=data, event=event, id=id, retry=retry, comment=comment).encode()
    events, parser = _parse_both_ways(frame)
    note_case("accepted, no data" if data is None else "accepted")
    if data is None:
        assert events == []
    else:
        assert events == [M(_expected_data(data), event or "message", id or "", retry)]
        if isinstance(data, dict | list):
            assert json.loads(events[0].data) == data
    assert parser.last_event_id == (id or "")
    assert parser.retry == retry


@given(
    st.lists(st.builds(ServerSentEvent, data=_TEXT, id=st.none() | st.text("ab0 ")), max_size=5)
)
def test_streams_of_events_keep_ids_sticky(events: list[ServerSentEvent]) -> None:
    seen, parser = _parse_both_ways(b"".join(event.encode() for event in events))
    expected_ids = []
    last_id = ""
    for event in events:
        last_id = event.id if event.id is not None else last_id
        expected_ids.append(last_id)
    assert [message.id for message in seen] == expected_ids
    assert [message.data for message in seen] == [_expected_data(e.data or "") for e in events]
    assert parser.last_event_id == last_id
