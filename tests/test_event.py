"""The encoder: exact frames, and every refusal raised at construction, naming its field."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_handler.event import ServerSentEvent, encode_comment, encode_retry, event_frame

# --- exact frames -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "frame"),
    [
        (ServerSentEvent(data="hello"), b"data: hello\n\n"),
        (ServerSentEvent(data=""), b"data: \n\n"),
        (ServerSentEvent(data="a\n"), b"data: a\ndata: \n\n"),
        (ServerSentEvent(data="a\r\nb\rc\nd"), b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (ServerSentEvent(data="\r\n\r\n"), b"data: \ndata: \ndata: \n\n"),
        (ServerSentEvent(data="\n\r"), b"data: \ndata: \ndata: \n\n"),
        (ServerSentEvent(data=" lead"), b"data:  lead\n\n"),
        (
            ServerSentEvent(data="a\u2028b\u2029c\x0bd\x0ce\x85f"),
            "data: a\u2028b\u2029c\x0bd\x0ce\x85f\n\n".encode(),
        ),
        (
            ServerSentEvent(data="caf\u00e9 \u20ac \U0001f600"),
            "data: caf\u00e9 \u20ac \U0001f600\n\n".encode(),
        ),
        (ServerSentEvent(data=b"raw\nbytes"), b"data: raw\ndata: bytes\n\n"),
        (ServerSentEvent(data={"b": [1, 2], "a": "x y"}), b'data: {"b":[1,2],"a":"x y"}\n\n'),
        (ServerSentEvent(data=[1, "\u00e9", None]), 'data: [1,"\u00e9",null]\n\n'.encode()),
        (ServerSentEvent(data={"text": "two\nlines"}), b'data: {"text":"two\\nlines"}\n\n'),
        (ServerSentEvent(event="update", data="x"), b"event: update\ndata: x\n\n"),
        (ServerSentEvent(event="", data="x"), b"data: x\n\n"),
        (ServerSentEvent(id="42", data="x"), b"id: 42\ndata: x\n\n"),
        (ServerSentEvent(id="", data="x"), b"id: \ndata: x\n\n"),
        (ServerSentEvent(id=""), b"id: \n\n"),
        (ServerSentEvent(retry=0), b"retry: 0\n\n"),
        (ServerSentEvent(retry=3000, data="x"), b"retry: 3000\ndata: x\n\n"),
        (ServerSentEvent(comment="hi"), b": hi\n\n"),
        (ServerSentEvent(comment=""), b":\n\n"),
        (ServerSentEvent(comment="a\r\n\nb"), b": a\n:\n: b\n\n"),
        (
            ServerSentEvent(data="d", event="e", id="i", retry=5, comment="c"),
            b": c\nevent: e\nid: i\nretry: 5\ndata: d\n\n",
        ),
    ],
)
def test_exact_frame(event: ServerSentEvent, frame: bytes) -> None:
    assert event.encode() == frame


def test_frame_is_computed_once_at_construction() -> None:
    payload: dict[str, Any] = {"n": 1}
    event = ServerSentEvent(data=payload)
    payload["n"] = 2  # later mutation must not change what is sent
    assert event.encode() is event.encode()
    assert event.encode() == b'data: {"n":1}\n\n'


def test_frame_is_not_part_of_init_repr_or_equality() -> None:
    (frame_field,) = [f for f in dataclasses.fields(ServerSentEvent) if f.name == "_frame"]
    assert not frame_field.init
    assert "_frame" not in repr(ServerSentEvent(data="x"))
    assert ServerSentEvent(data="x") == ServerSentEvent(data="x")
    assert ServerSentEvent(data="x") != ServerSentEvent(data="y")


def test_event_is_frozen() -> None:
    event = ServerSentEvent(data="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]


def test_json_is_compact_and_not_ascii_escaped() -> None:
    value = {"k": ["\u00e9", {"n": 1.5, "t": True}], "\u20ac": None}
    frame = ServerSentEvent(data=value).encode()
    body = frame.removeprefix(b"data: ").removesuffix(b"\n\n")
    assert b" " not in body
    assert b"\\u" not in body
    assert json.loads(body) == value
    assert body.decode() == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "event",
    [
        ServerSentEvent(data="\ufeffstarts with a BOM"),
        ServerSentEvent(data="x"),
        ServerSentEvent(comment="\ufeff"),
        ServerSentEvent(id="\u00e9", event="\u20ac", retry=1, comment="c", data=b"b"),
    ],
)
def test_frame_is_utf8_lf_only_without_leading_bom(event: ServerSentEvent) -> None:
    frame = event.encode()
    assert isinstance(frame, bytes)
    assert not frame.startswith(b"\xef\xbb\xbf")
    assert b"\r" not in frame
    assert frame.endswith(b"\n\n")
    assert not frame.endswith(b"\n\n\n")
    frame.decode("utf-8")  # raises if it is not UTF-8
    assert frame.count(b"\n\n") == 1


def test_encode_comment() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("keep-alive") == b": keep-alive\n\n"
    assert encode_comment("a\nb\r\nc\rd") == b": a\n: b\n: c\n: d\n\n"
    assert encode_comment(" x") == b":  x\n\n"


def test_encode_retry() -> None:
    assert encode_retry(0) == b"retry: 0\n\n"
    assert encode_retry(2500) == b"retry: 2500\n\n"


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"event": "a\nb"}, "event"),
        ({"event": "a\rb"}, "event"),
        ({"event": "\r\n"}, "event"),
        ({"id": "a\nb"}, "id"),
        ({"id": "a\rb"}, "id"),
        ({"id": "a\0b"}, "id"),
        ({"id": "\0"}, "id"),
        ({"retry": -1}, "retry"),
        ({"retry": True}, "retry"),
        ({"retry": False}, "retry"),
        ({"retry": 1.0}, "retry"),
        ({"retry": "100"}, "retry"),
        ({"data": b"\xff"}, "data"),
        ({"data": b"caf\xc3"}, "data"),
        ({"data": b"\xed\xa0\x80"}, "data"),  # an encoded surrogate is not valid UTF-8
        ({"data": {"x": object()}}, "data"),
        ({"data": [{1, 2}]}, "data"),
        ({"data": {"x": float("nan")}}, "data"),
        ({"data": [float("inf")]}, "data"),
        ({"data": "\ud800"}, "data"),
        ({"data": "ok \udfff"}, "data"),
        ({"data": {"k": "\ud83d"}}, "data"),
        ({"data": ["\udc80"]}, "data"),
        ({"event": "\ud800"}, "event"),
        ({"id": "\udc00x"}, "id"),
        ({"comment": "\ud800"}, "comment"),
    ],
)
def test_value_error_names_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ValueError, match=f"^{field_name} "):
        ServerSentEvent(**kwargs)


def test_circular_json_is_refused_naming_data() -> None:
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match=r"^data "):
        ServerSentEvent(data=circular)


def test_huge_retry_is_refused_naming_retry() -> None:
    with pytest.raises(ValueError, match=r"^retry "):
        ServerSentEvent(retry=10**5000)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"data": 1}, "data"),
        ({"data": 1.5}, "data"),
        ({"data": True}, "data"),
        ({"data": ("a", "b")}, "data"),
        ({"data": bytearray(b"x")}, "data"),
        ({"data": object()}, "data"),
        ({"event": 1}, "event"),
        ({"id": 1}, "id"),
        ({"comment": b"x"}, "comment"),
    ],
)
def test_type_error_names_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(TypeError, match=f"^{field_name} "):
        ServerSentEvent(**kwargs)


def test_event_without_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="needs at least one field"):
        ServerSentEvent()


def test_event_with_only_an_empty_type_is_refused() -> None:
    # event="" is written as nothing, so this frame would carry nothing at all.
    with pytest.raises(ValueError, match="needs at least one field"):
        ServerSentEvent(event="")


def test_encode_comment_and_retry_validate_like_the_fields() -> None:
    with pytest.raises(ValueError, match=r"^comment "):
        encode_comment("\ud800")
    with pytest.raises(ValueError, match=r"^retry "):
        encode_retry(-5)
    with pytest.raises(ValueError, match=r"^retry "):
        encode_retry(True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"data": "\0"},  # NUL is fine in data: the parser passes it through
        {"event": "\0"},
        {"id": "\u2028 \x0b \x0c \x85"},  # not line breaks on the wire
        {"event": "\u2028"},
        {"comment": "\0"},
        {"retry": 0},
        {"data": b""},
        {"data": {}},
        {"data": []},
    ],
)
def test_accepted_edge_values(kwargs: dict[str, Any]) -> None:
    frame = ServerSentEvent(**kwargs).encode()
    assert frame.endswith(b"\n\n")


# The characters that matter to a frame (line breaks, NUL, a lone surrogate,
# non-ASCII): an alphabet of its own also spares Hypothesis building its
# table of every Unicode character on a fresh machine (its slow-input check).
_CHARS = "a: \r\n\x00\u2028é\ud800"
_field_values = st.one_of(
    st.none(),
    st.text(_CHARS, max_size=6),
    st.binary(max_size=4),
    st.integers(min_value=-2, max_value=2**70),
    st.booleans(),
    st.dictionaries(st.text(_CHARS, max_size=2), st.integers(), max_size=2),
    st.just(float("nan")),
)


@given(
    st.dictionaries(
        st.sampled_from(["data", "event", "id", "retry", "comment", "other"]),
        _field_values,
        max_size=4,
    )
)
def test_fields_given_as_keywords_encode_as_the_event_object_does(fields: dict[str, Any]) -> None:
    """event_frame() encodes keyword fields without building the object: the
    same frame, or the same error, as ServerSentEvent(**fields)."""
    try:
        expected: bytes | tuple[type, str] = ServerSentEvent(**fields).encode()
    except (TypeError, ValueError) as exc:
        expected = (type(exc), str(exc))
    try:
        got: bytes | tuple[type, str] = event_frame(None, fields)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        got = (type(exc), str(exc))
    assert got == expected


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text('a"\\\n\r\x00\x1f\u2028é😀\ud800', max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.one_of(st.text("ab\n\u2028", max_size=3), st.integers(), st.booleans(), st.none()),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)


@given(
    st.one_of(
        st.lists(_json_values, max_size=3),
        st.dictionaries(st.text(max_size=3), _json_values, max_size=3),
    )
)
def test_json_data_is_what_the_json_module_writes(data: Any) -> None:
    """A dict or list becomes one data line: the standard library's compact
    JSON (``allow_nan=False``, UTF-8 as is), or a ValueError naming data where
    it refuses the value (NaN, infinities) or UTF-8 cannot carry it."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        expected: bytes | None = b"data: " + text.encode("utf-8") + b"\n\n"
    except (ValueError, UnicodeEncodeError):
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match=r"^data "):
            ServerSentEvent(data=data)
        with pytest.raises(ValueError, match=r"^data "):
            event_frame(None, {"data": data})
    else:
        assert ServerSentEvent(data=data).encode() == expected
        assert event_frame(None, {"data": data}) == expected
        assert json.loads(expected[6:-2]) == json.loads(text)


