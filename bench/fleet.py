"""One process, many streams (issue 15): a reconnect storm on the memory broker,
and the biggest fleet one process holds here.

Scenarios (``python -m bench --scenarios storm9000,fleet2000,fleet9000,fleet19000``):

``storm9000``
    One server process, its in-memory history: 9,000 clients get 5 events, all
    drop their streams at once, 50 events are published while they are away,
    and all of them reconnect at once with their ``Last-Event-ID`` (the load
    generator's ``-mode storm``, as the Redis ``storm`` without the second
    process): the time until the last client has its replay, lost and
    duplicated events, resets, failed reconnects.
``fleet2000``, ``fleet9000``, ``fleet19000``
    N streams on one process: 1,000 live clients on a channel of their own
    receive 10 events/s for 10 s alone (their p99 *without* the others), then
    N - 1,000 idle streams open (accept time, RSS per stream), then the live
    clients receive 10 events/s for 10 s again *beside* the idle ones, with a
    keep-alive short enough (:data:`KEEPALIVE`) that the housekeeping timer
    walks every connection several times in that window; last, three
    broadcasts, each one event to every stream: the time until the last stream
    has it. Here a process may open at most 20,000 files (a hard limit), so
    19,000 streams is about the most one process holds; the idle streams are
    split over load generators of at most :data:`PER_LOADGEN` streams, each
    with a source address of its own (127.0.0.x).

sse_handler: the demo, ``python -m sse_handler demo`` (the storm) or
``bench/apps/sse_handler_fleet_app.py`` (the demo with ``--keepalive``, a
``POST /send_all`` route and its housekeeping callbacks timed). nginx+nchan:
one worker, its memory store, 1,000 messages of history per channel,
``nchan_eventsource_ping_interval`` the same keep-alive; a broadcast is one
publish to each of its two channels (the idle streams' and the live ones'), at
once: nchan has no "every subscriber" operation. Servers on core 0, load
generators on core 1.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .proc import cpu_seconds, machine_busy_seconds, rss_bytes, tree_pids
from .run import (
    LOADGEN_CORE,
    SERVER_CORE,
    SETTLE_SECONDS,
    BenchError,
    _Lines,
    _say,
    _stop,
    _wait_ready,
    _warm_up,
    free_port,
    interleaved_runs,
    wait_quiet,
)
from .servers import APPS, BUILD, nginx_head

__all__ = ["FLEET", "KEEPALIVE", "FleetScenario", "main", "run_fleet", "run_storm"]

#: The keep-alive of both servers in the fleet scenarios (seconds): sse_handler
#: walks its connections every half of it, nchan pings each stream this often.
KEEPALIVE = 2.0
#: Streams per load generator process (each may open at most 20,000 files).
PER_LOADGEN = 9000
LIVE = 1000
LIVE_RATE = 10.0
WINDOW = 10.0  # seconds of each live window
BROADCASTS = 3
#: The seq of broadcast k is BROADCAST_SEQ + k (the live windows count from 0).
BROADCAST_SEQ = 4000
SEQS = 4096


@dataclass(frozen=True)
class FleetScenario:
    name: str
    kind: str  # "storm" or "fleet"
    conns: int  # all the streams (a fleet: the live ones included)
    rate: float = 0  # storm: events/s
    pre: int = 0
    missed: int = 0

    @property
    def idle(self) -> int:
        return self.conns - LIVE if self.kind == "fleet" else 0

    @property
    def title(self) -> str:
        if self.kind == "storm":
            return (
                f"{self.conns:,} clients reconnect at once with Last-Event-ID to one process "
                f"({self.missed} events missed, memory broker)"
            )
        return f"{self.conns:,} streams on one process ({self.idle:,} idle, {LIVE:,} live)"


FLEET: dict[str, FleetScenario] = {
    sc.name: sc
    for sc in (
        FleetScenario("storm9000", "storm", conns=9000, rate=50, pre=5, missed=50),
        FleetScenario("fleet2000", "fleet", conns=2000),
        FleetScenario("fleet9000", "fleet", conns=9000),
        FleetScenario("fleet19000", "fleet", conns=19000),
    )
}


def nchan_conf(port: int, workdir: Path, keepalive: float | None) -> str:
    """One worker, its memory store; the channel is the ``channel`` query argument
    (``bench`` without one); listen backlog 4,096 as the demo's; 1,000 messages
    of history per channel (the MemoryBroker's ``history_size``); with
    ``keepalive``, a ping to every stream that often.

    ``worker_connections`` is above the open-files limit: with 20,000, 19,000
    streams made nginx log "worker_connections are not enough, reusing
    connections" and close some of them (nchan takes connection slots of its
    own); the sockets stay under ``worker_rlimit_nofile``."""
    ping = f"\n            nchan_eventsource_ping_interval {keepalive:g};" if keepalive else ""
    return (
        nginx_head(workdir, worker_connections=40000)
        + f"""    map $arg_channel $bench_channel {{
        "" bench;
        default $arg_channel;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /events {{
            nchan_subscriber eventsource;
            nchan_channel_id $bench_channel;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 1h;{ping}
            # Like the other servers: a new client gets what is published next.
            nchan_subscriber_first_message newest;
        }}
        location = /publish {{
            nchan_publisher;
            nchan_channel_id $bench_channel;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 1h;
        }}
    }}
}}
"""
    )


def _server_argv(server: str, sc: FleetScenario, port: int, workdir: Path) -> list[str]:
    if server == "nchan":
        conf = workdir / "nginx.conf"
        conf.write_text(nchan_conf(port, workdir, KEEPALIVE if sc.kind == "fleet" else None))
        return ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    if sc.kind == "fleet":
        return [
            sys.executable, str(APPS / "sse_handler_fleet_app.py"), "--host", "127.0.0.1",
            "--port", str(port), "--keepalive", f"{KEEPALIVE:g}",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "sse_handler", "demo", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def _popen(
    argv: list[str], cwd: Path, log: Path, core: str, pipes: bool = False
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["taskset", "-c", core, *argv], cwd=cwd,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out if pipes else subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


class _Cpu:
    """CPU seconds of the server, the load generators and the machine, now."""

    def __init__(self, server: list[int], gens: Sequence[subprocess.Popen[bytes]]) -> None:
        self.t = time.monotonic()
        self.server = cpu_seconds(server)
        self.gens = cpu_seconds([g.pid for g in gens])
        self.machine = machine_busy_seconds()
        self.own = time.process_time()

    def others_since(self, b: _Cpu) -> float:
        ours = (self.server - b.server) + (self.gens - b.gens) + (self.own - b.own)
        return max(0.0, (self.machine - b.machine - ours) / max(self.t - b.t, 1e-9))


class _Gen:
    """One load generator process and its JSON lines."""

    def __init__(self, loadgen: Path, argv: list[str], cwd: Path, log: Path) -> None:
        self.proc = _popen([str(loadgen), *argv], cwd, log, LOADGEN_CORE, pipes=True)
        assert self.proc.stdout is not None
        self.lines = _Lines(self.proc.stdout)

    def ask(self, word: str, timeout: float) -> dict[str, Any]:
        _say(self.proc, word)
        return self.lines.next(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                _say(self.proc, "close")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.lines.close()


def _get_json(port: int, path: str) -> dict[str, Any] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return dict(json.loads(body)) if response.status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()


def _post(port: int, path: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _broadcast(server: str, port: int, seq: int) -> tuple[int, list[int]]:
    """One event to every stream, stamped like the load generator's: its stamp
    (unix nanos, taken just before the requests leave) and the answers' statuses.
    nchan: one publish to each channel, at once."""
    paths = ["/send_all"] if server != "nchan" else ["/publish", "/publish?channel=c0"]
    stamp = time.time_ns()
    body = f"{stamp} {seq} ".encode().ljust(100, b"x")
    statuses: list[int] = [0] * len(paths)

    def post(i: int) -> None:
        try:
            statuses[i] = _post(port, paths[i], body)
        except (OSError, http.client.HTTPException):
            statuses[i] = -1

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stamp, statuses


def _gen_argv(port: int, conns: int, src: str, rate: float, dialers: int) -> list[str]:
    argv = [
        "-addr", f"127.0.0.1:{port}", "-mode", "hold", "-conns", str(conns), "-src", src,
        "-dialers", str(dialers), "-seqs", str(SEQS), "-drain", "30s",
        "-rate", f"{rate:g}", "-duration", f"{WINDOW:g}s",
    ]  # fmt: skip
    return argv + (["-channels", "1"] if rate else [])


def _window(
    live: _Gen, port: int, pids: list[int], gens: Sequence[_Gen], sweeps: bool
) -> dict[str, Any]:
    """One live window: the live clients' latency, the server's CPU and, for
    sse_handler, its housekeeping callbacks over the window."""
    before = _get_json(port, "/bench/sweep") if sweeps else None
    cpu = _Cpu(pids, [g.proc for g in gens])
    done = live.ask("publish", timeout=WINDOW * 3 + 60)
    end = _Cpu(pids, [g.proc for g in gens])
    after = _get_json(port, "/bench/sweep") if sweeps else None
    sweep = None
    if before is not None and after is not None:
        sweep = {
            "callbacks": after["callbacks"] - before["callbacks"],
            "seconds": after["seconds"] - before["seconds"],
            "max_seconds": after["max_seconds"],  # of the callbacks since `before`
            "p99_seconds": after["p99_seconds"],
            "period": after["period"],
        }
    return {
        "done": done,
        "wall_seconds": end.t - cpu.t,
        "server_cpu_seconds": end.server - cpu.server,
        "others": end.others_since(cpu),
        "sweep": sweep,
    }


def run_fleet(server: str, sc: FleetScenario, loadgen: Path, cwd: Path) -> dict[str, Any]:
    """Measure ``server`` (``sse_handler`` or ``nchan``) holding ``sc.conns``
    streams once; raises :class:`BenchError` if it cannot."""
    quiet = wait_quiet()
    (BUILD / "runs").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{server}-{sc.name}-", dir=BUILD / "runs"))
    port = free_port()
    srv = _popen(_server_argv(server, sc, port, workdir), cwd, workdir / "server.log", SERVER_CORE)
    gens: list[_Gen] = []
    sweeps = server != "nchan"
    try:
        _wait_ready(srv, port)
        _warm_up(port)
        time.sleep(0.5)
        pids = tree_pids(srv.pid)
        rss_before = rss_bytes(pids)
        live = _Gen(loadgen, _gen_argv(port, LIVE, "127.0.0.2", LIVE_RATE, 100), cwd,
                    workdir / "loadgen-live.log")  # fmt: skip
        gens.append(live)
        live_connected = live.lines.next(timeout=120)
        if live_connected["connected"] == 0:
            raise BenchError(f"no live stream opened: {live_connected.get('first_error')}")
        time.sleep(SETTLE_SECONDS)
        alone = _window(live, port, pids, gens, sweeps)
        rss_live = rss_bytes(tree_pids(srv.pid))
        # The idle streams: at most PER_LOADGEN per process, 100 being opened at once in all.
        n = math.ceil(sc.idle / PER_LOADGEN)
        shares = [sc.idle // n + (1 if i < sc.idle % n else 0) for i in range(n)]
        start = _Cpu(pids, [g.proc for g in gens])
        idle = [
            _Gen(loadgen, _gen_argv(port, k, f"127.0.0.{3 + i}", 0, max(1, 100 // n)), cwd,
                 workdir / f"loadgen-idle{i}.log")
            for i, k in enumerate(shares)
        ]  # fmt: skip
        gens += idle
        connected = [g.lines.next(timeout=300) for g in idle]
        accepted = _Cpu(pids, [g.proc for g in gens])
        first = min(c["start_ns"] for c in connected)
        last = max(c["start_ns"] + c["accept_seconds"] * 1e9 for c in connected)
        time.sleep(SETTLE_SECONDS)
        pids = tree_pids(srv.pid)
        rss_after = rss_bytes(pids)
        beside = _window(live, port, pids, gens, sweeps)
        broadcasts = []
        for k in range(BROADCASTS):
            time.sleep(1.0)
            armed = [g.ask("arm", timeout=30) for g in gens]
            stamp, statuses = _broadcast(server, port, BROADCAST_SEQ + k)
            awaited = [g.ask("await", timeout=60) for g in gens]
            broadcasts.append({
                "stamp_ns": stamp, "statuses": statuses, "armed": armed, "awaited": awaited,
            })  # fmt: skip
        rss_end = rss_bytes(tree_pids(srv.pid))
        for g in gens:
            g.close()
        if srv.poll() is not None:
            raise BenchError(f"the server exited with status {srv.returncode}")
    except (OSError, subprocess.SubprocessError, KeyError) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc} (logs in {workdir})") from exc
    except BenchError as exc:
        raise BenchError(f"{exc} (logs in {workdir})") from exc
    finally:
        for g in gens:
            if g.proc.poll() is None:
                g.proc.kill()
                g.proc.wait()
        _stop(srv)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "server": server,
        "scenario": sc.name,
        "others_before": quiet,
        "rss_before": rss_before,
        "rss_live": rss_live,
        "rss_after": rss_after,
        "rss_end": rss_end,
        "live_connected": live_connected,
        "idle_connected": connected,
        "accept_seconds": (last - first) / 1e9,
        "accept_cpu_seconds": accepted.server - start.server,
        "others_accepting": accepted.others_since(start),
        "alone": alone,
        "beside": beside,
        "broadcasts": broadcasts,
    }


def run_storm(server: str, sc: FleetScenario, loadgen: Path, cwd: Path) -> dict[str, Any]:
    """The reconnect storm on one process, once (the load generator's ``-mode storm``)."""
    quiet = wait_quiet()
    (BUILD / "runs").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{server}-{sc.name}-", dir=BUILD / "runs"))
    port = free_port()
    srv = _popen(_server_argv(server, sc, port, workdir), cwd, workdir / "server.log", SERVER_CORE)
    gen: _Gen | None = None
    try:
        _wait_ready(srv, port)
        _warm_up(port)
        time.sleep(0.5)
        pids = tree_pids(srv.pid)
        rss_before = rss_bytes(pids)
        argv = [
            "-wait", "-addr", f"127.0.0.1:{port}", "-conns", str(sc.conns), "-channels", "1",
            "-mode", "storm", "-rate", f"{sc.rate:g}", "-pre", str(sc.pre),
            "-missed", str(sc.missed), "-dialers", str(sc.conns), "-src", "127.0.0.2",
        ]  # fmt: skip
        gen = _Gen(loadgen, argv, cwd, workdir / "loadgen.log")
        start = _Cpu(pids, [gen.proc])
        connected = gen.lines.next(timeout=240)
        accepted = _Cpu(pids, [gen.proc])
        if connected["connected"] == 0:
            raise BenchError(f"no stream opened: {connected.get('first_error') or '?'}")
        time.sleep(SETTLE_SECONDS)
        pids = tree_pids(srv.pid)
        rss_after = rss_bytes(pids)
        go = _Cpu(pids, [gen.proc])
        done = gen.ask("go", timeout=240)
        end = _Cpu(pids, [gen.proc])
        _say(gen.proc, "close")
        gen.proc.wait(timeout=30)
        if srv.poll() is not None:
            raise BenchError(f"the server exited with status {srv.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc} (logs in {workdir})") from exc
    except BenchError as exc:
        raise BenchError(f"{exc} (logs in {workdir})") from exc
    finally:
        if gen is not None:
            if gen.proc.poll() is None:
                gen.proc.kill()
                gen.proc.wait()
            gen.lines.close()
        _stop(srv)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "server": server,
        "scenario": sc.name,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "accept_cpu_seconds": accepted.server - start.server,
        "server_cpu_seconds": end.server - go.server,
        "redis_cpu_seconds": 0.0,  # the scale-out figures' shape: no Redis here
        "loadgen_cpu_seconds": end.gens - go.gens,
        "wall_seconds": end.t - go.t,
        "others_before": quiet,
        "others_connecting": accepted.others_since(start),
        "others_running": end.others_since(go),
        "connected": connected,
        "done": done,
    }


def main(
    names: Sequence[str],
    servers: Sequence[str],
    runs: int,
    loadgen: Path,
    cwd: Path,
    machine: dict[str, Any],
    argv: Sequence[str],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run the scenarios ``names`` ``runs`` times, interleaved; the raw results."""
    from .fleet_report import figures

    def run_one(sc: FleetScenario, server: str) -> dict[str, Any]:
        run = run_storm if sc.kind == "storm" else run_fleet
        return run(server, sc, loadgen, cwd)

    plan = [(FLEET[name], server) for name in names for server in servers]
    raw, errors = interleaved_runs(runs, plan, run_one, figures, log)
    return {
        "argv": list(argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "scenarios": [dataclasses.asdict(FLEET[n]) for n in names],
        "run_count": runs,
        "servers": list(servers),
        "keepalive": KEEPALIVE,
        "runs": raw,
        "errors": errors,
    }
