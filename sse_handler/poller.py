"""Readiness of the streams' sockets: one epoll of their own, where there is one.

Why: registering a socket with the asyncio loop (``add_reader``) builds a
``Handle`` and a ``SelectorKey`` and goes through the selector's Python
bookkeeping, about a fifth of the CPU of an accepted stream, and again when
it closes (docs/benchmarks.md). Streams are many and quiet: a stream's
socket is readable only when its client leaves (or sends what is discarded),
and writability is wanted only while the kernel's buffer is full. So on
Linux they share one ``select.epoll``, itself one reader of the loop; a
stream's registration is then one ``epoll_ctl`` and a dict entry. Elsewhere
:class:`LoopPoller` uses the loop's ``add_reader`` / ``add_writer``.

A poller serves one loop (:func:`poller_for`); its epoll is open while it
watches at least one socket. A socket must be removed before it is closed:
the kernel may give its number to the next socket accepted.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable
from typing import Protocol

from .tasks import log

__all__ = ["EpollPoller", "LoopPoller", "Poller", "poller_for"]

Callback = Callable[[], None]


class Poller(Protocol):
    """Calls back when a watched socket is readable, or writable when asked."""

    def add(self, fd: int, on_readable: Callback) -> None:
        """Watch ``fd`` for readability (data, EOF or an error)."""

    def want_writes(self, fd: int, on_writable: Callback | None) -> None:
        """Call ``on_writable`` while ``fd`` is writable; ``None`` stops it."""

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""


class LoopPoller:
    """The loop's own ``add_reader`` / ``add_writer``: where there is no epoll."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def add(self, fd: int, on_readable: Callback) -> None:
        self.loop.add_reader(fd, on_readable)

    def want_writes(self, fd: int, on_writable: Callback | None) -> None:
        if on_writable is None:
            self.loop.remove_writer(fd)
        else:
            self.loop.add_writer(fd, on_writable)

    def remove(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)


_HAS_EPOLL = hasattr(select, "epoll")
_EPOLLIN, _EPOLLOUT, _EPOLLRDHUP, _EPOLLERR, _EPOLLHUP = (
    getattr(select, name, 0)
    for name in ("EPOLLIN", "EPOLLOUT", "EPOLLRDHUP", "EPOLLERR", "EPOLLHUP")
)
# Readable: data, EOF (EPOLLRDHUP: the peer shut down its side), an error.
_READ_EVENTS = _EPOLLIN | _EPOLLRDHUP | _EPOLLERR | _EPOLLHUP
# An error or hang-up also wakes a writer, which then sees it on its send.
_WRITE_EVENTS = _EPOLLOUT | _EPOLLERR | _EPOLLHUP
_WATCH = _EPOLLIN | _EPOLLRDHUP
_WATCH_WRITES = _WATCH | _EPOLLOUT


class EpollPoller:
    """The streams' sockets in one epoll, which the loop watches as one reader."""

    __slots__ = ("_epoll", "_readers", "_writers", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll: select.epoll | None = None
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}

    def __len__(self) -> int:
        """How many sockets it watches."""
        return len(self._readers)

    def add(self, fd: int, on_readable: Callback) -> None:
        epoll = self._epoll
        if epoll is None:
            epoll = self._epoll = select.epoll()
            self.loop.add_reader(epoll.fileno(), self._dispatch)
        epoll.register(fd, _WATCH)
        self._readers[fd] = on_readable

    def want_writes(self, fd: int, on_writable: Callback | None) -> None:
        if self._epoll is None or fd not in self._readers:
            return
        if on_writable is None:
            if self._writers.pop(fd, None) is not None:
                self._epoll.modify(fd, _WATCH)
            return
        if fd not in self._writers:
            self._epoll.modify(fd, _WATCH_WRITES)
        self._writers[fd] = on_writable

    def remove(self, fd: int) -> None:
        if self._readers.pop(fd, None) is None or self._epoll is None:
            return
        self._writers.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll
        if not self._readers:
            # Nothing left to watch: the loop forgets the epoll, and the epoll
            # is closed (a loop that closes later leaves no descriptor open).
            self.loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _dispatch(self) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        try:
            ready = epoll.poll(0)
        except OSError:
            return  # closed under us by a callback of this loop turn
        for fd, events in ready:
            # Looked up per event: a callback earlier in this batch may have
            # removed (closed) another socket of the batch.
            if events & _WRITE_EVENTS:
                on_writable = self._writers.get(fd)
                if on_writable is not None:
                    _run(on_writable)
            if events & _READ_EVENTS:
                on_readable = self._readers.get(fd)
                if on_readable is not None:
                    _run(on_readable)


def _run(callback: Callback) -> None:
    # As the loop runs each reader: one that raises is logged, the others run.
    try:
        callback()
    except Exception:
        log.exception("Uncaught exception in a stream's socket callback %r", callback)


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = (
    weakref.WeakKeyDictionary()
)


def poller_for(loop: asyncio.AbstractEventLoop) -> Poller:
    """The poller of ``loop``'s stream sockets (made on first use)."""
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = EpollPoller(loop) if _HAS_EPOLL else LoopPoller(loop)
    return poller
