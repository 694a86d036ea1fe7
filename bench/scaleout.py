"""Scale-out on Redis (issue 11): two server processes that share one Redis.

Scenarios (``python -m bench --scenarios scaleout,storm,perchannel``):

``scaleout``
    2 server processes, 5,000 clients split evenly over them (2,500 each) on
    one channel, 20 events/s published through the first process for 10 s:
    deliveries/s, loss, latency, and CPU per delivery of the servers *and*
    Redis.
``storm``
    5,000 clients over the 2 processes; 5 events, then every client drops its
    connection, 50 events are published while they are away, and all of them
    reconnect at once with their ``Last-Event-ID``, each to the *other*
    process: the time until the last client has its replay, lost and
    duplicated events, resets and failed reconnects.
``perchannel``
    10,000 clients over the 2 processes, each on a channel of its own, then one
    event published to each of the 10,000 channels; in the same round, the
    same 10,000 clients on one channel and one event published to it: accept
    time of both, and the time until every client has its event. Before each
    accept, 200 live clients (100 on each process, on channel ``live``) receive
    20 events/s through the first process: their delivery latency over 3 s with
    nothing else going on, then while the 10,000 are being accepted.

sse_handler: ``python -m sse_handler demo --redis URL`` twice (its
RedisBroker). nginx+nchan: two nginx instances, one worker each, storing in
the same Redis (``nchan_redis_pass`` to an upstream of ``nchan_redis_server``).
Redis: ``redis-server`` without persistence. The servers and Redis are pinned
to core 0, the load generator to core 1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .proc import cpu_seconds, machine_busy_seconds, rss_bytes, tree_pids
from .report import splice_section
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
from .servers import BUILD, nginx_head
from .tables import NONE, X
from .tables import fmt as _fmt
from .tables import median as _median
from .tables import ratio as _ratio
from .tables import runs as _runs

__all__ = [
    "SCALEOUT",
    "RedisScenario",
    "figures",
    "latest_results",
    "main",
    "redis_missing",
    "run_scaleout",
    "section",
    "splice",
]

PROCESSES = 2
SECTION = "## Scale-out on Redis"
#: perchannel: live clients opened before the accept, the events/s they receive
#: through it, and the window measured before it with nothing else going on.
LIVE = 200
LIVE_RATE = 20.0
LIVE_BASELINE_SECONDS = 3.0


@dataclass(frozen=True)
class RedisScenario:
    name: str
    mode: str  # the load generator's -mode: "" (rate x duration), storm, perchannel
    conns: int
    channels: int = 1
    rate: float = 0
    duration: float = 0
    pre: int = 0
    missed: int = 0
    live: int = 0  # perchannel: live clients on channel "live", opened before the accept
    live_rate: float = 0  # ... receiving this many events/s through the accept

    @property
    def title(self) -> str:
        times = "\N{MULTIPLICATION SIGN}"
        if self.mode == "storm":
            return (
                f"{self.conns:,} clients reconnect at once with Last-Event-ID "
                f"({self.missed} events missed)"
            )
        if self.mode == "perchannel":
            where = "each on its own channel" if self.channels > 1 else "on one channel"
            return f"{self.conns:,} clients {where}, one event per channel"
        return f"{self.conns:,} clients {times} {self.rate:g} events/s ({self.duration:g} s)"


#: name -> the variants measured under it (perchannel: both channel layouts).
SCALEOUT: dict[str, tuple[RedisScenario, ...]] = {
    "scaleout": (RedisScenario("scaleout", "", conns=5000, rate=20, duration=10),),
    "storm": (RedisScenario("storm", "storm", conns=5000, rate=50, pre=5, missed=50),),
    "perchannel": (
        RedisScenario(
            "perchannel", "perchannel", conns=10000, channels=10000, live=LIVE, live_rate=LIVE_RATE
        ),
        RedisScenario(
            "onechannel", "perchannel", conns=10000, channels=1, live=LIVE, live_rate=LIVE_RATE
        ),
    ),
}


#: The storm's failure rows: (label, figure), the worst run of each.
STORM_WORST = (
    ("lost, worst run", "lost"),
    ("duplicated, worst run", "duplicates"),
    ("reset events, worst run", "resets"),
    ("failed reconnects, worst run", "reconnect_failed"),
    ("streams the server closed after the reconnect, worst run", "disconnected"),
    ("… reopened after the retry delay, worst run", "retried"),
)


def redis_missing() -> str | None:
    return None if shutil.which("redis-server") else "no redis-server (Debian: redis-server)"


def _redis_version() -> str:
    try:
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())


def nchan_redis_conf(port: int, redis_port: int, workdir: Path) -> str:
    """One nginx instance (one worker) of two, its channels in the shared Redis.

    The channel is the ``channel`` query argument (``bench`` without one, for
    the warm-up); the listen backlog is the demo's (4,096) so that a reconnect
    storm meets the same queue; 1,000 messages of history per channel, like
    the RedisBroker's default ``history_size``.
    """
    channel = """            nchan_channel_id $bench_channel;
            nchan_redis_pass bench_redis;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 1h;"""
    return (
        nginx_head(workdir)
        + f"""    map $arg_channel $bench_channel {{
        "" bench;
        default $arg_channel;
    }}
    upstream bench_redis {{
        nchan_redis_server redis://127.0.0.1:{redis_port};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /events {{
            nchan_subscriber eventsource;
{channel}
            # Like the other servers: a new client gets what is published next.
            nchan_subscriber_first_message newest;
        }}
        location = /publish {{
            nchan_publisher;
{channel}
        }}
    }}
}}
"""
    )


def _argv(server: str, port: int, redis_port: int, workdir: Path) -> list[str]:
    if server == "nchan":
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nginx.conf"
        conf.write_text(nchan_redis_conf(port, redis_port, workdir))
        return ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    return [
        sys.executable, "-m", "sse_handler", "demo", "--host", "127.0.0.1",
        "--port", str(port), "--redis", f"redis://127.0.0.1:{redis_port}/0",
    ]  # fmt: skip


def _popen(argv: list[str], cwd: Path, log: Path, core: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            ["taskset", "-c", core, *argv], cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning",
        "--maxclients", "20000",
    ]  # fmt: skip
    proc = _popen(argv, workdir, workdir / "redis.log", SERVER_CORE)
    deadline = time.monotonic() + 10
    while not _ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("redis-server did not start (see redis.log)")
        time.sleep(0.02)
    return proc


class _Cpu:
    """CPU seconds of the servers, Redis, the load generator and the machine, now."""

    def __init__(self, servers: list[int], redis: int, gen: int) -> None:
        self.t = time.monotonic()
        self.servers = cpu_seconds(servers)
        self.redis = cpu_seconds([redis])
        self.gen = cpu_seconds([gen])
        self.machine = machine_busy_seconds()
        self.own = time.process_time()

    def others_since(self, b: _Cpu) -> float:
        ours = (
            (self.servers - b.servers) + (self.redis - b.redis) + (self.gen - b.gen)
            + (self.own - b.own)
        )  # fmt: skip
        return max(0.0, (self.machine - b.machine - ours) / max(self.t - b.t, 1e-9))


def _loadgen_argv(loadgen: Path, ports: list[int], sc: RedisScenario) -> list[str]:
    addrs = [f"127.0.0.1:{p}" for p in ports]
    argv = [
        "taskset", "-c", LOADGEN_CORE, str(loadgen), "-wait", "-addr", addrs[0],
        "-addrs", ",".join(addrs), "-conns", str(sc.conns), "-channels", str(sc.channels),
    ]  # fmt: skip
    if sc.mode == "storm":
        argv += [
            "-mode", "storm", "-rate", f"{sc.rate:g}", "-pre", str(sc.pre),
            "-missed", str(sc.missed), "-storm-shift", "1", "-dialers", str(sc.conns),
        ]  # fmt: skip
    elif sc.mode == "perchannel":
        argv += ["-mode", "perchannel", "-publishers", "8", "-drain", "30s"]
        if sc.live:
            argv += [
                "-live", str(sc.live), "-live-rate", f"{sc.live_rate:g}",
                "-live-channel", "live", "-live-baseline", f"{LIVE_BASELINE_SECONDS:g}s",
            ]  # fmt: skip
    else:
        argv += ["-rate", f"{sc.rate:g}", "-duration", f"{sc.duration:g}s"]
    return argv


def run_scaleout(server: str, sc: RedisScenario, loadgen: Path, cwd: Path) -> dict[str, Any]:
    """Measure ``server`` (``sse_handler`` or ``nchan``) under ``sc`` once: Redis and
    two server processes, fresh; raises :class:`BenchError` if it cannot."""
    quiet = wait_quiet()
    (BUILD / "runs").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{server}-{sc.name}-", dir=BUILD / "runs"))
    redis_port = free_port()
    ports = [free_port() for _ in range(PROCESSES)]
    procs: list[subprocess.Popen[bytes]] = []
    redis: subprocess.Popen[bytes] | None = None
    gen: subprocess.Popen[bytes] | None = None
    try:
        redis = _start_redis(redis_port, workdir)
        for i, port in enumerate(ports):
            where = workdir / f"server{i}"
            where.mkdir()
            argv = _argv(server, port, redis_port, where)
            procs.append(_popen(argv, cwd, where / "server.log", SERVER_CORE))
        for proc, port in zip(procs, ports, strict=True):
            _wait_ready(proc, port)
            _warm_up(port)
        time.sleep(0.5)
        pids = [p for proc in procs for p in tree_pids(proc.pid)]
        rss_before = rss_bytes(pids) + rss_bytes([redis.pid])
        with open(workdir / "loadgen.log", "wb") as log:
            gen = subprocess.Popen(
                _loadgen_argv(loadgen, ports, sc), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )  # fmt: skip
        assert gen.stdout is not None
        lines = _Lines(gen.stdout)
        live = None
        if sc.live:  # the live clients' baseline window is over: the accept starts
            live = lines.next(timeout=120)
            if live["live_connected"] == 0:
                raise BenchError(f"no live stream opened: {live.get('first_error') or '?'}")
        start = _Cpu(pids, redis.pid, gen.pid)
        connected = lines.next(timeout=240)
        accepted = _Cpu(pids, redis.pid, gen.pid)
        if connected["connected"] == 0:
            raise BenchError(f"no stream opened: {connected.get('first_error') or '?'}")
        time.sleep(SETTLE_SECONDS)
        pids = [p for proc in procs for p in tree_pids(proc.pid)]
        rss_after = rss_bytes(pids) + rss_bytes([redis.pid])
        go = _Cpu(pids, redis.pid, gen.pid)
        _say(gen, "go")
        done = lines.next(timeout=3 * sc.duration + 180)
        end = _Cpu(pids, redis.pid, gen.pid)
        _say(gen, "close")
        gen.wait(timeout=30)
        lines.close()
        for proc in (*procs, redis):
            if proc.poll() is not None:
                raise BenchError(f"a server or Redis exited with status {proc.returncode}")
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc} (logs in {workdir})") from exc
    except BenchError as exc:
        raise BenchError(f"{exc} (logs in {workdir})") from exc
    finally:
        if gen is not None and gen.poll() is None:
            gen.kill()
            gen.wait()
        for proc in procs:
            _stop(proc)
        if redis is not None:
            _stop(redis)
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "server": server,
        "scenario": sc.name,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "accept_cpu_seconds": (accepted.servers - start.servers) + (accepted.redis - start.redis),
        "accept_loadgen_cores": (accepted.gen - start.gen) / max(accepted.t - start.t, 1e-9),
        "server_cpu_seconds": end.servers - go.servers,
        "redis_cpu_seconds": end.redis - go.redis,
        "loadgen_cpu_seconds": end.gen - go.gen,
        "wall_seconds": end.t - go.t,
        "others_before": quiet,
        "others_connecting": accepted.others_since(start),
        "others_running": end.others_since(go),
        "connected": connected,
        "live": live,
        "done": done,
    }


# --- figures and the doc's section -------------------------------------------------


def figures(r: dict[str, Any]) -> dict[str, float]:
    """One run's figures (NaN where a figure does not apply)."""
    nan = float("nan")
    d, c = r["done"], r["connected"]
    cpu = r["server_cpu_seconds"] + r["redis_cpu_seconds"]
    received = d.get("received", 0) or 0
    out = {
        "accept_s": c["accept_seconds"],
        "failed_open": c.get("failed", 0),
        "cpu_us_per_delivery": cpu / received * 1e6 if received else nan,
        "server_us_per_delivery": r["server_cpu_seconds"] / received * 1e6 if received else nan,
        "redis_us_per_delivery": r["redis_cpu_seconds"] / received * 1e6 if received else nan,
        "others_cores": r["others_running"],
        "others_accept_cores": r["others_connecting"],
        "loadgen_accept_cores": r.get("accept_loadgen_cores", nan),
        "duplicates": d.get("duplicates", 0),
        "received": received,
    }
    if d.get("mode") == "storm":
        out |= {
            "lost": d["lost"],
            "resets": d["resets"],
            "reconnect_failed": d["reconnect_failed"],
            "reconnect_s": d["reconnect_seconds"],
            "replay_s": d["replay_seconds"] if d["replay_seconds"] >= 0 else nan,
            "replay_p50_ms": d["replay_done_ms"].get("p50", nan),
            "replay_p99_ms": d["replay_done_ms"].get("p99", nan),
            "complete": d["complete_streams"],
            "reconnecting": d["reconnecting"],
            "disconnected": d["disconnected"],
            "retried": d.get("retried", 0),
        }
    else:
        lat = d.get("latency_ms", {})
        out |= {
            "lost": d["expected"] - received,
            "loss": d["loss_of_expected"],
            "p50": lat.get("p50", nan),
            "p99": lat.get("p99", nan),
            "disconnected": d.get("disconnected", 0),
            "publish_errors": d.get("publish_errors", 0),
        }
        if "deliveries_per_s" in d:
            out["deliveries_per_s"] = d["deliveries_per_s"]
            out["offered_per_s"] = d["offered_per_s"]
        if "all_delivered_seconds" in d:
            out["all_delivered_s"] = d["all_delivered_seconds"]
            out["publish_s"] = d["publish_seconds"]
        if "live" in d:
            out |= live_figures(d["live"])
    return out


