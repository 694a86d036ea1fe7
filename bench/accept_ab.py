"""The accept of two source trees, alternated: server CPU per accepted stream.

    python -m bench.accept_ab [--pairs 4] [--conns 9000] [--channels N] [--redis] TREE_A TREE_B

Each TREE is a checkout of sse_handler (a directory holding ``sse_handler/``,
e.g. ``git worktree add /tmp/before 47f7321``). For each of ``pairs`` rounds,
in alternated order: the demo of that tree on core 0 (a fresh process, warmed
up), then ``bench/.build/loadgen`` on core 1 opening ``conns`` idle streams
at once (with ``--channels N``, stream *i* on channel ``c<i mod N>``: as many
different heads as channels); printed: the accept time the load generator measured (first dial to
last head) and the server's user and system CPU per accepted stream, read
from ``/proc``. With ``--redis`` the demo runs on its RedisBroker, with a
fresh ``redis-server`` of its own on core 0 as well (as in the scale-out
scenarios), whose CPU per stream is printed too. Medians at the end.
Finer than the bench's idle scenario for a before/after of one change to
the accept path: the CPU is the server's alone. Build the load generator
first (any ``python -m bench`` run does).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .run import _warm_up, free_port
from .scaleout import _start_redis

LOADGEN = Path(__file__).resolve().parent / ".build" / "loadgen"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def one(tree: str, conns: int, channels: int = 0, redis: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        redis_server = _start_redis(redis_port := free_port(), Path(workdir)) if redis else None
        try:
            at = None if redis_server is None else (redis_port, redis_server.pid)
            return _one(tree, conns, channels, at)
        finally:
            if redis_server is not None:
                redis_server.terminate()
                redis_server.wait()


def _one(tree: str, conns: int, channels: int, redis: tuple[int, int] | None) -> dict[str, Any]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=tree)
    demo = [sys.executable, "-m", "sse_handler", "demo", "--port", str(port)]
    if redis is not None:
        demo += ["--redis", f"redis://127.0.0.1:{redis[0]}/0"]
    server = subprocess.Popen(
        ["taskset", "-c", "0", *demo],
        env=env,
        cwd="/tmp",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        _warm_up(port)
        time.sleep(0.5)
        user0, sys0 = cpu_seconds(server.pid)
        redis0 = sum(cpu_seconds(redis[1])) if redis else 0.0
        command = [
            *("taskset", "-c", "1", str(LOADGEN), "-wait", "-addr", f"127.0.0.1:{port}"),
            *("-conns", str(conns), "-rate", "0", "-duration", "1s", "-size", "64"),
            *("-frozen", "0", "-channels", str(channels)),
        ]
        gen = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert gen.stdout is not None and gen.stdin is not None
        line = json.loads(gen.stdout.readline())
        user1, sys1 = cpu_seconds(server.pid)
        redis1 = sum(cpu_seconds(redis[1])) if redis else 0.0
        gen.stdin.write(b"close\n")
        gen.stdin.flush()
        gen.kill()
        gen.wait()
        return {
            "accept_s": line["accept_seconds"],
            "connected": line["connected"],
            "user_us": (user1 - user0) / conns * 1e6,
            "sys_us": (sys1 - sys0) / conns * 1e6,
            **({"redis_us": (redis1 - redis0) / conns * 1e6} if redis else {}),
        }
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--conns", type=int, default=9000)
    parser.add_argument("--channels", type=int, default=0)
    parser.add_argument("--redis", action="store_true", help="the demo on a fresh Redis")
    parser.add_argument("trees", nargs=2)
    args = parser.parse_args()
    if not LOADGEN.exists():
        sys.exit(f"no load generator at {LOADGEN}: run python -m bench --quick once")
    results: dict[str, list[dict[str, Any]]] = {tree: [] for tree in args.trees}
    for pair in range(args.pairs):
        for tree in args.trees if pair % 2 == 0 else args.trees[::-1]:
            result = one(tree, args.conns, args.channels, args.redis)
            results[tree].append(result)
            print(tree, result, flush=True)
    for tree, runs in results.items():
        medians = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        redis = f", Redis {medians['redis_us']:.1f} µs" if "redis_us" in medians else ""
        print(
            f"{tree}: accept {medians['accept_s']:.3f} s, user {medians['user_us']:.1f} µs, "
            f"system {medians['sys_us']:.1f} µs{redis} per accepted stream "
            f"(medians of {len(runs)})"
        )


if __name__ == "__main__":
    main()
