"""Accepting a request: limits, authorization, the response head, the hand-off.

Why the body is chunked: clients built on urllib3 (requests, sseclient-py,
requests-sse) read a close-delimited body in 512-byte blocks, so a short event
would wait in their buffer; with chunked transfer coding (RFC 9112 section 7.1)
they hand over each chunk as it arrives. Each frame is one chunk, its framing
computed once with the frame (encode-once holds for a fan-out). HTTP/1.0 has
no chunks: its body is close-delimited. Either way the head says
``Connection: close``: a stream only ever ends by a close.

The stream's first bytes are a comment line (``: ok``) with no blank line
after it: a blank line would dispatch an empty event in several clients.

The request gets one of two endings: a stream handed to
:meth:`ServerSentEventHandler.open_stream` (the handler's one entry point for
this module), or an :class:`Answer`. Its slot under the connection caps is
taken before ``authorize()`` runs and given back on every path that ends
without a stream.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Collection, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import cache
from http import HTTPStatus
from typing import TYPE_CHECKING

from tornado import httputil
from tornado.httputil import HTTPServerRequest
from tornado.log import access_log
from tornado.web import HTTPError

from .event import comment_line, encode_retry
from .grant import Grant
from .tasks import log
from .transport import take_transport
from .writer import LAST_CHUNK, chunk, chunked_for

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["STREAM_HEADERS", "Answer", "accept_stream", "answer_head", "answer_preflight"]

#: The fixed part of every stream's response head; why each header is there:
#: docs/architecture.md, "The response head and the body framing", and docs/proxies.md.
STREAM_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
    ("Connection", "close"),
)

_FIRST_COMMENT = comment_line("ok")

#: What ``authorize()`` may decide (see :meth:`ServerSentEventHandler.authorize`).
Decision = bool | Collection[str] | Grant | None
_KNOWN_STATUSES = frozenset(HTTPStatus)


def accept_stream(
    request: HTTPServerRequest, path_kwargs: dict[str, str], handler: ServerSentEventHandler
) -> Answer | Awaitable[Answer | None] | None:
    """Take one GET: hand it to the handler as a stream, or say how to answer it.

    An :class:`Answer` is written once Tornado has read the request's body, so
    the connection stays open for the client's next request. The result is
    awaitable only when ``authorize()`` is: a synchronous accept costs no
    task and no future (it decides how fast a reconnect storm is taken).
    """
    if handler.shutting_down:
        return _shed(request, handler, 200)
    if not handler.reserve(request.remote_ip):
        return _shed(request, handler, handler.over_limit_status)
    try:
        channels = handler.channels_for(request, path_kwargs)
        allowed = handler.authorize(request)
    except Exception as exc:
        handler.release(request.remote_ip)
        return _failed(request, exc)
    if allowed is not None and inspect.isawaitable(allowed):
        return _open_once_authorized(request, handler, channels, allowed)
    return _open(request, handler, channels, allowed)


async def _open_once_authorized(
    request: HTTPServerRequest,
    handler: ServerSentEventHandler,
    channels: Iterable[str],
    allowed: Awaitable[Decision],
) -> Answer | None:
    try:
        decided = await allowed
    except Exception as exc:
        handler.release(request.remote_ip)
        return _failed(request, exc)
    except BaseException:  # cancelled: no answer, but the slot goes back
        handler.release(request.remote_ip)
        raise
    return _open(request, handler, channels, decided)


def _open(
    request: HTTPServerRequest,
    handler: ServerSentEventHandler,
    channels: Iterable[str],
    allowed: Decision,
) -> Answer | None:
    """The stream, once ``authorize()`` has decided; the slot is released on
    every path that does not end in :meth:`ServerSentEventHandler.open_stream`."""
    handed_over = False
    try:
        granted, grant = _granted_channels(channels, allowed)
        # An empty Last-Event-ID means "no cursor" (a browser omits it then).
        last_event_id = request.headers.get("Last-Event-ID") or _query_argument(
            request, "last_event_id"
        )
        head = _head(request, handler)
        transport = take_transport(request, handler.dead_peer_timeout, handler.kernel_buffer)
        handed_over = True
        handler.open_stream(request, transport, granted, head, last_event_id, grant=grant)
    except Exception as exc:
        if handed_over:
            raise
        return _failed(request, exc)
    finally:
        if not handed_over:
            handler.release(request.remote_ip)
    return None


def _failed(request: HTTPServerRequest, exc: Exception) -> Answer:
    """The answer to a request whose accept raised: its ``HTTPError``, or a 500."""
    if isinstance(exc, HTTPError):
        return Answer(exc.status_code, reason=exc.reason)
    log.error("Uncaught exception while accepting %s", request.uri, exc_info=exc)
    return Answer(500)


async def answer_head(
    request: HTTPServerRequest, path_kwargs: dict[str, str], handler: ServerSentEventHandler
) -> Answer:
    """``HEAD``: the head a GET would get, decided by the same hooks (RFC 9110
    section 9.1), so a denied HEAD gets the same 401/403/204; nothing is
    opened, registered or counted."""
    try:
        channels = handler.channels_for(request, path_kwargs)
        allowed = handler.authorize(request)
        if allowed is not None and inspect.isawaitable(allowed):
            allowed = await allowed
        _granted_channels(channels, allowed)
        headers = dict(_stream_headers(request, handler, chunked=False))
        del headers["Connection"]  # the connection goes on after a HEAD
    except HTTPError as exc:
        return Answer(exc.status_code, reason=exc.reason)
    except Exception:
        log.exception("Uncaught exception while answering HEAD %s", request.uri)
        return Answer(500)
    return Answer(200, headers, body=b"")


def _granted_channels(
    channels: Iterable[str], allowed: Decision
) -> tuple[list[str], Grant | None]:
    """What ``authorize()`` returned, applied to the channels ``channels_for()``
    chose: the channels the stream gets and the grant that allowed them, or
    ``HTTPError`` (401, 403, 204)."""
    if allowed is False:
        raise HTTPError(403)
    if allowed is None or allowed is True:
        return list(channels), None
    if isinstance(allowed, Grant):
        channels = list(channels)
        if not all(allowed.may_read(channel) for channel in channels):
            raise HTTPError(403, reason="Channel not allowed")
        return channels, allowed
    if isinstance(allowed, str | bytes):
        raise TypeError(
            "authorize() returned a string; return a collection of channel names "
            "(e.g. a list), a Grant, True/None to allow, or False to refuse"
        )
    return list(allowed), None


@dataclass(frozen=True, slots=True)
class Answer:
    """A short, complete answer that is not a stream; Tornado keeps the connection.

    A 204 has no body: to an ``EventSource`` it means "stop reconnecting".
    Without ``body``, the body is one line of plain text naming the status;
    an explicit ``body`` goes out as given, with the headers as given (a
    ``HEAD`` on the stream: the stream's head, ``body=b""``).
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None
    body: bytes | None = None

    def parts(self, method: str | None) -> tuple[str, httputil.HTTPHeaders, bytes]:
        """The reason phrase, the headers (with ``Date``) and the body to send."""
        status, reason = self.status, self.reason
        if reason is None:
            reason = HTTPStatus(status).phrase if status in _KNOWN_STATUSES else "Unknown"
        headers = httputil.HTTPHeaders(self.headers)
        if "Date" not in headers:
            headers["Date"] = _http_date()
        body = self.body
        if body is None:
            body = b"" if status in (204, 304) else f"{status}: {reason}\n".encode()
            if body:
                headers["Content-Type"] = "text/plain; charset=utf-8"
        if body:
            headers["Content-Length"] = str(len(body))
        if method == "HEAD":
            body = b""  # the head says what a GET would get, without it
        return reason, headers, body

    def encode(self, method: str | None) -> bytes:
        """The whole answer as bytes, saying ``Connection: close``: for a
        connection that is closed after it (a request whose body is not read)."""
        reason, headers, body = self.parts(method)
        headers["Connection"] = "close"
        lines = [f"HTTP/1.1 {self.status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers.get_all()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def write(self, request: HTTPServerRequest) -> None:
        reason, response_headers, body = self.parts(request.method)
        assert request.connection is not None
        request.connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", self.status, reason),
            response_headers,
            body,
        )
        request.connection.finish()
        self.log(request)

    def log(self, request: HTTPServerRequest) -> None:
        """The access log line Tornado writes for its own handlers."""
        status = self.status
        level = (
            logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        )
        summary = f"{request.method} {request.uri} ({request.remote_ip})"
        access_log.log(level, "%d %s %.2fms", status, summary, 1000.0 * request.request_time())


def _query_argument(request: HTTPServerRequest, name: str) -> str | None:
    """The last value of a query argument, decoded like Tornado's handlers do."""
    values = request.query_arguments.get(name)
    if not values:
        return None
    try:
        return values[-1].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise HTTPError(400, f"Invalid unicode in {name}") from None


def _shed(
    request: HTTPServerRequest, handler: ServerSentEventHandler, status: int
) -> Answer | None:
    """Turn a client away for now.

    200 with a ``retry:`` hint, then the end of the stream, makes a browser
    come back after the hint (jittered, so a crowd spreads out); a 5xx or 429
    would make it give up for good, which is for applications that choose it.
    """
    retry = handler.jittered_retry()
    if status != 200:
        return Answer(status, {"Retry-After": str(max(1, round(retry / 1000)))})
    # Written on the socket itself: the head says the body ends with the
    # connection, and Tornado would keep a keep-alive request's socket open.
    hint = encode_retry(retry)
    if chunked_for(request.version):
        hint = chunk(hint) + LAST_CHUNK
    transport = take_transport(request)
    try:
        transport.send(_head(request, handler) + hint)
    except OSError:
        pass
    transport.close()
    return None


def answer_preflight(request: HTTPServerRequest, handler: ServerSentEventHandler) -> Answer:
    """``OPTIONS``: a CORS preflight, answered from the allow-list."""
    if not handler.cors.enabled:
        return Answer(405, {"Allow": "GET, HEAD"})
    headers = handler.cors.preflight_headers(request.headers.get("Origin"))
    if "Access-Control-Allow-Origin" not in headers:
        return Answer(403)
    return Answer(204, headers)


def _stream_headers(
    request: HTTPServerRequest, handler: ServerSentEventHandler, *, chunked: bool
) -> list[tuple[str, str]]:
    """The headers of a stream's response: fixed, framing, CORS, the application's."""
    headers = [*STREAM_HEADERS]
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
    extra = handler.cors.headers(request.headers.get("Origin"))
    extra.update(handler.response_headers(request))
    for name, value in extra.items():
        _check_header(name, value)
        headers.append((name, value))
    return headers


def _head(request: HTTPServerRequest, handler: ServerSentEventHandler) -> bytes:
    """The response head and the first comment (in the body's framing)."""
    chunked = chunked_for(request.version)
    # The same lines as _stream_headers(), with the fixed ones joined once.
    extra = handler.cors.headers(request.headers.get("Origin"))
    extra.update(handler.response_headers(request))
    lines = [f"HTTP/1.1 200 OK\r\nDate: {_http_date()}\r\n", _fixed_lines(chunked)]
    for name, value in extra.items():
        _check_header(name, value)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1") + _first_bytes(handler.retry, chunked)


@cache
def _fixed_lines(chunked: bool) -> str:
    framing = [("Transfer-Encoding", "chunked")] if chunked else []
    return "".join(f"{name}: {value}\r\n" for name, value in [*STREAM_HEADERS, *framing])


@cache
def _first_bytes(retry: int | None, chunked: bool) -> bytes:
    """The first comment, and the handler's retry, in the body's framing."""
    first = _FIRST_COMMENT if retry is None else _FIRST_COMMENT + encode_retry(retry)
    return chunk(first) if chunked else first


def _check_header(name: str, value: str) -> None:
    if any(c in name + value for c in "\r\n\0"):
        raise ValueError(f"response header {name!r} contains CR, LF or NUL")


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value, formatted once per second, not per request."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]
