"""The floor: what accepting a stream costs in Python itself, with no framework.

``python floor_app.py --port P``. Plain asyncio and sockets on the same Python
as sse_handler: a new connection is accepted, its request head read with one
``recv`` and matched by one regular expression; ``GET /events`` gets the same
head, ``: ok`` comment and welcome event as sse_handler's demo in one
``send``, and its socket goes into one epoll (as ``sse_handler.poller`` does);
``POST /publish`` sends the body as one event to every stream. Nothing else:
no routing table, no request object, no hooks, no queue (a stream whose
socket does not take a whole event at once is closed), no keep-alive
timer. It is not a server to use, only the cost a framework adds to.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import select
import socket

# sse_handler's stream head, less its Date line (formatted once a second there).
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: close\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
REQUEST = re.compile(
    rb"(GET|POST) (/[^ ]*) HTTP/1\.[01]\r\n((?:[^\r\n]+\r\n)*)\r\n", re.IGNORECASE
)
LENGTH = re.compile(rb"(?im)^content-length:[ \t]*([0-9]+)[ \t]*\r$")
CLOSE = re.compile(rb"(?im)^connection:[ \t]*close[ \t]*\r$")
WATCH = select.EPOLLIN | select.EPOLLRDHUP


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Floor:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.epoll = select.epoll()
        self.streams: dict[int, socket.socket] = {}
        # Connections whose request is not complete yet, with what came so far.
        self.reading: dict[int, tuple[socket.socket, bytes]] = {}
        self.count = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.listener.fileno(), self.accept)
        loop.add_reader(self.epoll.fileno(), self.ready)

    def accept(self) -> None:
        for _ in range(128):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.epoll.register(sock.fileno(), WATCH)
            self.read(sock, b"")

    def ready(self) -> None:
        for fd, _ in self.epoll.poll(0):
            pending = self.reading.get(fd)
            if pending is not None:
                self.read(*pending)
                continue
            stream = self.streams.pop(fd, None)
            if stream is not None:
                self.close(stream)

    def read(self, sock: socket.socket, got: bytes) -> None:
        fd = sock.fileno()
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            self.reading[fd] = (sock, got)
            return
        except OSError:
            data = b""
        if not data:
            self.reading.pop(fd, None)
            self.close(sock)
            return
        got += data
        while True:
            request = REQUEST.match(got)
            if request is None:
                self.reading[fd] = (sock, got)
                return
            method, path, fields = request.groups()
            length = LENGTH.search(fields)
            body_end = request.end() + (int(length.group(1)) if length else 0)
            if len(got) < body_end:
                self.reading[fd] = (sock, got)
                return
            body, got = got[request.end() : body_end], got[body_end:]
            if method.upper() == b"GET" and path.split(b"?")[0] == b"/events":
                self.reading.pop(fd, None)
                self.open_stream(sock)
                return
            self.answer(sock, method.upper(), path, body)
            if CLOSE.search(fields):
                self.reading.pop(fd, None)
                self.close(sock)
                return

    def open_stream(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.count += 1
        welcome = b'event: welcome\ndata: {"connection_id":"f%d"}\n\n' % self.count
        try:
            sock.send(HEAD + chunk(b": ok\n\n" + welcome))
        except OSError:
            self.close(sock)
            return
        self.streams[sock.fileno()] = sock

    def answer(self, sock: socket.socket, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"POST" and path.split(b"?")[0] == b"/publish":
            frame = chunk(b"data: " + body + b"\n\n")
            for fd, stream in list(self.streams.items()):
                try:
                    sent = stream.send(frame)
                except OSError:
                    sent = -1
                if sent != len(frame):
                    del self.streams[fd]
                    self.close(stream)
            reply = b'{"delivered_to": %d}' % len(self.streams)
            status = b"200 OK"
        else:
            reply, status = b"not found", b"404 Not Found"
        try:
            sock.send(b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(reply), reply))
        except OSError:
            self.reading.pop(sock.fileno(), None)
            self.close(sock)

    def close(self, sock: socket.socket) -> None:
        try:
            self.epoll.unregister(sock.fileno())
        except (OSError, ValueError):
            pass
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)  # as the demo's
    listener.setblocking(False)
    loop = asyncio.new_event_loop()
    Floor(listener).start(loop)
    loop.run_forever()


if __name__ == "__main__":
    main()
