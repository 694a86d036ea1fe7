"""The Redis reader's watch over its Pub/Sub connection (SilenceWatch), on
real Redis servers through TCP relays that misbehave on cue: the failures a
real network has (silence without FIN or RST, connects that wait for a
dropped SYN) cannot be had from a local Redis alone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time

import pytest
from redis_server import RedisServer
from support import wait_until

from sse_handler import ServerSentEvent
from sse_handler.brokers.redis import RedisBroker


class _PongRelay:
    """A TCP hop to Redis that goes silent both ways (no FIN, no RST) right
    after it has carried a PONG to the client, once armed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.silent_at: float | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
            while data := await src.read(65536):
                if self.silent_at is None:
                    dst.write(data)
                    if down and self.armed and b"pong" in data:
                        self.silent_at = time.monotonic()
            dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))


async def test_a_connection_that_dies_after_a_pong_fails_within_block_plus_timeout(
    redis_server: RedisServer,
) -> None:
    """docs/channels.md: a connection silent for ``block`` s is PINGed and
    fails when no answer comes within ``timeout``: at most block + timeout
    after the last thing heard, a PING's answer included."""
    relay = _PongRelay(redis_server.port)
    reader = RedisBroker(await relay.start(), block=0.1, timeout=1.0, max_backoff=0.2)
    try:
        await reader.subscribe("h")
        relay.armed = True  # the next PONG is the last byte the reader gets
        await wait_until(lambda: relay.silent_at is not None, timeout=5)
        assert relay.silent_at is not None
        await wait_until(lambda: not reader.reader_healthy, timeout=10)
        # PINGed block after the PONG, cut timeout after that (and a little
        # for the loop): not timeout + timeout.
        assert time.monotonic() - relay.silent_at < 0.1 + 1.0 + 0.3
    finally:
        await reader.close()
        await relay.close()


class _HeldRelay:
    """A TCP hop to Redis whose accepts can be held: its one-slot accept queue
    plugged, a new connection's SYN is dropped and its connect waits for the
    retransmission (about 1 s), as towards a host that is briefly away."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        self._sock.setblocking(False)
        self.url = f"redis://127.0.0.1:{self._sock.getsockname()[1]}/0"
        self._clients: list[asyncio.StreamWriter] = []
        self._plug: socket.socket | None = None
        self._accepting = asyncio.ensure_future(self._accept())
        self._carrying: set[asyncio.Future[None]] = set()

    async def hold(self) -> None:
        self._accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._accepting
        self._plug = socket.create_connection(self._sock.getsockname())

    def release(self) -> None:
        self._accepting = asyncio.ensure_future(self._accept())

    def end_clients(self) -> None:
        for writer in self._clients:
            writer.close()  # a FIN: the server side went away

    def close(self) -> None:
        self._accepting.cancel()
        self.end_clients()
        if self._plug is not None:
            self._plug.close()
        self._sock.close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, peer = await loop.sock_accept(self._sock)
            if self._plug is not None and peer == self._plug.getsockname():
                conn.close()
                continue
            carrying = asyncio.ensure_future(self._carry(conn))
            self._carrying.add(carrying)
            carrying.add_done_callback(self._carrying.discard)

    async def _carry(self, conn: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=conn)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._clients.append(writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
            dst.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_ping_while_redis_py_reconnects_the_reader_logs_no_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The Pub/Sub connection ends while the reader is quiet; redis-py's
    read reconnects it in place (its failure callback) before it raises,
    and that connect takes a while. The watch's PING, in a task of its own,
    must not connect the same redis-py Connection concurrently."""
    caplog.set_level(logging.WARNING)
    relay = _HeldRelay(redis_server.port)
    reader = RedisBroker(relay.url, block=0.2, timeout=3.0, max_backoff=0.2)
    publisher = RedisBroker(redis_server.url)
    got: list[bytes] = []
    reader.add_listener(lambda delivery: got.append(delivery.frame))
    try:
        await reader.subscribe("q")
        await relay.hold()
        relay.end_clients()
        # Quiet for longer than block while the connect waits: the watch
        # PINGs meanwhile (what is tested).
        await asyncio.sleep(0.6)
        relay.release()
        await publisher.publish("q", ServerSentEvent(data="after"))
        # The connects go on once the SYNs are sent again; the reader then
        # delivers what it missed.
        await wait_until(lambda: len(got) == 1, timeout=15)
        assert got[0].endswith(b"data: after\n\n")
        # Long enough for a connect that a PING would have started to run
        # its course (its SYN sent again after 1 s): what is tested is that
        # none runs beside the reader's.
        await asyncio.sleep(2.0)
    finally:
        await reader.close()
        await publisher.close()
        relay.close()
    gc.collect()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert reader.reader_restarts == 0
