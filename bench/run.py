"""One measurement: start a server on core 0, drive it from core 1, read /proc.

The load generator talks to us over its stdin/stdout (see bench/loadgen):

1. it opens every connection and prints ``connected`` (with the accept time);
2. we sample the server's RSS and CPU, and say go;
3. it publishes for the scenario's duration, drains, and prints ``done``;
4. we sample CPU and RSS again (before the clients leave: closing thousands of
   sockets is not part of delivering events), read the server's ``/metrics``
   if it has them, and say close;
5. with frozen connections, it reads them out and prints ``frozen`` (how many
   the server had closed), then closes everything.

In a TLS scenario everything of this goes over HTTPS with the bench's
certificate: the warm-up, the streams and the publishing (``loadgen -tls``),
and ``/metrics``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .proc import cpu_seconds, machine_busy_seconds, rss_bytes, tree_pids
from .servers import BUILD, PEERS_VENV, Cert, Server

__all__ = ["PROFILE_ACCEPT_SECONDS", "PROFILE_RATE", "Scenario", "run_once"]

SERVER_CORE = "0"
LOADGEN_CORE = "1"
SETTLE_SECONDS = 1.0  # after the last connection, before sampling RSS and CPU
#: Before a run, wait (at most QUIET_WAIT seconds) until the rest of the machine
#: uses less than QUIET_CORES: the machine is shared, and a run that competes
#: with someone's test suite measures that suite as much as the server.
QUIET_CORES = 0.3
QUIET_WAIT = 30.0
PROFILE_RATE = 200  # py-spy samples per second
PROFILE_ACCEPT_SECONDS = 8  # idle scenarios: the profile covers opening the connections


@dataclass(frozen=True)
class Scenario:
    name: str
    conns: int
    rate: float  # events per second; 0 = idle clients
    duration: float  # seconds of publishing
    size: int = 100  # bytes of data per event
    #: > 0: sse_handler only, each run twice: without frozen readers, and with
    #: this many next to the clients (bench/loadgen -frozen).
    frozen: int = 0
    #: Over TLS (HTTPS), with the servers that can serve it (``Server.tls``).
    tls: bool = False

    @property
    def idle(self) -> bool:
        return self.rate == 0

    @property
    def title(self) -> str:
        if self.idle:
            return f"{self.conns:,} idle clients"
        times = "\N{MULTIPLICATION SIGN}"
        if self.frozen:
            return (
                f"{self.conns:,} clients {times} {self.rate:g} events/s, "
                f"with and without {self.frozen:,} frozen readers"
            )
        tls = " over TLS" if self.tls else ""
        return f"{self.conns:,} clients {times} {self.rate:g} events/s{tls} ({self.duration:g} s)"

    def same_shape(self, other: Scenario) -> bool:
        """Same clients, rate, duration and event size (e.g. a TLS scenario and its
        plain counterpart)."""
        return (self.conns, self.rate, self.duration, self.size, self.frozen) == (
            other.conns, other.rate, other.duration, other.size, other.frozen
        )  # fmt: skip


class BenchError(Exception):
    """A run that could not be measured (the server died, a timeout, ...)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"the server did not listen on port {port} within {timeout:g} s")


def _client_ssl() -> ssl.SSLContext:
    """TLS for the bench's own requests: the certificate is self-signed, not checked."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _connect(port: int, tls: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if not tls:
        return sock
    try:
        return _client_ssl().wrap_socket(sock, server_hostname="127.0.0.1")
    except BaseException:
        sock.close()
        raise


def _warm_up(port: int, tls: bool = False) -> None:
    """One stream and one publish, so lazy imports and first-request costs are paid.
    Raises :class:`BenchError` (or OSError) if the server does not serve a stream."""
    try:
        _warm_up_once(port, tls)
    except OSError as exc:  # ssl.SSLError among them: a broken TLS stream
        what = "warm-up over TLS" if tls else "warm-up"
        raise BenchError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _warm_up_once(port: int, tls: bool) -> None:
    with _connect(port, tls) as stream:
        stream.sendall(
            b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = stream.recv(4096)
            if not chunk:
                raise BenchError("the stream closed before its head")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"GET /events answered {head.splitlines()[0]!r}")
        with _connect(port, tls) as pub:
            pub.sendall(
                b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\n"
                b"Content-Type: text/plain\r\nConnection: close\r\n\r\nwarmup"
            )
            answer = pub.recv(4096)
            if not answer.startswith(b"HTTP/1.1 20"):
                raise BenchError(f"POST /publish answered {answer.splitlines()[:1]!r}")
            while pub.recv(4096):
                pass


def others_load(seconds: float = 1.0) -> float:
    """Cores' worth of CPU used by the rest of the machine over ``seconds``."""
    busy, own = machine_busy_seconds(), time.process_time()
    time.sleep(seconds)
    return (machine_busy_seconds() - busy - (time.process_time() - own)) / seconds


