"""Ending a connection with a final answer, without a reset.

Closing a socket that still has unread input makes the kernel send a reset,
which can destroy the answer before the client has read it; so after a final
answer the write side is shut (the client sees the answer end) and what the
client still sends is read and dropped for a while before the close.
"""

from __future__ import annotations

import asyncio
import socket

from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError

from .tasks import spawn

__all__ = ["LINGER_BYTES", "LINGER_SECONDS", "answer_and_close", "declares_body", "shut_write"]


#: After a final answer, what the client still sends is read and dropped for
#: up to this long (and this much) before the socket closes: closing with
#: unread input makes the kernel send a reset, which can destroy the answer
#: before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


def declares_body(headers: httputil.HTTPHeaders) -> bool:
    """Does a request with these headers carry a body (RFC 9112 section 6.3)?"""
    if "Transfer-Encoding" in headers:
        return True
    return headers.get("Content-Length", "0").strip() not in ("", "0")


def answer_and_close(stream: IOStream, answer: bytes) -> None:
    """Write a final answer on a stream Tornado no longer reads, then close it.

    The write side is shut at once (the client sees the end of the answer);
    what the client still sends is read and dropped for up to
    ``LINGER_SECONDS`` so that the close is not a reset.
    """
    spawn(_linger(stream, answer), "an answer before a close")


async def _linger(stream: IOStream, answer: bytes) -> None:
    try:
        async with asyncio.timeout(LINGER_SECONDS):
            await stream.write(answer)
            shut_write(stream)
            dropped = 0
            while dropped < LINGER_BYTES:
                dropped += len(await stream.read_bytes(65536, partial=True))
    except (StreamClosedError, TimeoutError, OSError):
        pass
    finally:
        stream.close()


def shut_write(stream: IOStream) -> None:
    """Send FIN after the answer; reading goes on. The plain socket's method,
    also on a TLS socket, whose own ``shutdown`` would end TLS reads too."""
    if stream.closed():
        return
    try:
        socket.socket.shutdown(stream.socket, socket.SHUT_WR)
    except OSError:
        pass
