"""sse_handler.listener: a Listener's accept() gives what socket.accept() gives."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from tornado.netutil import bind_unix_socket
from tornado.testing import bind_unused_port
from tornado.web import Application

from sse_handler.listener import Listener, quick_accept
from sse_handler.server import make_server


def tcp() -> tuple[socket.socket, Callable[[], socket.socket]]:
    sock, port = bind_unused_port()
    return sock, lambda: socket.create_connection(("127.0.0.1", port))


@contextmanager
def unix() -> Iterator[tuple[socket.socket, Callable[[], socket.socket]]]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "s")
        sock = bind_unix_socket(path)

        def connect() -> socket.socket:
            client = socket.socket(socket.AF_UNIX)
            client.connect(path)
            return client

        yield sock, connect


def described(sock: socket.socket) -> tuple[object, ...]:
    return (type(sock), sock.family, sock.type, sock.proto, sock.gettimeout(), sock.getblocking())


@pytest.mark.parametrize("timeout", [None, 0.0, 2.0], ids=["blocking", "non-blocking", "timeout"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_accept_gives_the_socket_the_standard_accept_gives(
    kind: str, timeout: float | None
) -> None:
    accepted: dict[str, tuple[object, ...]] = {}
    for name in ("standard", "listener"):
        with unix() if kind == "unix" else _nothing(tcp()) as (sock, connect):
            sock.settimeout(timeout)
            if name == "listener":
                quick_accept(sock)
                assert type(sock) is Listener
            client = connect()
            try:
                conn, address = sock.accept()
                accepted[name] = (*described(conn), type(address))
                conn.close()
            finally:
                client.close()
                sock.close()
    assert accepted["listener"] == accepted["standard"]


def test_a_default_timeout_is_applied_as_the_standard_accept_applies_it() -> None:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.0)
    try:
        test_accept_gives_the_socket_the_standard_accept_gives("tcp", 2.0)
    finally:
        socket.setdefaulttimeout(previous)


def test_the_servers_listeners_become_listeners_and_subclasses_are_left_alone() -> None:
    class Own(socket.socket):
        pass

    plain, _ = bind_unused_port()
    own = Own(socket.AF_INET, socket.SOCK_STREAM)
    own.bind(("127.0.0.1", 0))
    own.listen()
    server = make_server(Application([]))
    server.add_sockets([plain, own])
    try:
        assert type(plain) is Listener
        assert type(own) is Own
    finally:
        server.stop()
    untouched, _ = bind_unused_port()
    tornados = make_server(Application([]), direct_accept=False)
    tornados.add_sockets([untouched])
    try:
        assert type(untouched) is socket.socket
    finally:
        tornados.stop()


@contextmanager
def _nothing(
    value: tuple[socket.socket, Callable[[], socket.socket]],
) -> Iterator[tuple[socket.socket, Callable[[], socket.socket]]]:
    yield value
