"""What the Redis broker writes in Redis, and how it reads it back.

Keys (:func:`channel_key`), the groups of a Redis Cluster (:func:`by_prefix`),
event ids (``<ms>-<n>``: :func:`position`, :func:`after`, :func:`entry_id`),
the fields of a stream entry (:func:`fields`, :func:`is_frame`), and the two
Lua scripts: :data:`PUBLISH_SCRIPT` (one id of the sequence, the entry, the
Pub/Sub message) and :data:`READ_SCRIPT` (one atomic snapshot for replay and
catch-up). The layout itself is described in :mod:`sse_handler.brokers.redis`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "MAX_PART",
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "Position",
    "after",
    "by_prefix",
    "channel_key",
    "entry_id",
    "escaped",
    "fields",
    "hash_tag",
    "is_frame",
    "position",
    "text",
]

Position = tuple[int, int]

#: The largest part of a stream entry id (Redis ids are two unsigned 64-bit ints).
MAX_PART = 2**64 - 1
#: ASCII digits only (``str.isdigit`` also accepts ``²`` and ``٣``), at most
#: 20 of them: the length of ``MAX_PART``.
_PART = re.compile(r"[0-9]{1,20}")
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def escaped(name: str) -> str:
    """``name`` with ``%``, ``:``, ``{`` and ``}`` percent-encoded."""
    return name.translate(_ESCAPES)


def channel_key(prefix: str, channel: str, kind: str = "c") -> str:
    """The Redis key of ``channel``'s stream (``kind`` ``"c"``) or id hash (``"i"``)."""
    return f"{prefix}{kind}:{channel.translate(_ESCAPES)}"


def position(entry_id: str) -> Position | None:
    """``(ms, seq)`` of a stream entry id, or ``None`` for anything else."""
    ms, sep, seq = entry_id.partition("-")
    if not sep or not _PART.fullmatch(ms) or not _PART.fullmatch(seq):
        return None
    position = (int(ms), int(seq))
    if position[0] > MAX_PART or position[1] > MAX_PART:
        return None
    return position


def after(position: Position) -> Position | None:
    """The smallest entry id after ``position`` (``None`` after the largest)."""
    ms, seq = position
    if seq < MAX_PART:
        return (ms, seq + 1)
    if ms < MAX_PART:
        return (ms + 1, 0)
    return None


def entry_id(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def hash_tag(key: str) -> str:
    """The part of ``key`` that Redis Cluster hashes when it has a tag (``{...}``)."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else ""


def by_prefix(separator: str = ":") -> Callable[[str], str]:
    """A ``shard_by`` that groups channels by their name up to ``separator``:
    ``room7:chat`` and ``room7:typing`` share a group (exact order between
    them) and a shard; ``room8:chat`` may sit on another."""

    def group(channel: str) -> str:
        return channel.partition(separator)[0]

    return group


def fields(flat: Any) -> dict[bytes, Any]:
    """A stream entry's fields from the flat list a script returns."""
    if isinstance(flat, dict):
        return flat
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_frame(body: bytes) -> bool:
    """One event frame as :meth:`ServerSentEvent.encode` writes it: LF line
    endings, one blank line, at the end."""
    return body.endswith(b"\n\n") and body.find(b"\n\n") == len(body) - 2 and b"\r" not in body


#: The publish script. KEYS: the sequence hash, the channel's stream, the
#: channel's id hash. ARGV: channel, body, history
#: size, the publisher's id ("" for none), history age in ms ("0" for none),
#: the Pub/Sub channel.
PUBLISH_SCRIPT = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
local last = redis.call('HGET', KEYS[1], 'last')
if last then
  local lms, ln = string.match(last, '^(%d+)-(%d+)$')
  if lms and tonumber(lms) >= ms then
    ms = tonumber(lms)
    n = tonumber(ln) + 1
  end
end
local id = string.format('%.0f-%.0f', ms, n)
local prev = redis.call('HGET', KEYS[1], 'c:' .. ARGV[1]) or '0-0'
local fields = {'b', ARGV[2], 'p', prev}
if ARGV[4] ~= '' then
  fields[5] = 'i'
  fields[6] = ARGV[4]
end
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, unpack(fields))
if type(added) == 'table' and added.err then
  -- The stream holds a newer id than the sequence (its key was evicted or
  -- written by someone else): continue after the stream's newest entry.
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if not top[1] then return redis.error_reply(added.err) end
  local tms, tn = string.match(top[1][1], '^(%d+)-(%d+)$')
  id = string.format('%.0f-%.0f', tonumber(tms), tonumber(tn) + 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id, unpack(fields))
end
redis.call('HSET', KEYS[1], 'last', id, 'c:' .. ARGV[1], id)
redis.call('HSETNX', KEYS[1], 'since', id)
if ARGV[5] ~= '0' then
  redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%.0f', ms - tonumber(ARGV[5])))
end
local indexed = 0
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[4], id)
  indexed = redis.call('HLEN', KEYS[3])
end
redis.call('PUBLISH', ARGV[6], id .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[2])
return {id, indexed}
"""

#: The read script: one atomic snapshot of a group's channels. KEYS: the
#: sequence hash, then each channel's stream. ARGV: per channel, its name and
#: the first entry id wanted. Returns the sequence's last and since ids, then
#: per channel its newest id and its entries from there (or the error text
#: when its key holds no stream).
READ_SCRIPT = """
local out = {redis.call('HGET', KEYS[1], 'last'), redis.call('HGET', KEYS[1], 'since')}
for i = 2, #KEYS do
  local newest = redis.call('HGET', KEYS[1], 'c:' .. ARGV[2 * i - 3])
  local entries = redis.pcall('XRANGE', KEYS[i], ARGV[2 * i - 2], '+')
  if type(entries) == 'table' and entries.err then entries = entries.err end
  out[#out + 1] = newest
  out[#out + 1] = entries
end
return out
"""
