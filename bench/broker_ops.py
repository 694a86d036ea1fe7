"""Redis broker operations, two source trees side by side.

    python -m bench.broker_ops [--engine redis|valkey] [--cluster] OLD_TREE [NEW_TREE]

For each tree (a checkout of sse_handler; NEW_TREE defaults to this one) in a
subprocess of its own, on a fresh Redis from tests/redis_server.py: the time
to subscribe 100 new channels and then 1,000 more, and publish-plus-delivery
events/s and CPU per event (of the process publishing and receiving) of 1, 8
and 64 concurrent publishers on 4 channels (medians of 5 runs of 4,000
events). With ``--cluster``, on a 3-shard Redis Cluster (tests/redis_server.py)
with ``shard_by=by_prefix()``, the 4 channels in 4 groups, spread over the
shards.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, socket, statistics, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from redis_server import RedisCluster, RedisServer, cluster_ports
from sse_handler import ServerSentEvent
from sse_handler.brokers.redis import RedisBroker, by_prefix

cluster = sys.argv[4] == "cluster"
if cluster:
    server = RedisCluster(cluster_ports(3), sys.argv[3]); server.start()
else:
    sock = socket.socket(); sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]; sock.close()
    server = RedisServer(port, sys.argv[3]); server.start()

async def main():
    if cluster:
        broker = RedisBroker(server.url, block=0.5, cluster=True, shard_by=by_prefix())
    else:
        broker = RedisBroker(server.url, block=0.5)
    for n in (100, 1000):
        t = time.perf_counter()
        for i in range(n):
            await broker.subscribe(f"{n}:u{i}")
        print(f"subscribe {n} new channels: {(time.perf_counter() - t) * 1000:.0f} ms")
    got = []
    broker.add_listener(got.append)
    for c in range(4):
        await broker.subscribe(f"g{c}:c")
    event = ServerSentEvent(data="x" * 100)
    for publishers in (1, 8, 64):
        each = 4000 // publishers
        total = each * publishers
        rates, cpu = [], []
        for _ in range(5):
            got.clear()
            t, c = time.perf_counter(), time.process_time()
            async def publisher(c):
                for _ in range(each):
                    await broker.publish(f"g{c}:c", event)
            await asyncio.gather(*(publisher(c % 4) for c in range(publishers)))
            while len(got) < total:
                await asyncio.sleep(0.001)
            rates.append(total / (time.perf_counter() - t))
            cpu.append((time.process_time() - c) / total * 1e6)
        print(
            f"{publishers} publishers: publish + deliver {statistics.median(rates):.0f} "
            f"events/s, {statistics.median(cpu):.1f} us of this process's CPU per event"
        )
    await broker.close()

asyncio.run(main())
server.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_ops")
    parser.add_argument("--engine", default="redis", choices=["redis", "redis7", "valkey"])
    parser.add_argument("--cluster", action="store_true", help="on a 3-shard Redis Cluster")
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=HERE)
    args = parser.parse_args()
    for tree in (args.old, args.new):
        where = f"{args.engine}, a 3-shard cluster" if args.cluster else args.engine
        print(f"== {tree} ({where})", flush=True)
        subprocess.run(
            [
                *(sys.executable, "-c", CHILD, str(tree), str(HERE / "tests"), args.engine),
                "cluster" if args.cluster else "one",
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
