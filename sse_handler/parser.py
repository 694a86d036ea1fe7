"""An incremental event-stream parser: feed it bytes, get the events an EventSource sees.

Pure: no I/O, no Tornado. It implements WHATWG HTML 9.2.6 "Interpreting an event stream"
step by step, so tests and test clients can check what a browser would make of the bytes
:mod:`sse_handler.event` writes. Feeding the same bytes in any chunks, down to one byte
at a time, gives the same events and the same state.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["EventStreamParser", "MessageEvent"]

# WHATWG 9.2.6: "Lines must be separated by either a U+000D CARRIAGE RETURN U+000A LINE FEED
# (CRLF) character pair, a single U+000A LINE FEED (LF) character, or a single U+000D
# CARRIAGE RETURN (CR) character." Nothing else (U+2028, VT, FF, U+0085) ends a line.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")

_BOM = "\ufeff"


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """One dispatched event, as an ``EventSource`` listener would see it.

    ``event`` is the type (``"message"`` when none or an empty one was given); ``id`` is
    the parser's last event id at dispatch, which is sticky like ``EventSource.lastEventId``;
    ``retry`` is the last valid ``retry:`` value in this event's block, else ``None``.
    """

    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


class EventStreamParser:
    """Parse a ``text/event-stream`` body incrementally.

    ``last_event_id`` is the sticky last event id (set at every dispatch, even of a block
    without data, as WHATWG 9.2.6 says). ``retry`` is the reconnection time the stream set
    (``None`` until a valid ``retry:`` line). ``comments`` collects the text of comment
    lines, one leading space stripped, when ``keep_comments`` is true (a browser ignores
    them; tests of keep-alives want to see them).

    An event whose block is not ended by a blank line is never dispatched: WHATWG 9.2.6
    discards "any pending data" when the stream ends.
    """

    def __init__(self, *, keep_comments: bool = False) -> None:
        self.last_event_id: str = ""
        self.retry: int | None = None
        self.comments: list[str] = []
        self._keep_comments = keep_comments
        # "Streams must be decoded using the UTF-8 decode algorithm": errors become U+FFFD.
        # The incremental decoder keeps a character split across feeds until it completes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_stream_start = True
        self._after_cr = False
        self._partial_line: list[str] = []
        # The buffers of WHATWG 9.2.6; the data buffer is kept as its lines, and an empty
        # list is its "empty string".
        self._data: list[str] = []
        self._event_type = ""
        self._last_event_id_buffer = ""
        self._block_retry: int | None = None

    def feed(self, data: bytes) -> list[MessageEvent]:
        """Parse the next chunk of the stream and return the events it completed."""
        events: list[MessageEvent] = []
        for line in self._lines(self._decoder.decode(data)):
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> list[str]:
        """The lines that ``text`` completes; an unfinished last line waits for more."""
        if not text:  # only part of a multi-byte character arrived
            return []
        if self._at_stream_start:
            # "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are
            # present": once, at the very start of the stream.
            self._at_stream_start = False
            text = text.removeprefix(_BOM)
        if self._after_cr and text.startswith("\n"):
            # The CR ending the previous chunk already ended the line; this LF completes
            # that CRLF pair and is not a second (blank) line.
            text = text[1:]
        self._after_cr = text.endswith("\r")
        pieces = _LINE_BREAK.split(text)
        if len(pieces) == 1:
            self._partial_line.append(text)
            return []
        pieces[0] = "".join(self._partial_line) + pieces[0]
        self._partial_line = [pieces[-1]] if pieces[-1] else []
        return pieces[:-1]

    def _process_line(self, line: str) -> MessageEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            if self._keep_comments:
                self.comments.append(_strip_one_space(line[1:]))
            return None
        # "If the line contains a U+003A COLON character (:)": the field name is what comes
        # before the first colon, the value what comes after (one leading space removed);
        # a line without a colon is a field name with the empty string as value.
        name, _, value = line.partition(":")
        self._process_field(name, _strip_one_space(value))
        return None

    def _process_field(self, name: str, value: str) -> None:
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            # "If the field value does not contain U+0000 NULL, then set the last event ID
            # buffer to the field value. Otherwise, ignore the field."
            if "\0" not in value:
                self._last_event_id_buffer = value
        elif name == "retry":
            self._set_retry(value)
        # Any other field name: "The field is ignored."

    def _set_retry(self, value: str) -> None:
        # "If the field value consists of only ASCII digits" (str.isdigit alone would also
        # accept other scripts' digits); an empty value is not a number and is ignored.
        if not (value.isascii() and value.isdigit()):
            return
        try:
            milliseconds = int(value)
        except ValueError:  # more digits than sys.get_int_max_str_digits(): unusable
            return
        self.retry = milliseconds
        self._block_retry = milliseconds

    def _dispatch(self) -> MessageEvent | None:
        # "Set the last event ID string of the event source to the value of the last event
        # ID buffer": at every blank line, whether or not an event follows. The buffer
        # itself is not reset, which is what makes the id sticky.
        self.last_event_id = self._last_event_id_buffer
        data, event_type, retry = self._data, self._event_type, self._block_retry
        self._data, self._event_type, self._block_retry = [], "", None
        if not data:
            # "If the data buffer is an empty string, set the data buffer and the event type
            # buffer to the empty string and return."
            return None
        # Each data line appended "value + LF" and one trailing LF is removed: that is the
        # lines joined with LF.
        return MessageEvent(
            data="\n".join(data),
            event=event_type or "message",
            id=self.last_event_id,
            retry=retry,
        )


def _strip_one_space(value: str) -> str:
    # "If value starts with a U+0020 SPACE character, remove it from value": one only.
    return value.removeprefix(" ")