def interleaved_runs(
    runs: int,
    plan: Sequence[tuple[Any, str]],
    run_one: Callable[[Any, str], dict[str, Any]],
    figures: Callable[[dict[str, Any]], dict[str, float]],
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[str]]:
    """``runs`` rounds of ``plan`` (scenario, server) in order, interleaved:
    each round runs every pair once. The raw results (each with its round's
    ``run``) and one line per failed run; each run's figures are logged."""
    raw: list[dict[str, Any]] = []
    errors: list[str] = []
    for i in range(runs):
        for sc, server in plan:
            log(f"run {i + 1}/{runs}: {server}, {sc.name}: {sc.title}")
            try:
                result = run_one(sc, server)
            except BenchError as exc:
                errors.append(f"run {i + 1}, {sc.name}, {server}: {exc}")
                log(f"  failed: {exc}")
                continue
            raw.append({"run": i + 1, **result})
            f = figures(raw[-1])
            log("  " + ", ".join(f"{k}={v:.4g}" for k, v in f.items()))
    return raw, errors


def wait_quiet(max_wait: float = QUIET_WAIT) -> float:
    """Wait until the machine is quiet (or ``max_wait`` passed); the last load seen."""
    deadline = time.monotonic() + max_wait
    load = others_load()
    while load > QUIET_CORES and time.monotonic() < deadline:
        load = others_load()
    return load


class _Snapshot:
    """CPU seconds of the server, the load generator, and the whole machine, at one instant."""

    def __init__(self, server: list[int], gen: int) -> None:
        self.t = time.monotonic()
        self.server = cpu_seconds(server)
        self.gen = cpu_seconds([gen])
        self.machine = machine_busy_seconds()
        self.own = time.process_time()

    def others_since(self, before: _Snapshot) -> float:
        """Cores used by everything but us between ``before`` and this snapshot."""
        ours = (self.server - before.server) + (self.gen - before.gen) + (self.own - before.own)
        return max(0.0, (self.machine - before.machine - ours) / max(self.t - before.t, 1e-9))


