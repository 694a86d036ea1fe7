"""Accepting a request: authorization, the response head, taking the socket.

Why the socket is taken over: Tornado's per-request objects (RequestHandler,
HTTP1Connection, IOStream with its buffers and a Future per write) cost memory
and CPU on every write of a stream that lives for hours. Like
``tornado.websocket`` after the upgrade, the stream is detached once the request
is accepted; the connection writes to the socket itself.

Why the body is close-delimited: HTTP/1.1 allows a response with neither
Content-Length nor chunked framing, ended by closing the connection (RFC 9112
section 6.3, rule 8). An event stream only ever ends by a close, so chunk
framing would add bytes and work to every write and buy nothing; the head says
``Connection: close`` accordingly. Browsers' EventSource, curl and proxies
(nginx with ``proxy_buffering off``) read such a body as it arrives.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.httputil import HTTPServerRequest
from tornado.log import access_log
from tornado.web import HTTPError

from .event import encode_comment, encode_retry

if TYPE_CHECKING:
    from .handler import ServerSentEventHandler

__all__ = ["STREAM_HEADERS", "Answer", "accept_stream", "answer_preflight", "tune_socket"]

#: The fixed part of every stream's response head (DESIGN: lifecycle).
STREAM_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
    ("Connection", "close"),
)

_FIRST_COMMENT = encode_comment("ok")
_KNOWN_STATUSES = frozenset(HTTPStatus)

log = logging.getLogger("sse_handler")


async def accept_stream(
    request: HTTPServerRequest, path_kwargs: dict[str, str], handler: ServerSentEventHandler
) -> Answer | None:
    """Take one GET: turn it into a registered connection, or say how to answer it.

    An :class:`Answer` is written once Tornado has read the request's body, so
    the connection stays open for the client's next request.
    """
    if handler._loop is None:
        handler._loop = asyncio.get_running_loop()
    if handler.shutting_down or handler.over_limit(request.remote_ip):
        return _shed(request, handler, 200 if handler.shutting_down else handler.over_limit_status)
    try:
        channels = handler.channels_for(request, path_kwargs)
        allowed = handler.authorize(request)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if allowed is False:
            raise HTTPError(403)
        if allowed is not None and allowed is not True:
            channels = list(allowed)
        # An empty Last-Event-ID means "no cursor" (a browser omits it then).
        last_event_id = request.headers.get("Last-Event-ID") or _query_argument(
            request, "last_event_id"
        )
        head = _head(request, handler)
    except HTTPError as exc:
        return Answer(exc.status_code, reason=exc.reason)
    except Exception:
        log.exception("Uncaught exception while accepting %s", request.uri)
        return Answer(500)
    sock = _take_socket(request)
    if sock is None:
        return None  # the client left while authorize() ran
    tune_socket(sock, handler.dead_peer_timeout)
    try:
        conn = handler.get_connection_impl(request, handler.new_cid(), sock, last_event_id)
    except Exception:
        # Tornado no longer owns the stream: answer on the socket itself.
        log.exception("Uncaught exception in get_connection_impl")
        _refuse(sock, b"500 Internal Server Error")
        return None
    # The head carries the first comment, so a proxy that waits for a body
    # byte passes the stream on at once; a welcome event joins that write.
    handler._start_registration(conn, channels, head)
    return None


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


def _refuse(sock: socket.socket, status: bytes) -> None:
    """An error answer after Tornado has let go of the stream."""
    try:
        sock.send(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    except OSError:
        pass
    sock.close()


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
    answer_bytes = _head(request, handler) + encode_retry(retry)
    sock = _take_socket(request)
    if sock is not None:
        try:
            sock.send(answer_bytes)
        except OSError:
            pass
        sock.close()
    return None


def _extra_headers(request: HTTPServerRequest, handler: ServerSentEventHandler) -> dict[str, str]:
    headers = handler.cors.headers(request.headers.get("Origin"))
    headers.update(handler.response_headers(request))
    return headers


def answer_preflight(request: HTTPServerRequest, handler: ServerSentEventHandler) -> Answer:
    """``OPTIONS``: a CORS preflight, answered from the allow-list."""
    if not handler.cors.enabled:
        return Answer(405, {"Allow": "GET, HEAD"})
    headers = handler.cors.preflight_headers(request.headers.get("Origin"))
    if "Access-Control-Allow-Origin" not in headers:
        return Answer(403)
    return Answer(204, headers)


def _head(request: HTTPServerRequest, handler: ServerSentEventHandler) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Date: {_http_date()}"]
    lines += [f"{name}: {value}" for name, value in STREAM_HEADERS]
    for name, value in _extra_headers(request, handler).items():
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"response header {name!r} contains CR, LF or NUL")
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    first = _FIRST_COMMENT
    if handler.retry is not None:
        first += encode_retry(handler.retry)
    return head + first


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value, formatted once per second, not per request."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _take_socket(request: HTTPServerRequest) -> socket.socket | None:
    """Detach the stream from Tornado and keep a socket of our own.

    The fd is duplicated and Tornado's IOStream closed: the IOStream drops its
    buffers and its IOLoop registration, and nothing Tornado does later to it
    (a server closing its remaining connections) can touch our socket.
    """
    assert isinstance(request.connection, HTTP1Connection)
    stream = request.connection.detach()
    if stream.closed():
        return None
    sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
    stream.close()
    sock.setblocking(False)
    return sock


def tune_socket(sock: socket.socket, dead_peer_timeout: float) -> None:
    """TCP_NODELAY, and drop peers that vanished without FIN (no RST, no reply).

    TCP keepalive probes catch a dead peer on an idle stream; TCP_USER_TIMEOUT
    catches it while unacknowledged data is outstanding. Both are set from one
    timeout; the probes start at a third of it so the peer is gone well within.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return  # not TCP (a Unix socket): nothing to tune
    if not dead_peer_timeout:
        return
    idle = max(1, int(dead_peer_timeout / 3))
    interval = max(1, int(dead_peer_timeout / 9))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", int(dead_peer_timeout * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:  # Linux has all four; other systems some
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
