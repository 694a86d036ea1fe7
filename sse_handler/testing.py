"""A test client for infinite event streams.

HTTP clients wait for a response to end; an event stream never does. This
client opens a real TCP connection, reads the response head, then parses the
body incrementally with :class:`EventStreamParser` as it arrives::

    async with await EventStreamClient.connect(f"http://127.0.0.1:{port}/events") as client:
        assert client.status == 200
        welcome = await client.next_event(timeout=5)
        assert welcome.event == "welcome"

It is what the project's own tests use, and it is meant for testing your
handlers too. Every wait takes a timeout and raises ``TimeoutError`` past it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import struct
from collections import deque
from types import TracebackType
from urllib.parse import urlsplit

from tornado.httputil import HTTPHeaders

from .parser import EventStreamParser, MessageEvent

__all__ = ["Dechunker", "EventStreamClient", "StreamEnded"]


class StreamEnded(Exception):
    """The server closed the stream before the awaited event arrived."""


class EventStreamClient:
    """One streaming GET request. Create it with :meth:`connect`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: EventStreamParser
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.parser = parser
        self.status = 0
        self.reason = ""
        self.headers = HTTPHeaders()
        #: Every body byte received so far, exactly as sent (chunk framing removed).
        self.raw = bytearray()
        #: Set when the body is chunked (HTTP/1.1); the last chunk ends the stream.
        self._chunks: Dechunker | None = None
        self._events: deque[MessageEvent] = deque()
        self.ended = False

    @classmethod
    async def connect(
        cls,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 5.0,
        keep_comments: bool = True,
        local_addr: tuple[str, int] | None = None,
        ssl: ssl_module.SSLContext | None = None,
    ) -> EventStreamClient:
        """Send ``GET url`` and read the response head (not the body).

        ``local_addr`` binds the client's end (e.g. ``("127.0.0.2", 0)`` to
        look like another client address on loopback). An ``https://`` URL
        uses TLS, with ``ssl`` as the client's context (default: the system's
        trust store).
        """
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        context = (ssl or ssl_module.create_default_context()) if tls else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local_addr, ssl=context), timeout
        )
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        client = cls(reader, writer, EventStreamParser(keep_comments=keep_comments))
        await asyncio.wait_for(client._read_head(), timeout)
        return client

    async def _read_head(self) -> None:
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, _, rest = head.decode("latin-1").partition("\r\n")
        _, status, self.reason = [*status_line.split(" ", 2), ""][:3]
        self.status = int(status)
        self.headers = HTTPHeaders.parse(rest)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._chunks = Dechunker()

    async def next_event(self, timeout: float = 5.0) -> MessageEvent:
        """The next dispatched event; ``StreamEnded`` if the stream ends first."""
        return await asyncio.wait_for(self._next_event(), timeout)

    async def _next_event(self) -> MessageEvent:
        while not self._events:
            if not await self._read_some():
                raise StreamEnded(f"stream ended; last bytes: {bytes(self.raw[-200:])!r}")
        return self._events.popleft()

    async def events(self, n: int, timeout: float = 5.0) -> list[MessageEvent]:
        """The next ``n`` events, all within ``timeout``."""

        async def read() -> list[MessageEvent]:
            return [await self._next_event() for _ in range(n)]

        return await asyncio.wait_for(read(), timeout)

    async def wait_for_bytes(self, needle: bytes, timeout: float = 5.0) -> None:
        """Wait until ``needle`` appears in the raw body (e.g. a comment)."""

        async def read() -> None:
            while needle not in self.raw:
                if not await self._read_some():
                    raise StreamEnded(f"stream ended without {needle!r}")

        await asyncio.wait_for(read(), timeout)

    async def wait_closed(self, timeout: float = 5.0) -> list[MessageEvent]:
        """Read until the server closes; returns the events that came before."""

        async def read() -> list[MessageEvent]:
            while await self._read_some():
                pass
            events = list(self._events)
            self._events.clear()
            return events

        return await asyncio.wait_for(read(), timeout)

    async def read_body(self, timeout: float = 5.0) -> bytes:
        """For a non-stream answer (an error page): the whole body."""
        length = self.headers.get("Content-Length")
        if self.status in (204, 304):
            return b""
        if length is not None:
            body = await asyncio.wait_for(self._reader.readexactly(int(length)), timeout)
        elif self._chunks is not None:
            await self.wait_closed(timeout)
            return bytes(self.raw)
        else:
            body = await asyncio.wait_for(self._reader.read(), timeout)
        self.raw += body
        return body

    async def _read_some(self) -> bool:
        if self.ended:
            return False
        try:
            chunk = await self._reader.read(65536)
        except ConnectionError:
            chunk = b""
        if self._chunks is not None and chunk:
            chunk = self._chunks.feed(chunk)
            if self._chunks.done:
                self._take(chunk)
                chunk = b""
            elif not chunk:
                return True  # only framing arrived
        if not chunk:
            self.ended = True
            self._writer.close()  # the server is done; release our end too
            return False
        self._take(chunk)
        return True

    def _take(self, body: bytes) -> None:
        self.raw += body
        self._events.extend(self.parser.feed(body))

    @property
    def comments(self) -> list[str]:
        """Comment lines received so far (keep-alives, the first ``: ok``)."""
        return self.parser.comments

    @property
    def last_event_id(self) -> str:
        """The last event id the stream set, as ``EventSource.lastEventId``."""
        return self.parser.last_event_id

    def close(self) -> None:
        """Close the connection with a FIN, as a browser tab that goes away."""
        self._writer.close()

    def abort(self) -> None:
        """Close the connection with a RST (SO_LINGER 0), as a crashed client."""
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()

    async def __aenter__(self) -> EventStreamClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class Dechunker:
    """Removes HTTP/1.1 chunk framing (RFC 9112 section 7.1) as bytes arrive:
    ``feed(received)`` returns the body bytes in it; ``done`` once the last
    chunk came. For tests that read a stream from a raw socket."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0  # bytes of the current chunk's data still to come
        self.done = False  # the last chunk (size 0) has arrived

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while self._buffer and not self.done:
            if self._left > 0:
                piece = self._buffer[: self._left]
                out += piece
                del self._buffer[: len(piece)]
                self._left -= len(piece)
                if self._left == 0:
                    self._left = -2  # the CRLF after the data
                continue
            if self._left < 0:
                if len(self._buffer) < 2:
                    break
                if self._buffer[:2] != b"\r\n":
                    raise ValueError("malformed chunk: no CRLF after the data")
                del self._buffer[:2]
                self._left = 0
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(self._buffer[:end]).split(b";")[0], 16)
            del self._buffer[: end + 2]
            if size == 0:
                self.done = True
            else:
                self._left = size
        return bytes(out)
