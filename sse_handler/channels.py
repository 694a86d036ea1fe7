"""Channel routing of one handler: local subscribers, the broker, the replay hand-off.

A :class:`ChannelRouter` keeps which local connections read which channel,
subscribes the process to a channel through the broker when its first local
subscriber arrives (and unsubscribes when the last one leaves), and hands each
event the broker delivers to the channel's subscribers -- the same bytes to
all of them.

The replay hand-off: while a connection's head and replay are going out, its
channel events are held (``conn._held``); then they are released minus those at
or before the last replayed position. That check stays in force afterwards,
because a broker's reader may still deliver an event it is catching up on
after replay has read it from the history.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .brokers import Broker, Delivery, Replay

if TYPE_CHECKING:
    from .connection import ServerSentEventConnection

__all__ = ["ChannelRouter"]

log = logging.getLogger("sse_handler")


class ChannelRouter:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._subscribers: dict[str, set[ServerSentEventConnection]] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        broker.add_listener(self.deliver)

    def subscribers(self, channel: str) -> list[ServerSentEventConnection]:
        return list(self._subscribers.get(channel, ()))

    def count(self, channel: str) -> int:
        """How many local connections read ``channel``."""
        subscribers = self._subscribers.get(channel)
        return len(subscribers) if subscribers else 0

    def deliver(self, delivery: Delivery) -> None:
        """The broker's listener: one channel event to its local subscribers."""
        subscribers = self._subscribers.get(delivery.channel)
        if not subscribers:
            return
        frame = delivery.frame
        for conn in tuple(subscribers):
            if conn._held is not None:
                conn._held.append(delivery)
            elif not _already_replayed(conn, delivery):
                conn._deliver(frame)

    async def subscribe(self, conn: ServerSentEventConnection, channel: str) -> None:
        # The first local subscriber subscribes the process; the others wait
        # for that to finish, so none counts as live before the broker is.
        pending = self._subscribing.get(channel)
        if channel not in self._subscribers and pending is None:
            pending = self._subscribing[channel] = asyncio.ensure_future(
                self.broker.subscribe(channel)
            )
            try:
                await pending
            finally:
                del self._subscribing[channel]
        elif pending is not None:
            await asyncio.shield(pending)
        self._subscribers.setdefault(channel, set()).add(conn)
        conn.channels.add(channel)

    def unsubscribe(self, conn: ServerSentEventConnection, channel: str) -> None:
        conn.channels.discard(channel)
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            return
        subscribers.discard(conn)
        if not subscribers:
            del self._subscribers[channel]
            task = asyncio.ensure_future(self._unsubscribe_process(channel))
            task.add_done_callback(_log_failure)

    async def _unsubscribe_process(self, channel: str) -> None:
        # A client that reconnects at once may have subscribed the channel
        # again meanwhile: then this process keeps reading it.
        if channel not in self._subscribers and channel not in self._subscribing:
            await self.broker.unsubscribe(channel)

    async def replay(self, conn: ServerSentEventConnection, last_event_id: str) -> Replay:
        """Send ``conn`` what its channels had after ``last_event_id``, or say why not."""
        replay = await self.broker.replay(sorted(conn.channels), last_event_id)
        for delivery in replay.deliveries:
            conn.send_encoded(delivery.frame)
            conn._replayed_upto = delivery.position
        return replay

    def release_held(self, conn: ServerSentEventConnection) -> None:
        """Send the events held during head and replay, minus what replay sent."""
        held, conn._held = conn._held or [], None
        for delivery in held:
            if not conn.is_active:
                return
            if not _already_replayed(conn, delivery):
                conn.send_encoded(delivery.frame)


def _already_replayed(conn: ServerSentEventConnection, delivery: Delivery) -> bool:
    upto = conn._replayed_upto
    return upto is not None and delivery.position is not None and delivery.position <= upto


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Broker operation failed", exc_info=task.exception())
