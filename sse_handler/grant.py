"""What a credential allows: :class:`Grant`, which ``authorize()`` may return.

Pure: no I/O. A grant names its holder (``subject``), the channels it may read
and publish to (:class:`~sse_handler.patterns.ChannelPatterns`), and when it
ends (``expires_at``, epoch seconds). Returned by ``authorize()``, it makes the
handler check every channel the request asks for against ``read`` (403 for one
outside it), give the connection its ``subject``, and stop the stream with
``event: auth_expired`` when ``expires_at`` passes (docs/authentication.md).
The kit in :mod:`sse_handler.auth` builds grants from tickets and JWTs; an
application's own ``authorize()`` may build them too.
"""

from __future__ import annotations

from collections.abc import Iterable

from .patterns import ChannelPatterns

__all__ = ["Grant"]


class Grant:
    """Who holds a credential, which channels it covers, and until when.

    ``Grant(["room:*"], subject="alice", expires_at=time.time() + 60)``.
    ``read`` and ``publish`` take patterns (``*`` = any run of characters).
    """

    __slots__ = ("expires_at", "publish", "read", "subject")

    def __init__(
        self,
        read: Iterable[str] | ChannelPatterns,
        *,
        subject: str | None = None,
        publish: Iterable[str] | ChannelPatterns = (),
        expires_at: float | None = None,
    ) -> None:
        #: The channels the holder may read.
        self.read = read if isinstance(read, ChannelPatterns) else ChannelPatterns(read)
        #: The channels the holder may publish to (for an application's publish endpoint).
        self.publish = (
            publish if isinstance(publish, ChannelPatterns) else ChannelPatterns(publish)
        )
        #: Who holds it (a user id), or ``None``.
        self.subject = subject
        #: When it ends, in epoch seconds (``time.time()``); ``None``: never.
        self.expires_at = expires_at

    def may_read(self, channel: str) -> bool:
        return channel in self.read

    def may_publish(self, channel: str) -> bool:
        return channel in self.publish

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grant):
            return NotImplemented
        return (self.read, self.publish, self.subject, self.expires_at) == (
            other.read,
            other.publish,
            other.subject,
            other.expires_at,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Grant(read={list(self.read.patterns)!r}, subject={self.subject!r}, "
            f"publish={list(self.publish.patterns)!r}, expires_at={self.expires_at!r})"
        )
