"""sse_handler.poller: the streams' sockets watched through one epoll (and the
loop's add_reader where there is none), on real socket pairs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from support import serve, wait_until

from sse_handler import ServerSentEventHandler
from sse_handler.poller import EpollPoller, LoopPoller, Poller, poller_for

Make = Callable[[asyncio.AbstractEventLoop], Poller]
Pairs = Callable[[], tuple[socket.socket, socket.socket]]
POLLERS = [pytest.param(EpollPoller, id="epoll"), pytest.param(LoopPoller, id="loop")]


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made: list[socket.socket] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        made.extend((a, b))
        return a, b

    yield pair
    for sock in made:
        sock.close()


def _epolls() -> int:
    """This process's open epoll descriptors."""
    return sum(
        os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]"
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


@pytest.mark.parametrize("make", POLLERS)
async def test_readable_and_writable_are_called_back_until_removed(
    make: Make, pairs: Pairs
) -> None:
    poller = make(asyncio.get_running_loop())
    ours, theirs = pairs()
    readable = asyncio.Event()
    writable: list[int] = []
    poller.add(ours.fileno(), readable.set)
    theirs.send(b"x")
    await asyncio.wait_for(readable.wait(), 5)
    assert ours.recv(10) == b"x"
    # Writable while asked (an empty buffer is writable at once), then not.
    enough = asyncio.Event()

    def on_writable() -> None:
        writable.append(1)
        if len(writable) >= 3:
            enough.set()

    poller.want_writes(ours.fileno(), on_writable)
    await asyncio.wait_for(enough.wait(), 5)
    poller.want_writes(ours.fileno(), None)
    seen = len(writable)
    await asyncio.sleep(0.05)
    assert len(writable) == seen
    # Removed: nothing more, even with data and EOF pending.
    readable.clear()
    poller.remove(ours.fileno())
    theirs.send(b"y")
    theirs.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.05)
    assert not readable.is_set()


@pytest.mark.parametrize("make", POLLERS)
async def test_a_peer_that_leaves_makes_the_socket_readable(make: Make, pairs: Pairs) -> None:
    poller = make(asyncio.get_running_loop())
    ours, theirs = pairs()
    gone = asyncio.Event()
    poller.add(ours.fileno(), gone.set)
    theirs.close()
    await asyncio.wait_for(gone.wait(), 5)
    assert ours.recv(10) == b""
    poller.remove(ours.fileno())


async def test_the_epoll_is_open_only_while_it_watches(pairs: Pairs) -> None:
    before = _epolls()
    poller = EpollPoller(asyncio.get_running_loop())
    sockets = [pairs()[0] for _ in range(3)]
    for sock in sockets:
        poller.add(sock.fileno(), lambda: None)
    assert (len(poller), _epolls()) == (3, before + 1)
    for sock in sockets:
        poller.remove(sock.fileno())
    assert (len(poller), _epolls()) == (0, before)
    poller.remove(sockets[0].fileno())  # twice: nothing happens
    # And again from nothing.
    ready = asyncio.Event()
    ours, theirs = pairs()
    poller.add(ours.fileno(), ready.set)
    theirs.send(b"x")
    await asyncio.wait_for(ready.wait(), 5)
    poller.remove(ours.fileno())
    assert _epolls() == before


async def test_a_socket_closed_by_an_earlier_callback_of_the_batch_is_not_called(
    pairs: Pairs,
) -> None:
    poller = EpollPoller(asyncio.get_running_loop())
    (a, a_peer), (b, b_peer) = pairs(), pairs()
    called: list[str] = []
    done = asyncio.Event()

    def closes_the_other(mine: str, other: socket.socket) -> Callable[[], None]:
        def callback() -> None:
            called.append(mine)
            poller.remove(other.fileno())
            poller.remove(a.fileno() if other is b else b.fileno())
            done.set()

        return callback

    poller.add(a.fileno(), closes_the_other("a", b))
    poller.add(b.fileno(), closes_the_other("b", a))
    # Both readable before the loop looks: one batch holds both.
    a_peer.send(b"x")
    b_peer.send(b"x")
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0.05)
    assert len(called) == 1


async def test_a_callback_that_raises_is_logged_and_the_others_still_run(
    pairs: Pairs,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poller = EpollPoller(asyncio.get_running_loop())
    (a, a_peer), (b, b_peer) = pairs(), pairs()
    ran: list[str] = []
    both = asyncio.Event()

    def broken() -> None:
        ran.append("broken")
        poller.remove(a.fileno())
        if len(ran) == 2:
            both.set()
        raise RuntimeError("callback")

    def fine() -> None:
        ran.append("fine")
        poller.remove(b.fileno())
        if len(ran) == 2:
            both.set()

    poller.add(a.fileno(), broken)
    poller.add(b.fileno(), fine)
    with caplog.at_level(logging.ERROR, logger="sse_handler"):
        a_peer.send(b"x")
        b_peer.send(b"x")
        await asyncio.wait_for(both.wait(), 5)
    assert sorted(ran) == ["broken", "fine"]
    assert "Uncaught exception in a stream's socket callback" in caplog.text


async def test_streams_are_watched_by_the_loops_poller_and_leave_it() -> None:
    handler = ServerSentEventHandler()
    poller = poller_for(asyncio.get_running_loop())
    assert isinstance(poller, EpollPoller)
    async with serve([handler.route("/events")], handler) as server:
        before = len(poller)
        clients = [await server.stream() for _ in range(20)]
        await wait_until(lambda: len(handler) == 20)
        assert len(poller) == before + 20
        for client in clients:
            client.close()
        await wait_until(lambda: len(handler) == 0)
        assert len(poller) == before
