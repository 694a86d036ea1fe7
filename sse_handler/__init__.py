"""sse_handler: Server-Sent Events for Tornado.

A :class:`ServerSentEventHandler` per endpoint owns the registry of
:class:`ServerSentEventConnection` objects, each with its own bounded queue and
I/O task. Events are :class:`ServerSentEvent` objects, encoded once.
"""

from .brokers import Broker, BrokerUnavailableError
from .brokers.memory import MemoryBroker
from .connection import CloseReason, OverflowPolicy, ServerSentEventConnection
from .endpoint import FunctionEndpoint, with_sse
from .errors import ConnectionClosedError, SSEHandlerError, UnknownConnectionError
from .event import ServerSentEvent, encode_comment, encode_retry
from .handler import ServerSentEventHandler
from .parser import EventStreamParser, MessageEvent
from .routing import EventStreamRoute

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerUnavailableError",
    "CloseReason",
    "ConnectionClosedError",
    "EventStreamParser",
    "EventStreamRoute",
    "FunctionEndpoint",
    "MemoryBroker",
    "MessageEvent",
    "OverflowPolicy",
    "SSEHandlerError",
    "ServerSentEvent",
    "ServerSentEventConnection",
    "ServerSentEventHandler",
    "UnknownConnectionError",
    "encode_comment",
    "encode_retry",
    "with_sse",
]