class _Lines:
    """Reads JSON lines from a child's stdout, each within a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(stream, selectors.EVENT_READ)

    def next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise BenchError(f"the load generator said nothing for {timeout:g} s")
            chunk = os.read(self._stream.fileno(), 65536)
            if not chunk:
                raise BenchError("the load generator exited early (see loadgen.log)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        self._sel.close()


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process group we started, politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _start_server(
    server: Server, port: int, workdir: Path, cert: Cert | None
) -> subprocess.Popen[bytes]:
    with open(workdir / "server.log", "wb") as log:
        return subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, *server.argv(port, workdir, cert)],
            cwd=server.cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _start_loadgen(
    loadgen: Path, port: int, sc: Scenario, workdir: Path, frozen: int
) -> subprocess.Popen[bytes]:
    argv = [
        "taskset", "-c", LOADGEN_CORE, str(loadgen), "-wait",
        "-addr", f"127.0.0.1:{port}", "-conns", str(sc.conns),
        "-rate", f"{sc.rate:g}", "-duration", f"{sc.duration:g}s",
        "-size", str(sc.size), "-frozen", str(frozen),
    ]  # fmt: skip
    if sc.tls:
        argv.append("-tls")
    with open(workdir / "loadgen.log", "wb") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True,
        )  # fmt: skip


def _say(proc: subprocess.Popen[bytes], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word.encode() + b"\n")
    proc.stdin.flush()


def _py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Sample the server for ``seconds`` (collapsed stacks, native frames included)."""
    argv = [
        "taskset", "-c", LOADGEN_CORE, str(PEERS_VENV / "bin" / "py-spy"), "record",
        "--pid", str(pid), "--native", "--rate", str(PROFILE_RATE),
        "--duration", str(int(seconds)), "--format", "raw", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


_CLOSED = re.compile(r"^sse_connections_closed_total\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_REASON = re.compile(r'reason="([^"]*)"')


def closed_by_reason(port: int, tls: bool = False) -> dict[str, int] | None:
    """``sse_connections_closed_total`` of the server's ``/metrics``, by reason
    (None: no metrics, e.g. prometheus-client is not installed)."""
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=_client_ssl())
        if tls
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        if response.status != 200:
            return None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    counts: dict[str, int] = {}
    for labels, value in _CLOSED.findall(text):
        reason = _REASON.search(labels)
        if reason is not None:
            counts[reason.group(1)] = counts.get(reason.group(1), 0) + int(float(value))
    return counts


def run_once(
    server: Server,
    sc: Scenario,
    loadgen: Path,
    profile: Path | None = None,
    frozen: int = 0,
    cert: Cert | None = None,
) -> dict[str, Any]:
    """Measure ``server`` under ``sc`` once, with ``frozen`` frozen readers next to
    the clients (a TLS scenario: over HTTPS with ``cert``); raises
    :class:`BenchError` if it cannot, or if no stream opened or nothing was
    delivered (e.g. a server whose streams are not valid TLS)."""
    if sc.tls and cert is None:
        raise BenchError("a TLS scenario needs a certificate")
    cert = cert if sc.tls else None
    quiet = wait_quiet()
    (BUILD / "runs").mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{server.name}-{sc.name}-", dir=BUILD / "runs"))
    port = free_port()
    srv = _start_server(server, port, workdir, cert)
    gen: subprocess.Popen[bytes] | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        _wait_ready(srv, port)
        _warm_up(port, sc.tls)
        time.sleep(0.5)
        rss_before = rss_bytes(tree_pids(srv.pid))
        pids = tree_pids(srv.pid)
        if profile is not None and sc.idle:
            spy = _py_spy(srv.pid, PROFILE_ACCEPT_SECONDS, profile)
            time.sleep(1)  # py-spy attaches
        gen = _start_loadgen(loadgen, port, sc, workdir, frozen)
        assert gen.stdout is not None
        lines = _Lines(gen.stdout)
        start = _Snapshot(pids, gen.pid)
        connected = lines.next(timeout=180)
        accepted = _Snapshot(pids, gen.pid)
        if connected["connected"] == 0:
            raise BenchError(f"no stream opened: {connected.get('first_error') or '?'}")
        time.sleep(SETTLE_SECONDS)
        pids = tree_pids(srv.pid)
        rss_after = rss_bytes(pids)
        if profile is not None and not sc.idle:
            spy = _py_spy(srv.pid, sc.duration, profile)
        if spy is not None and sc.idle:
            spy.wait(timeout=PROFILE_ACCEPT_SECONDS + 60)  # the clients stay until it is done
        closed_before = closed_by_reason(port, sc.tls) if server.metrics else None
        go = _Snapshot(pids, gen.pid)
        _say(gen, "go")
        done = lines.next(timeout=3 * sc.duration + 60)
        end = _Snapshot(tree_pids(srv.pid), gen.pid)
        rss_end = rss_bytes(tree_pids(srv.pid))
        if done.get("published", 0) > 0 and done.get("received", 0) == 0:
            why = done.get("first_disconnect_error") or "no stream ended"
            ended = done.get("disconnected", 0)
            raise BenchError(f"nothing delivered ({ended} streams ended: {why})")
        closed = closed_by_reason(port, sc.tls) if server.metrics else None
        if closed is not None and closed_before is not None:
            # The warm-up stream's close is not part of the run.
            closed = {k: v - closed_before.get(k, 0) for k, v in closed.items()}
        _say(gen, "close")
        probe = lines.next(timeout=60) if frozen else None
        gen.wait(timeout=30)
        lines.close()
        if srv.poll() is not None:
            raise BenchError(f"the server exited with status {srv.returncode}")
        if spy is not None:
            spy.wait(timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc} (logs in {workdir})") from exc
    except BenchError as exc:
        raise BenchError(f"{exc} (logs in {workdir})") from exc
    finally:
        for proc in (spy, gen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        _stop(srv)
    shutil.rmtree(workdir, ignore_errors=True)  # kept above only when the run failed
    return {
        "server": server.name,
        "scenario": sc.name,
        "port": port,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_end": rss_end,
        "cpu_seconds": end.server - go.server,
        "loadgen_cpu_seconds": end.gen - go.gen,
        "wall_seconds": end.t - go.t,
        "others_before": quiet,
        "others_connecting": accepted.others_since(start),
        "others_publishing": end.others_since(go),
        "connected": connected,
        "done": done,
        "frozen": frozen,
        "frozen_probe": probe,
        "server_closed": closed,  # closes while publishing and draining, by reason
    }
