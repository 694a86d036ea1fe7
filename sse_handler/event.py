"""The event model and its encoder: a :class:`ServerSentEvent` becomes one wire frame.

Pure: no I/O, no Tornado. An event is validated and encoded exactly once, in its
constructor, so a bad value is refused where it enters (never deep inside a write) and
sending one event to many connections hands the same ``bytes`` object to each of them.

A frame is UTF-8 with LF line endings, no BOM, and ends with a blank line::

    : comment lines first (one per line of ``comment``)
    event: <event>
    id: <id>
    retry: <retry>
    data: <one line per line of data>
    <blank line>

It is read back by :class:`sse_handler.parser.EventStreamParser`, which follows WHATWG HTML
9.2.6 "Interpreting an event stream"; the rules below exist so that every event this module
accepts reaches an ``EventSource`` exactly as it was given.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

__all__ = [
    "EventFields",
    "ServerSentEvent",
    "as_event",
    "comment_line",
    "encode_comment",
    "encode_retry",
    "event_frame",
]

# WHATWG 9.2.6: a line ends with CRLF, a lone LF or a lone CR, and with nothing else, so
# U+2028, U+2029, VT, FF and U+0085 must stay inside a line (str.splitlines would break on
# them). CRLF comes first so it counts as one break. UTF-8 never uses the bytes 0x0A or 0x0D
# inside a multi-byte character, so splitting the encoded bytes equals splitting the text.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

# Compact JSON; allow_nan=False: NaN / Infinity are not JSON and JSON.parse rejects them.
# One encoder for every event (json.dumps with options builds one per call).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

# WHATWG 9.2.6 would end an id at CR/LF (the rest becoming a new line, i.e. an injected
# field) and ignores an id containing NUL altogether.
_BAD_ID = re.compile(r"[\r\n\0]")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event, validated and encoded when it is constructed.

    ``data`` is ``str``, UTF-8 ``bytes``, a JSON-able ``dict`` / ``list`` (serialised once,
    compactly), or ``None`` for no data (the event then sets only ``id`` / ``retry`` /
    comments, and an ``EventSource`` dispatches nothing). Line breaks in ``data`` and
    ``comment`` (CRLF, CR or LF) become separate ``data:`` / ``:`` lines. ``event`` names the
    event type (``None`` or ``""``: the default ``"message"``). ``id`` becomes the client's
    last event id; ``id=""`` is written and resets it. ``retry`` is the reconnection time in
    milliseconds.

    Raises ``ValueError`` (naming the field) for a value that would break the frame or not
    survive the trip to the client (``retry`` that is not a non-negative ``int`` included),
    ``TypeError`` for ``data``, ``event``, ``id`` or ``comment`` of the wrong type. The frame
    is computed from the values given, so mutating a ``dict`` / ``list`` afterwards does not
    change what :meth:`encode` returns.
    """

    data: str | bytes | dict[str, Any] | list[Any] | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comment: str | None = None
    _frame: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_frame", _encode(self.data, self.event, self.id, self.retry, self.comment)
        )

    def encode(self) -> bytes:
        """The wire frame: UTF-8, LF line endings, ending with a blank line."""
        return self._frame


class EventFields(TypedDict, total=False):
    """The fields of a :class:`ServerSentEvent` given as keywords:
    ``send(data=..., event=..., id=..., retry=..., comment=...)``."""

    data: str | bytes | dict[str, Any] | list[Any] | None
    event: str | None
    id: str | None
    retry: int | None
    comment: str | None


def as_event(event: ServerSentEvent | None, fields: EventFields) -> ServerSentEvent:
    """An event given as an object or as keyword fields (not both)."""
    if event is None:
        return ServerSentEvent(**fields)
    if fields:
        raise TypeError("give an event or its fields as keywords, not both")
    if not isinstance(event, ServerSentEvent):
        raise TypeError(f"event must be a ServerSentEvent, not {type(event).__name__}")
    return event


def event_frame(event: ServerSentEvent | None, fields: EventFields) -> bytes:
    """The frame of an event given as an object or as keyword fields.

    Fields are encoded as the object would encode them, without building it
    (a frozen dataclass sets each field through ``object.__setattr__``: a
    welcome event per accepted stream pays for that).
    """
    if event is None and fields.keys() <= _FIELD_NAMES:
        return _encode(
            fields.get("data"),
            fields.get("event"),
            fields.get("id"),
            fields.get("retry"),
            fields.get("comment"),
        )
    return as_event(event, fields).encode()


def comment_line(text: str = "") -> bytes:
    """One comment line with no blank line after it (``b":\\n"`` for no text).

    What the stream sends first and as keep-alives: a blank line would end an
    (empty) event, which some clients surface as an empty ``message``.
    """
    return ServerSentEvent(comment=text).encode()[:-1]


def encode_comment(text: str = "") -> bytes:
    """A comment-only frame (``b":\\n\\n"`` for no text), as sent for keep-alives.

    A client ignores it; it only keeps proxies and the connection alive.
    """
    return ServerSentEvent(comment=text).encode()


def encode_retry(retry_ms: int) -> bytes:
    """A frame that only sets the client's reconnection time, ``b"retry: N\\n\\n"``."""
    return ServerSentEvent(retry=retry_ms).encode()


_FIELD_NAMES = frozenset(EventFields.__annotations__)


