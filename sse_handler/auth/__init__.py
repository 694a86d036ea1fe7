"""Authentication for event streams, built on ``authorize()``.

* :class:`StreamAuth`: what ``authorize()`` calls; a ticket or a token in, a
  :class:`~sse_handler.grant.Grant` out (docs/authentication.md).
* :mod:`~sse_handler.auth.tickets`: single-use stream tickets, in memory or Redis.
* :mod:`~sse_handler.auth.jwt`: :class:`JWTVerifier` (needs the ``jwt``
  extra, PyJWT, imported only when a verifier is created).

Dependencies point one way: this package uses the core's types (Grant,
CorsPolicy); the core knows nothing of tickets or JWTs.
"""

from .jwt import InvalidToken, JWTVerifier, TokenKeysUnavailable
from .stream_auth import StreamAuth, same_site
from .tickets import MemoryTickets, PeekableTicketStore, RedisTickets, TicketStore, tickets_for

__all__ = [
    "InvalidToken",
    "JWTVerifier",
    "MemoryTickets",
    "PeekableTicketStore",
    "RedisTickets",
    "StreamAuth",
    "TicketStore",
    "TokenKeysUnavailable",
    "same_site",
    "tickets_for",
]
