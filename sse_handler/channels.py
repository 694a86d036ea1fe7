"""Channel routing of one handler: local subscribers, the broker, the replay hand-off.

A :class:`ChannelRouter` keeps which local connections read which channel,
subscribes the process to a channel through the broker when its first local
subscriber arrives (and unsubscribes when the last one leaves), and hands each
event the broker delivers to the channel's subscribers -- the same bytes to
all of them (framed once for both HTTP framings).

The router owns the replay hand-off: while a connection's head and replay are
going out, its channel events are held here (:meth:`ChannelRouter.hold`);
then they are released minus those at or before the connection's cursor: the
last replayed position, or, when the replay sent nothing, the position of the
client's ``Last-Event-ID`` (:attr:`~sse_handler.brokers.Replay.after`). That
cursor stays in force afterwards, because a broker's reader may deliver late
an event the replay read from the history, or one the client had already read
from another process before its reader got to it; it is forgotten with the
connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .brokers import Broker, Delivery, Replay
from .lifecycle import CloseReason
from .tasks import in_task, spawn
from .writer import framed

if TYPE_CHECKING:
    from .connection import ServerSentEventConnection

__all__ = ["ChannelRouter"]


class ChannelRouter:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._subscribers: dict[str, set[ServerSentEventConnection]] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        # The replay hand-off: events held per connection, and replay cursors.
        self._held: dict[ServerSentEventConnection, list[Delivery]] = {}
        self._cursors: dict[ServerSentEventConnection, Any] = {}
        broker.add_listener(self.deliver)
        # Optional in the Broker protocol: a broker class whose coroutines
        # never need asyncio.current_task() says so itself (not inherited: a
        # subclass may wait differently), and a registration calls it without
        # a task (tasks.start_soon); any other broker gets one first.
        self._needs_a_task = not vars(type(broker)).get("needs_no_task", False)
        # Optional in the Broker protocol: a broker that can lose live events
        # (Redis Pub/Sub while its connection is away) says which channel.
        add_gap_listener = getattr(broker, "add_gap_listener", None)
        if add_gap_listener is not None:
            add_gap_listener(self.gap)

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
        frames = framed(delivery.frame)
        held = self._held
        cursors = self._cursors
        if not held and not cursors:
            # The common case, once per event per client: no hand-off to mind.
            for conn in tuple(subscribers):
                conn.writer.deliver(frames)
            return
        position = delivery.position
        for conn in tuple(subscribers):
            if held and conn in held:
                held[conn].append(delivery)
            elif cursors and _before(cursors.get(conn), position):
                continue
            else:
                conn.writer.deliver(frames)

    def gap(self, channel: str) -> None:
        """Live events of ``channel`` were lost: its subscribers resume by
        ``Last-Event-ID``, where the replay fills the gap or says ``reset``."""
        for conn in tuple(self._subscribers.get(channel, ())):
            conn.stop(None, None, reason=CloseReason.BROKER_ERROR)

    async def subscribe(self, conn: ServerSentEventConnection, channel: str) -> bool:
        """Subscribe ``conn``; returns whether the broker was asked (and answered)."""
        # The first local subscriber subscribes the process; the others wait
        # for that to finish, so none counts as live before the broker is.
        pending = self._subscribing.get(channel)
        asked = False
        if channel not in self._subscribers and pending is None:
            asked = True
            # Awaited here, not in a task of its own (a task per new channel
            # is a measurable part of accepting per-user channels); the
            # others wait on a future that says how it went.
            done = self._subscribing[channel] = asyncio.get_running_loop().create_future()
            try:
                if self._needs_a_task:
                    await in_task()
                await self.broker.subscribe(channel)
            except BaseException as exc:
                if isinstance(exc, Exception):
                    done.set_exception(exc)
                    done.exception()  # retrieved: nobody else may be waiting
                else:
                    done.cancel()
                raise
            else:
                done.set_result(None)
            finally:
                del self._subscribing[channel]
        elif pending is not None:
            await asyncio.shield(pending)
        if conn.close_reason is not None:
            # The connection closed while the broker subscribed: it must not
            # stay subscribed, nor keep the process subscribed for nobody.
            if channel not in self._subscribers:
                spawn(self._unsubscribe_process(channel), f"unsubscribing {channel!r}")
            return asked
        self._subscribers.setdefault(channel, set()).add(conn)
        conn.channels.add(channel)
        return asked

    def unsubscribe(self, conn: ServerSentEventConnection, channel: str) -> None:
        conn.channels.discard(channel)
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            return
        subscribers.discard(conn)
        if not subscribers:
            del self._subscribers[channel]
            spawn(self._unsubscribe_process(channel), f"unsubscribing {channel!r}")

    def forget(self, conn: ServerSentEventConnection) -> None:
        """A connection has ended: leave its channels, drop its hand-off state."""
        for channel in list(conn.channels):
            self.unsubscribe(conn, channel)
        self._held.pop(conn, None)
        self._cursors.pop(conn, None)

    async def _unsubscribe_process(self, channel: str) -> None:
        # A client that reconnects at once may have subscribed the channel
        # again meanwhile: then this process keeps reading it.
        if channel not in self._subscribers and channel not in self._subscribing:
            await self.broker.unsubscribe(channel)

    def hold(self, conn: ServerSentEventConnection) -> None:
        """Hold ``conn``'s channel events until :meth:`release_held`."""
        self._held[conn] = []

    async def replay(self, conn: ServerSentEventConnection, last_event_id: str) -> Replay:
        """Send ``conn`` what its channels had after ``last_event_id``, or say why not.

        Paced by the reader: a replay larger than the queue bound waits for the
        socket instead of overflowing.
        """
        if self._needs_a_task:
            await in_task()
        replay = await self.broker.replay(sorted(conn.channels), last_event_id)
        if replay.reset is None and replay.after is not None:
            # The client has everything up to its cursor: what a lagging
            # reader delivers of that (held now, or live later) is dropped.
            self._cursors[conn] = replay.after
        deliveries = replay.deliveries
        if deliveries:
            await conn.writer.send_paced(*(delivery.frame for delivery in deliveries))
            self._cursors[conn] = deliveries[-1].position
        return replay

    def release_held(self, conn: ServerSentEventConnection) -> None:
        """Send the events held during head and replay, minus what replay sent."""
        held = self._held.pop(conn, None) or []
        upto = self._cursors.get(conn)
        for delivery in held:
            if not conn.is_active:
                return
            if not _before(upto, delivery.position):
                conn.writer.send(delivery.frame)


def _before(upto: Any, position: Any) -> bool:
    """Was the event at ``position`` already sent by the replay (up to ``upto``)?"""
    return upto is not None and position is not None and position <= upto
