"""sse_handler: Server-Sent Events for Tornado.

A :class:`ServerSentEventHandler` per endpoint owns the registry of
:class:`ServerSentEventConnection` objects, each with its own bounded queue and
I/O task. Events are :class:`ServerSentEvent` objects, encoded once.
"""

from .brokers import Broker, BrokerUnavailableError
from .brokers.memory import MemoryBroker
from .connection import ConnectionStats, ServerSentEventConnection
from .endpoint import FunctionEndpoint, with_sse
from .errors import ConnectionClosedError, SSEHandlerError, UnknownConnectionError
from .event import EventFields, ServerSentEvent, encode_comment, encode_retry
from .grant import Grant
from .handler import HandlerSettings, ServerSentEventHandler
from .lifecycle import CloseReason, OverflowPolicy, State
from .parser import EventStreamParser, MessageEvent
from .patterns import ChannelPatterns
from .routing import EventStreamRoute

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerUnavailableError",
    "ChannelPatterns",
    "CloseReason",
    "ConnectionClosedError",
    "ConnectionStats",
    "EventFields",
    "EventStreamParser",
    "EventStreamRoute",
    "FunctionEndpoint",
    "Grant",
    "HandlerSettings",
    "MemoryBroker",
    "MessageEvent",
    "OverflowPolicy",
    "SSEHandlerError",
    "ServerSentEvent",
    "ServerSentEventConnection",
    "ServerSentEventHandler",
    "State",
    "UnknownConnectionError",
    "encode_comment",
    "encode_retry",
    "with_sse",
]
