"""Channel patterns: ``*`` matches any run of characters, everything else itself.

Pure: no I/O. The patterns a credential lists (a JWT's ``channels`` claim, a
ticket's channels) say which channels its holder may read or publish to, as
Mercure's topic selectors do: ``room:*`` covers ``room:7`` and ``room:7:chat``,
``*`` covers every channel, ``news`` only ``news``.

Matching does not use regular expressions: a pattern is split at its stars
and the pieces are found in order (leftmost first, which is exact for ``*``
alone), so a pattern with many stars costs at most pattern x channel steps,
never an exponential backtrack.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ChannelPatterns", "channel_matches"]


def channel_matches(pattern: str, channel: str) -> bool:
    """Does ``pattern`` (``*`` = any run of characters, maybe empty) cover ``channel``?"""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == channel
    first, *middle, last = pieces
    if len(channel) < len(first) + len(last):
        return False
    if not channel.startswith(first) or not channel.endswith(last):
        return False
    at, end = len(first), len(channel) - len(last)
    for piece in middle:
        found = channel.find(piece, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return True


class ChannelPatterns:
    """A set of channel patterns; a channel is covered when any pattern matches it.

    ``ChannelPatterns(["room:*", "news"])``; empty, it covers nothing.
    """

    __slots__ = ("_exact", "_globs", "patterns")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        if isinstance(patterns, str | bytes):
            raise TypeError("patterns must be a collection of strings, not a single string")
        listed = tuple(patterns)
        for pattern in listed:
            if not isinstance(pattern, str):
                kind = type(pattern).__name__
                raise TypeError(f"a channel pattern must be a string, not {kind}")
        #: The patterns, as given.
        self.patterns = listed
        self._exact = frozenset(p for p in listed if "*" not in p)
        self._globs = tuple(p for p in listed if "*" in p)

    def __contains__(self, channel: object) -> bool:
        if not isinstance(channel, str):
            return False
        if channel in self._exact:
            return True
        return any(channel_matches(glob, channel) for glob in self._globs)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelPatterns) and set(self.patterns) == set(other.patterns)

    def __hash__(self) -> int:
        return hash(frozenset(self.patterns))

    def __repr__(self) -> str:
        return f"ChannelPatterns({list(self.patterns)!r})"
