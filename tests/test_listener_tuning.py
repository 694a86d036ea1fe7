"""make_server() tunes its listening sockets like a stream's socket (Linux).

An accepted socket inherits its listener's options, so the direct accept
checks them with one ``getsockopt`` instead of setting seven. What must hold
whatever the path: every stream's socket ends up with exactly its own
endpoint's options -- the listener's endpoint, another endpoint with other
settings (including none: zeros take the listener's options back), and a
connection established before the listener was tuned.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from support import wait_until
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler import ServerSentEventHandler
from sse_handler.server import BoundedHTTPServer, make_server
from sse_handler.transport import SocketTransport

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="listeners are tuned on Linux only (what a socket inherits)"
)

_REQUEST = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def options(sock: socket.socket) -> dict[str, int]:
    tcp = socket.IPPROTO_TCP
    return {
        "nodelay": sock.getsockopt(tcp, socket.TCP_NODELAY),
        "notsent_lowat": sock.getsockopt(tcp, _TCP_NOTSENT_LOWAT),
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "user_timeout": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    }


def stream_socket(handler: ServerSentEventHandler) -> socket.socket:
    transport = handler.connections()[0].writer.transport
    assert isinstance(transport, SocketTransport)
    return transport.sock


@asynccontextmanager
async def listening(
    *handlers: tuple[str, ServerSentEventHandler],
) -> AsyncIterator[tuple[BoundedHTTPServer, socket.socket, int]]:
    sock, port = bind_unused_port()
    app = Application([handler.route(path) for path, handler in handlers])
    server = make_server(app)
    try:
        yield server, sock, port
    finally:
        server.stop()
        for _, handler in handlers:
            await handler.shutdown(grace=0.2)
        await server.close_all_connections()


async def test_the_listener_gets_the_first_endpoints_options_and_streams_keep_them() -> None:
    handler = ServerSentEventHandler(dead_peer_timeout=9, kernel_buffer=32768)
    async with listening(("/events", handler)) as (server, listener, port):
        untuned = options(listener)
        server.add_sockets([listener])
        assert server.direct is not None and server.direct.listener_tuning == (9, 32768)
        assert (
            options(listener)
            == {"nodelay": 1, "notsent_lowat": 32768, "keepalive": 1, "user_timeout": 9000}
            != untuned
        )
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(_REQUEST % b"/events")
        await wait_until(lambda: len(handler) == 1)
        assert options(stream_socket(handler)) == options(listener)
        assert stream_socket(handler).getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3
        client.close()


async def test_an_endpoint_with_other_settings_gets_its_own_and_zeros_take_them_back() -> None:
    first = ServerSentEventHandler(dead_peer_timeout=9, kernel_buffer=32768)
    other = ServerSentEventHandler(dead_peer_timeout=0, kernel_buffer=0)
    async with listening(("/events", first), ("/other", other)) as (server, listener, port):
        with socket.socket() as fresh:
            default_lowat = fresh.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT)
        server.add_sockets([listener])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(_REQUEST % b"/other")
        await wait_until(lambda: len(other) == 1)
        assert options(stream_socket(other)) == {
            "nodelay": 1,
            "notsent_lowat": default_lowat,
            "keepalive": 0,
            "user_timeout": 0,
        }
        client.close()


async def test_a_connection_made_before_the_listener_was_tuned_is_tuned_itself() -> None:
    handler = ServerSentEventHandler(dead_peer_timeout=9, kernel_buffer=32768)
    async with listening(("/events", handler)) as (server, listener, port):
        # Established (in the listener's backlog) before add_sockets tunes it:
        # it has none of the options to inherit.
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(_REQUEST % b"/events")
        server.add_sockets([listener])
        await wait_until(lambda: len(handler) == 1)
        assert options(stream_socket(handler)) == {
            "nodelay": 1,
            "notsent_lowat": 32768,
            "keepalive": 1,
            "user_timeout": 9000,
        }
        client.close()