def test_deeply_nested_json_is_refused_naming_data() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match=r"^data "):
        ServerSentEvent(data=deep)


def test_an_event_type_is_checked_every_time_however_often_it_comes() -> None:
    for _ in range(3):
        assert event_frame(None, {"event": "tick", "data": "1"}) == b"event: tick\ndata: 1\n\n"
        with pytest.raises(ValueError, match=r"^event "):
            event_frame(None, {"event": "ti\nck", "data": "1"})
    # Past the types kept, each one is still written and checked.
    for n in range(600):
        assert event_frame(None, {"event": f"t{n}"}) == f"event: t{n}\n\n".encode()
    assert event_frame(None, {"event": "", "data": "x"}) == b"data: x\n\n"


def test_circular_data_is_refused_at_once_without_encoding_the_cycle_over_and_over() -> None:
    """A cycle is caught where it closes, as json.dumps catches it: not after
    encoding a large value once per level down to the recursion limit
    (a 300 KB string in a self-referencing dict took 0.4 s and hundreds of
    megabytes before the ValueError)."""
    cyclic: dict[str, Any] = {"payload": "x" * 300_000}
    cyclic["self"] = cyclic
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"^data .*[Cc]ircular reference"):
            ServerSentEvent(data=cyclic)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024
    # The encoder is not left believing the objects of a failed encode are still open.
    inner = {"k": 1}
    with pytest.raises(ValueError, match=r"^data "):
        event_frame(None, {"data": [inner, object()]})
    assert event_frame(None, {"data": [inner, inner]}) == b'data: [{"k":1},{"k":1}]\n\n'


def test_an_event_type_of_the_wrong_type_is_a_type_error_naming_event() -> None:
    for wrong in ([], {}, 3, b"tick"):
        with pytest.raises(TypeError, match=r"^event must be a str"):
            event_frame(None, {"event": wrong, "data": "1"})  # type: ignore[typeddict-item]
        with pytest.raises(TypeError, match=r"^event must be a str"):
            ServerSentEvent(event=wrong, data="1")  # type: ignore[arg-type]