def live_figures(live: dict[str, Any]) -> dict[str, float]:
    """The live clients' latency before and during the accept, and during ÷ before."""
    nan = float("nan")
    out: dict[str, float] = {}
    for window, key in (("baseline", "base"), ("accept", "acc")):
        w = live[window]
        for q in ("p50", "p99"):
            out[f"live_{key}_{q}"] = w["latency_ms"].get(q, nan)
        out[f"live_{key}_n"] = w["received"]
        out[f"live_{key}_lost"] = w["lost"]
    for q in ("p50", "p99"):
        base, acc = out[f"live_base_{q}"], out[f"live_acc_{q}"]
        out[f"live_{q}_ratio"] = acc / base if base == base and acc == acc and base else nan
    out["live_lost"] = out["live_base_lost"] + out["live_acc_lost"]
    out["live_disconnected"] = live["disconnected"]
    out["live_publish_errors"] = live["publish_errors"]
    return out


def section(results: dict[str, Any]) -> str:
    """The Markdown of the "Scale-out on Redis" section, from one invocation's results."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for r in results["runs"]:
        runs.setdefault(r["scenario"], {}).setdefault(r["server"], []).append(figures(r))
    m = results["machine"]

    def col(scenario: str, server: str, key: str) -> list[float]:
        return [f.get(key, float("nan")) for f in runs.get(scenario, {}).get(server, [])]

    def med(scenario: str, server: str, key: str) -> float:
        return _median(col(scenario, server, key))

    def paired(scenario: str, key: str) -> list[float]:
        a, b = col(scenario, "sse_handler", key), col(scenario, "nchan", key)
        return [x / y if y else float("nan") for x, y in zip(a, b, strict=False)]

    def worst(scenario: str, server: str, key: str) -> float:
        values = [v for v in col(scenario, server, key) if v == v]
        return max(values) if values else float("nan")

    servers = [s for s in ("sse_handler", "nchan") if any(s in v for v in runs.values())]
    out = [
        SECTION,
        "",
        f"Issue 11. Measured {results['date']} on commit {m.get('commit', '?')} with "
        f"`python -m bench {' '.join(results['argv'])}`: {results['run_count']} runs, "
        "interleaved (each run: every scenario, sse_handler then nchan, each on a fresh "
        "Redis and fresh servers). Medians; *paired* = run *i* ÷ run *i*.",
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, Python "
        f"{m['python']}, Tornado {m['tornado']}, redis-py {m.get('redis_py', '?')}, "
        f"Redis {m.get('redis', '?')}, nginx {m['nginx']} with libnginx-mod-nchan "
        f"{m['nchan']}, Go {m['go']}.",
        "- sse_handler: two `python -m sse_handler demo --redis redis://127.0.0.1:PORT/0` "
        "(its RedisBroker, default settings). nchan: two nginx instances, one worker each, "
        "`nchan_redis_pass` to an `upstream` of `nchan_redis_server` (storage mode "
        "`distributed`, the default), `nchan_message_buffer_length 1000`, listen backlog "
        "4,096 as the demo's. One `redis-server` without persistence for both servers.",
        "- Both server processes and Redis are pinned to core 0, the load generator to "
        "core 1 (one process, one epoll loop; at most 10,000 sockets, under the 20,000 "
        "open-files limit). Clients alternate between the two processes (stream *i* on "
        "process *i* mod 2); events are published through the first process only.",
        "- *CPU µs / delivery* = utime + stime (`/proc/PID/stat`) of both server process "
        "trees **and** Redis, from the first publish to the end of the drain, ÷ deliveries "
        "received. The split into servers and Redis follows.",
        "",
    ]
    # scaleout
    sc = "scaleout"
    if sc in runs:
        out += [
            f"### {SCALEOUT[sc][0].title}, 2 processes",
            "",
            "| figure | " + " | ".join(servers) + " | sse_handler ÷ nchan | paired |",
            "|---|" + "---:|" * len(servers) + "---:|---|",
        ]
        rows = [
            ("CPU µs / delivery (servers + Redis)", "cpu_us_per_delivery", ".2f"),
            ("… of which servers", "server_us_per_delivery", ".2f"),
            ("… of which Redis", "redis_us_per_delivery", ".2f"),
            ("deliveries / s (offered 100,000)", "deliveries_per_s", ",.0f"),
            ("p50 ms", "p50", ".1f"),
            ("p99 ms", "p99", ".1f"),
            ("accept 5,000 (s)", "accept_s", ".2f"),
        ]
        for label, key, spec in rows:
            cells = [_fmt(med(sc, s, key), spec) for s in servers]
            ratio = _ratio(med(sc, "sse_handler", key), med(sc, "nchan", key))
            out.append(
                f"| {label} | " + " | ".join(cells) + f" | {ratio} | "
                + _runs(paired(sc, key)) + " |"
            )  # fmt: skip
        cells = [
            f"{_fmt(worst(sc, s, 'loss'), '.3%')} ({_fmt(worst(sc, s, 'lost'), '.0f')} "
            f"deliveries), dup {_fmt(worst(sc, s, 'duplicates'), '.0f')}"
            for s in servers
        ]
        out += ["| loss, worst run | " + " | ".join(cells) + " | | |", ""]
        for s in servers:
            out.append(
                f"- {s}, run by run: CPU µs / delivery "
                f"{_runs(col(sc, s, 'cpu_us_per_delivery'))}; p99 "
                f"{_runs(col(sc, s, 'p99'), '.1f')} ms; others' load "
                f"{_runs(col(sc, s, 'others_cores'))} cores"
            )
        out.append("")
    sc = "storm"
    if sc in runs:
        storm = SCALEOUT[sc][0]
        out += [
            f"### Reconnect storm: {storm.title}",
            "",
            f"{storm.conns:,} clients over the 2 processes get {storm.pre} events "
            f"(published at {storm.rate:g}/s); the load generator closes every stream at "
            f"once, waits 0.5 s, publishes {storm.missed} events at {storm.rate:g}/s, waits "
            "0.5 s, then opens all the streams again at once (no limit on concurrent "
            "dials), each with the id of the last event it read as `Last-Event-ID`, and "
            "each on the **other** process than before: the replay comes from Redis, not "
            "from the memory of the process the client had. *Replay done* = from the "
            "first reconnect dial to the moment a client has every event (the last "
            "client: the storm's length). Lost = (events x clients) - distinct "
            "(client, event) received; duplicated = an event a client received twice "
            "over its connections. A stream that the server closes after the reconnect "
            "comes back with its `Last-Event-ID` after the `retry` the server sent (3 s "
            "without one), as an EventSource does.",
            "",
            "| figure | " + " | ".join(servers) + " | sse_handler ÷ nchan | paired |",
            "|---|" + "---:|" * len(servers) + "---:|---|",
        ]
        for label, key, spec_ in (
            ("last client's replay done (s)", "replay_s", ".3f"),
            ("replay done p50 ms", "replay_p50_ms", ".0f"),
            ("replay done p99 ms", "replay_p99_ms", ".0f"),
            ("all reconnected: last head (s)", "reconnect_s", ".3f"),
            ("CPU µs / delivery (servers + Redis)", "cpu_us_per_delivery", ".2f"),
        ):
            cells = [_fmt(med(sc, s, key), spec_) for s in servers]
            ratio = _ratio(med(sc, "sse_handler", key), med(sc, "nchan", key))
            out.append(
                f"| {label} | " + " | ".join(cells) + f" | {ratio} | "
                + _runs(paired(sc, key)) + " |"
            )  # fmt: skip
        for label, key in STORM_WORST:
            cells = [_fmt(worst(sc, s, key), ".0f") for s in servers]
            out.append(f"| {label} | " + " | ".join(cells) + " | | |")
        out.append("")
        for s in servers:
            complete = [
                f"{int(c)}/{int(n)}"
                for c, n in zip(col(sc, s, "complete"), col(sc, s, "reconnecting"), strict=True)
            ]
            out.append(
                f"- {s}, run by run: last replay {_runs(col(sc, s, 'replay_s'), '.3f')} s; "
                f"clients with every event {', '.join(complete)}"
            )
        out.append("")
    if "perchannel" in runs or "onechannel" in runs:
        n = SCALEOUT["perchannel"][0].conns
        out += [
            f"### {n:,} clients, each on its own channel vs all on one",
            "",
            f"{n:,} clients over the 2 processes (5,000 each), each on channel `c<i>` "
            f"({n:,} channels), then one event published to each channel through the "
            "first process (8 concurrent keep-alive publishers, as fast as they go); in "
            f"the same round the same {n:,} clients on one channel and one event "
            "published to it. *Accept* = first dial to last response head (at most 100 "
            "being opened at once), against issue 11's per-channel rate ≥ ½ the "
            "one-channel rate, i.e. per-channel accept time at most twice one-channel's. "
            "*All delivered* = first publish to the last client's event.",
            "",
            f"*Live clients*: before the {n:,} in each layout, {LIVE} clients (100 on "
            f"each process) subscribe to channel `live`, and {LIVE_RATE:g} events/s are "
            "published to it through the first process (4 keep-alive publishers, each "
            "event stamped when its POST leaves) until the last of the "
            f"{n:,} has its head. *No accept* = the latency of the events published in "
            f"the {LIVE_BASELINE_SECONDS:g} s just before the accept (after 1 s of "
            "warm-up), with nothing else going on; *during* = of the events published "
            "from the first dial to the last response head (a late delivery counts in "
            "the window its event was published in). Against issue 11's live latency "
            f"during the accept ≤ 1.5{X} without; each ratio is within one run, against "
            "that run's own window before the accept (*no accept* rows: the "
            "own-channel runs'). The accept figures above are measured with these "
            "live clients receiving.",
            "",
            "| figure | " + " | ".join(servers) + " | sse_handler ÷ nchan | paired |",
            "|---|" + "---:|" * len(servers) + "---:|---|",
        ]
        for label, scen, key, spec_ in (
            (f"accept {n:,}, own channels (s)", "perchannel", "accept_s", ".2f"),
            (f"accept {n:,}, one channel (s)", "onechannel", "accept_s", ".2f"),
            (f"{n:,} publishes: all delivered (s)", "perchannel", "all_delivered_s", ".2f"),
            (f"{n:,} publishes: publishing took (s)", "perchannel", "publish_s", ".2f"),
            ("one publish to one channel: all delivered (s)", "onechannel",
             "all_delivered_s", ".3f"),
            ("live p50 ms, no accept", "perchannel", "live_base_p50", ".1f"),
            ("live p50 ms, during the own-channel accept", "perchannel", "live_acc_p50", ".1f"),
            ("live p50 ms, during the one-channel accept", "onechannel", "live_acc_p50", ".1f"),
            ("live p99 ms, no accept", "perchannel", "live_base_p99", ".1f"),
            ("live p99 ms, during the own-channel accept", "perchannel", "live_acc_p99", ".1f"),
            ("live p99 ms, during the one-channel accept", "onechannel", "live_acc_p99", ".1f"),
        ):  # fmt: skip
            cells = [_fmt(med(scen, s, key), spec_) for s in servers]
            ratio = _ratio(med(scen, "sse_handler", key), med(scen, "nchan", key))
            out.append(
                f"| {label} | " + " | ".join(cells) + f" | {ratio} | "
                + _runs(paired(scen, key)) + " |"
            )  # fmt: skip
        for label, scen, key in (
            (f"live p50 during ÷ without accept, own channels (target ≤ 1.5{X})", "perchannel",
             "live_p50_ratio"),
            (f"live p99 during ÷ without accept, own channels (target ≤ 1.5{X})", "perchannel",
             "live_p99_ratio"),
            ("live p50 during ÷ without accept, one channel", "onechannel", "live_p50_ratio"),
            ("live p99 during ÷ without accept, one channel", "onechannel", "live_p99_ratio"),
        ):  # fmt: skip
            cells = []
            for s in servers:
                values = col(scen, s, key)
                ok = [v for v in values if v == v]
                cells.append(f"{_fmt(_median(ok))}{X} ({_runs(values)})" if ok else NONE)
            out.append(f"| {label} | " + " | ".join(cells) + " | | |")
        cells = []
        for s in servers:
            per = col("perchannel", s, "accept_s")
            one = col("onechannel", s, "accept_s")
            pairs = [p / o for p, o in zip(per, one, strict=False) if o]
            cells.append(f"{_fmt(_median(pairs))}{X} ({_runs(pairs)})" if pairs else NONE)
        out.append(
            "| accept time, own channels ÷ one channel (paired) | " + " | ".join(cells)
            + " | | |"
        )  # fmt: skip
        for label, scen, key in (
            ("lost, worst run (own channels)", "perchannel", "lost"),
            ("lost, worst run (one channel)", "onechannel", "lost"),
            ("duplicated, worst run", "perchannel", "duplicates"),
            ("failed opens, worst run (own channels)", "perchannel", "failed_open"),
            ("publish errors, worst run", "perchannel", "publish_errors"),
            ("live deliveries lost, worst run (own channels)", "perchannel", "live_lost"),
            ("live deliveries lost, worst run (one channel)", "onechannel", "live_lost"),
            ("live streams closed, worst run", "perchannel", "live_disconnected"),
        ):
            cells = [_fmt(worst(scen, s, key), ".0f") for s in servers]
            out.append(f"| {label} | " + " | ".join(cells) + " | | |")
        out.append("")
        for s in servers:
            if not any(v == v for v in col("perchannel", s, "live_base_p50")):
                continue
            parts = []
            for scen, where in (("perchannel", "own channels"), ("onechannel", "one channel")):
                runs_ = [
                    f"{_fmt(b50, '.1f')}/{_fmt(b99, '.1f')} → {_fmt(a50, '.1f')}/"
                    f"{_fmt(a99, '.1f')} ({_fmt(n, ',.0f')} deliveries; load generator "
                    f"{_fmt(gen)}, others {_fmt(oth)} cores during the accept)"
                    for b50, b99, a50, a99, n, gen, oth in zip(
                        col(scen, s, "live_base_p50"), col(scen, s, "live_base_p99"),
                        col(scen, s, "live_acc_p50"), col(scen, s, "live_acc_p99"),
                        col(scen, s, "live_acc_n"), col(scen, s, "loadgen_accept_cores"),
                        col(scen, s, "others_accept_cores"), strict=True,
                    )
                ]  # fmt: skip
                parts.append(f"{where} {'; '.join(runs_)}")
            out.append(
                f"- {s}, run by run, live p50/p99 ms no accept → during the accept: "
                + "; ".join(parts)
            )
        out.append("")
    if results.get("errors"):
        out += ["Runs that failed:", ""] + [f"- {e}" for e in results["errors"]] + [""]
    return "\n".join(out)


def splice(doc: str, md: str) -> str:
    """``doc`` with its Scale-out section replaced by ``md`` (or added before Notes)."""
    return splice_section(doc, SECTION, md)


def latest_results() -> dict[str, Any] | None:
    files = sorted(BUILD.glob("scaleout-results-*.json"))
    for path in reversed(files):
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return None


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
    """Run the scale-out scenarios ``names`` ``runs`` times, interleaved; the results."""
    import redis as redis_py

    machine = {**machine, "redis": _redis_version(), "redis_py": redis_py.__version__}
    plan = [(sc, server) for name in names for sc in SCALEOUT[name] for server in servers]
    raw, errors = interleaved_runs(
        runs, plan, lambda sc, server: run_scaleout(server, sc, loadgen, cwd), figures, log
    )
    return {
        "argv": list(argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "scenarios": [dataclasses.asdict(sc) for n in names for sc in SCALEOUT[n]],
        "run_count": runs,
        "servers": list(servers),
        "runs": raw,
        "errors": errors,
    }