def _encode(
    data: str | bytes | dict[str, Any] | list[Any] | None,
    event: str | None,
    event_id: str | None,
    retry: int | None,
    comment: str | None,
) -> bytes:
    # Only the fields given are looked at (a welcome has two of five).
    lines: list[bytes] = []
    if comment is not None:
        lines += _comment_lines(comment)
    if event is not None:
        # An application has a few event types: each one's line is made once.
        line = _EVENT_LINES.get(event) if type(event) is str else None
        if line is None:
            line = _event_line(event)
        if line:
            lines.append(line)
    if event_id is not None:
        lines += _id_lines(event_id)
    if retry is not None:
        lines += _retry_lines(retry)
    if data is not None:
        if isinstance(data, dict | list):
            # JSON escapes every control character: one line, nothing to split.
            lines.append(b"data: " + _utf8("data", _json_text(data)))
        else:
            lines += _data_lines(data)
    if not lines:
        # Every field None (or only event=""): the frame would be a bare blank line, which
        # tells the client nothing; refusing it catches a forgotten argument.
        raise ValueError(
            "ServerSentEvent needs at least one field (data, event, id, retry or comment)"
        )
    lines.append(b"\n")
    return b"\n".join(lines)


def _comment_lines(comment: str | None) -> list[bytes]:
    if comment is None:
        return []
    # ": text" mirrors "field: value"; an empty line is just ":" (no trailing space).
    return [b": " + piece if piece else b":" for piece in _split(_utf8("comment", comment))]


def _event_line(event: str) -> bytes:
    """The ``event:`` line of ``event`` (``b""`` for none), kept for next time."""
    encoded = _utf8("event", event)
    if b"\r" in encoded or b"\n" in encoded:
        raise ValueError("event must not contain CR or LF")
    # WHATWG 9.2.6 dispatches an empty type as "message", so "event: " would be dead weight.
    line = b"event: " + encoded if encoded else b""
    if type(event) is str:  # (a subclass may compare or encode otherwise)
        if len(_EVENT_LINES) >= _EVENT_LINES_KEPT:
            _EVENT_LINES.clear()  # types made up per event: start over
        _EVENT_LINES[event] = line
    return line


#: The lines of the event types seen lately (validated), by type.
_EVENT_LINES: dict[str, bytes] = {}
_EVENT_LINES_KEPT = 256


def _id_lines(event_id: str | None) -> list[bytes]:
    if event_id is None:
        return []
    encoded = _utf8("id", event_id)
    if _BAD_ID.search(event_id):
        raise ValueError("id must not contain CR, LF or NUL")
    # An empty id is still written: it resets the client's last event id.
    return [b"id: " + encoded]


def _retry_lines(retry: int | None) -> list[bytes]:
    if retry is None:
        return []
    # bool is an int subclass, but retry=True is surely a mistake, not "1 ms".
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise ValueError(f"retry must be an int >= 0 (milliseconds), not {retry!r}")
    try:
        digits = str(retry)
    except ValueError:  # beyond sys.get_int_max_str_digits(): no client could use it anyway
        raise ValueError("retry is too large to write in decimal") from None
    return [b"retry: " + digits.encode("ascii")]


def _data_lines(data: str | bytes | dict[str, Any] | list[Any] | None) -> list[bytes]:
    if data is None:
        return []
    # One "data:" line per piece; the client joins them with LF, so line breaks survive
    # (normalised to LF), a trailing one included, and "" is a single empty "data: " line.
    return [b"data: " + piece for piece in _split(_data_bytes(data))]


def _data_bytes(data: str | bytes | dict[str, Any] | list[Any]) -> bytes:
    if isinstance(data, str):
        return _utf8("data", data)
    if isinstance(data, bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # The client would decode with replacement, silently changing the data.
            raise ValueError(f"data bytes must be valid UTF-8 ({exc})") from None
        return data
    if isinstance(data, dict | list):
        return _utf8("data", _json_text(data))
    raise TypeError(f"data must be str, bytes, dict, list or None, not {type(data).__name__}")


def _json_text(data: dict[str, Any] | list[Any]) -> str:
    try:
        return _to_json(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data is not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise ValueError("data is not JSON-serialisable (nested too deep)") from None


def _to_json(data: dict[str, Any] | list[Any]) -> str:
    """``_JSON.encode(data)``, with CPython's C encoder made once per thread
    instead of per call (what ``JSONEncoder.encode`` does): 0.4x its time
    for a welcome's data."""
    made = getattr(_encoders, "made", None)
    if made is None:
        made = _encoders.made = _c_encoder()
        if made is None:
            return _JSON.encode(data)
    encoder, markers = made
    try:
        return "".join(encoder(data, 0))
    except BaseException:
        # The C encoder leaves the objects it was inside of in its record of
        # them (its circular-reference check) when it fails.
        markers.clear()
        raise


def _c_encoder() -> tuple[Callable[[Any, int], Any], dict[int, Any]] | None:
    """CPython's C encoder with ``_JSON``'s settings and its own record of
    the objects it is inside of; ``None`` where there is none like it."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    markers: dict[int, Any] = {}
    try:
        encoder = make(
            markers, _JSON.default, json.encoder.encode_basestring, None, ":", ",",
            False, False, False,
        )  # fmt: skip
    except TypeError:  # another signature: JSONEncoder.encode, the documented path
        return None
    return encoder, markers


# One encoder per thread: its record of open objects is its own.
_encoders = threading.local()


def _utf8(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate cannot be written as UTF-8 at all.
        raise ValueError(f"{name} must not contain lone surrogates") from None


def _split(encoded: bytes) -> list[bytes]:
    if b"\n" not in encoded and b"\r" not in encoded:
        return [encoded]  # one line: no regular expression to run
    return _LINE_BREAK.split(encoded)
