"""redis-py's reply parsers side by side: what one Pub/Sub read costs.

    python -m bench.redis_parser [--engine redis|valkey] [--runs 5] [--count 20000]

On a fresh Redis from tests/redis_server.py, in this process: the CPU time
per message to read ``count`` SUBSCRIBE confirmations and then ``count``
published messages (200 bytes each) through ``PubSub.get_message``, the
RedisBroker reader's call, with hiredis's parser and with redis-py's
pure-Python one, each with a timeout per read (``get_message(timeout=1.0)``,
the reader before 2026-12-04) and blocking (``timeout=None``, the reader
since: a timer of its own watches for silence), alternated, medians of
``runs``. Why it matters: the reader reads one of these per live event and
per newly subscribed channel (docs/benchmarks.md, notes).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))

from redis.asyncio import ConnectionPool, Redis  # noqa: E402
from redis.utils import HIREDIS_AVAILABLE  # noqa: E402
from redis_server import RedisServer  # noqa: E402

try:
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
except ImportError:  # redis-py 5.0
    from redis.asyncio.connection import (  # type: ignore[attr-defined,no-redef]
        HiredisParser as _AsyncHiredisParser,
    )
    from redis.asyncio.connection import (  # type: ignore[attr-defined,no-redef]
        PythonParser as _AsyncRESP2Parser,
    )

PARSERS: dict[str, Any] = {"hiredis": _AsyncHiredisParser, "python": _AsyncRESP2Parser}
#: How each read waits: the timeout get_message() is given.
READS: dict[str, float | None] = {"timeout per read": 1.0, "blocking": None}
VARIANTS = [(parser, read) for parser in PARSERS for read in READS]


async def one_run(port: int, parser: Any, count: int, wait: float | None) -> tuple[float, float]:
    """µs of CPU per confirmation and per message."""
    reader = Redis(connection_pool=ConnectionPool(port=port, parser_class=parser))
    publisher = Redis(port=port)
    pubsub = reader.pubsub()
    try:
        start = time.process_time()
        await pubsub.subscribe(*[f"ch{i}" for i in range(count)])
        await _read(pubsub, count, wait)
        confirmations = (time.process_time() - start) / count * 1e6
        pipe = publisher.pipeline(transaction=False)
        for i in range(count):
            pipe.publish(f"ch{i % 100}", b"x" * 200)
        await pipe.execute()
        start = time.process_time()
        await _read(pubsub, count, wait)
        messages = (time.process_time() - start) / count * 1e6
    finally:
        await pubsub.aclose()
        await reader.aclose()
        await publisher.aclose()
    return confirmations, messages


async def _read(pubsub: Any, count: int, wait: float | None) -> None:
    got = 0
    while got < count:
        if await pubsub.get_message(timeout=wait) is not None:
            got += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="redis", choices=["redis", "valkey"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    if not HIREDIS_AVAILABLE:
        sys.exit("hiredis is not installed: pip install 'sse_handler[redis]'")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = RedisServer(port, args.engine)
    server.start()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    try:
        for run in range(args.runs):
            order = VARIANTS if run % 2 == 0 else VARIANTS[::-1]
            for name, read in order:
                results[name, read].append(
                    asyncio.run(one_run(port, PARSERS[name], args.count, READS[read]))
                )
    finally:
        server.close()
    print(f"{args.engine}, {args.count} of each, medians of {args.runs} alternated runs")
    print("| parser | read | SUBSCRIBE confirmation (µs CPU) | Pub/Sub message (µs CPU) |")
    print("|---|---|---:|---:|")
    for (name, read), runs in results.items():
        confirmation = statistics.median(r[0] for r in runs)
        message = statistics.median(r[1] for r in runs)
        print(f"| {name} | {read} | {confirmation:.1f} | {message:.1f} |")


if __name__ == "__main__":
    main()
