"""The page's stream: every channel event as one unnamed ``message`` in a JSON envelope.

An ``EventSource`` hands a named event only to the listeners registered for
that name, so a page cannot show an event whose name it has never seen. The
demo page therefore reads ``/page/events`` instead of ``/events``: the same
channels (``?channel=NAME``, repeated), the same ids (so ``Last-Event-ID``
resumes, from the same history), but each channel event re-encoded as::

    id: <the event's id>
    data: {"channel":"<channel>","event":"<name>","id":"<id>","data":"<data>"}

The envelope is read from the frame ``/events`` sends for that event (parsed
as a browser parses it), once per event per process; a ``retry:`` field is
kept as a field. ``/events`` itself stays the library's wire: ``curl -N
/events`` shows the events as published. The connection's own events --
``welcome``, ``close`` (admin stop), ``shutdown``, ``reset`` -- are not
channel events and keep their names on both streams.

Two handlers read one broker here, so the broker is shared through
:class:`SharedBroker`: each handler gets a :meth:`~SharedBroker.view`, and a
channel stays subscribed while either handler has a reader for it (a
handler's router unsubscribes the process when its own last reader leaves).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from collections.abc import Callable, Collection
from typing import Any

from ..brokers import Broker, Delivery, Listener, Replay
from ..event import ServerSentEvent
from ..parser import EventStreamParser

__all__ = ["BrokerView", "SharedBroker", "envelope"]

Transform = Callable[[Delivery], Delivery]


def envelope(delivery: Delivery) -> Delivery:
    """``delivery`` as the page's stream sends it: an unnamed event, the same id.

    A frame that dispatches no event (no ``data``) is left as it is: a browser
    would dispatch nothing for it on either stream.
    """
    events = EventStreamParser().feed(delivery.frame)
    if not events:
        return delivery
    [event] = events
    data = {"channel": delivery.channel, "event": event.event, "id": delivery.id}
    data["data"] = event.data
    frame = ServerSentEvent(
        data=json.dumps(data, ensure_ascii=False, separators=(",", ":")),
        id=delivery.id,
        retry=event.retry,
    ).encode()
    return Delivery(delivery.channel, delivery.id, delivery.position, frame)


class SharedBroker:
    """One broker under several handlers; each handler is given a :meth:`view`.

    The broker is subscribed to a channel while any view is, and unsubscribed
    when the last view leaves it. Closing is the owner's: the views do not
    close the broker.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._views_reading: collections.Counter[str] = collections.Counter()
        # Subscribing and unsubscribing one at a time per channel: a channel's
        # first view must not count as live before the broker is, nor its last
        # view's unsubscribe overtake a new subscribe. Different channels go
        # on at once (a reconnect storm subscribes thousands).
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: collections.Counter[str] = collections.Counter()

    def views_reading(self, channel: str) -> int:
        """How many views are subscribed to ``channel``."""
        return self._views_reading[channel]

    def view(self, transform: Transform | None = None) -> BrokerView:
        """A broker for one handler; ``transform`` rewrites what it delivers and replays."""
        return BrokerView(self, transform)

    def _lock(self, channel: str) -> asyncio.Lock:
        """The lock of ``channel``, for one more user; :meth:`_unlock` after.

        (Not an async context manager: a per-user channel takes it once per
        stream, and contextlib's generator machinery showed in the profile
        of accepting such streams.)"""
        lock = self._locks.get(channel)
        if lock is None:
            lock = self._locks[channel] = asyncio.Lock()
        self._lock_users[channel] += 1
        return lock

    def _unlock(self, channel: str) -> None:
        self._lock_users[channel] -= 1
        if not self._lock_users[channel]:
            del self._lock_users[channel]
            del self._locks[channel]

    async def _subscribe(self, channel: str) -> None:
        try:
            async with self._lock(channel):
                if not self._views_reading[channel]:
                    await self.broker.subscribe(channel)
                self._views_reading[channel] += 1
        finally:
            self._unlock(channel)

    async def _unsubscribe(self, channel: str) -> None:
        try:
            async with self._lock(channel):
                self._views_reading[channel] -= 1
                if not self._views_reading[channel]:
                    del self._views_reading[channel]
                    await self.broker.unsubscribe(channel)
        finally:
            self._unlock(channel)


class BrokerView:
    """A :class:`~sse_handler.brokers.Broker` for one handler, over a :class:`SharedBroker`.

    Its listeners get the events of the channels this view subscribed,
    through ``transform`` when there is one. Any other attribute (the reader
    health that :mod:`sse_handler.metrics` reads) is the shared broker's.
    """

    def __init__(self, shared: SharedBroker, transform: Transform | None) -> None:
        self._shared = shared
        self._transform = transform
        self._channels: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not set yet (copy, pickle): not the broker's either
            raise AttributeError(name)
        return getattr(self._shared.broker, name)

    def add_listener(self, listener: Listener) -> None:
        channels = self._channels
        transform = self._transform

        def deliver(delivery: Delivery) -> None:
            if delivery.channel in channels:
                listener(transform(delivery) if transform else delivery)

        self._shared.broker.add_listener(deliver)

    async def publish(self, channel: str, event: ServerSentEvent) -> str:
        return await self._shared.broker.publish(channel, event)

    async def subscribe(self, channel: str) -> None:
        if channel not in self._channels:
            await self._shared._subscribe(channel)
            self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            await self._shared._unsubscribe(channel)

    async def replay(self, channels: Collection[str], last_event_id: str) -> Replay:
        replay = await self._shared.broker.replay(channels, last_event_id)
        if self._transform is not None:
            # A new Replay: a RedisBroker answers clients that asked for the
            # same channels and cursor with one object, whichever view asked.
            transform = self._transform
            return dataclasses.replace(
                replay, deliveries=[transform(d) for d in replay.deliveries]
            )
        return replay

    def position(self, event_id: str) -> Any | None:
        return self._shared.broker.position(event_id)

    async def close(self) -> None:
        """Nothing: the :class:`SharedBroker`'s owner closes the broker."""
