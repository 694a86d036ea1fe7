"""The servers under test, the peers' virtualenv, and the load generator's build.

Every server serves ``GET /events`` (the broadcast stream) and ``POST /publish``
(body = event data, sent to every client) on 127.0.0.1, over plain HTTP or, for
the TLS scenarios and the servers that take part in them, over HTTPS with the
bench's self-signed certificate (:func:`make_cert`). Each is started as its own
process tree; :mod:`bench.run` pins it to one core.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "APPS",
    "BENCH",
    "BUILD",
    "FROZEN_SERVER",
    "REPO",
    "SERVERS",
    "Cert",
    "Server",
    "build_loadgen",
    "ensure_peers",
    "machine_info",
    "make_cert",
    "snapshot_baseline",
    "snapshot_library",
]

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
BUILD = BENCH / ".build"
APPS = BENCH / "apps"
PEERS_VENV = BENCH / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
PEERS_REQUIREMENTS = BENCH / "requirements-peers.txt"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


@dataclass(frozen=True)
class Cert:
    """The TLS certificate (PEM) and its private key, for the TLS scenarios."""

    cert: Path
    key: Path
    description: str


@dataclass(frozen=True)
class Server:
    """How to start one server: ``argv(port, workdir, cert)`` run in ``cwd`` (``cert``:
    serve HTTPS with it, else plain HTTP), and why it cannot run here."""

    name: str
    description: str
    argv: Callable[[int, Path, Cert | None], list[str]]
    missing: Callable[[], str | None]
    cwd: Path = REPO
    #: Serves Prometheus metrics at ``/metrics`` (read after each run).
    metrics: bool = False
    #: Takes part in the TLS scenarios (its argv serves HTTPS given a certificate).
    tls: bool = False
    #: Runs only when ``--servers`` names it (not a peer: a reference point).
    on_request: bool = False


def _tls_args(cert: Cert | None) -> list[str]:
    return [] if cert is None else ["--certfile", str(cert.cert), "--keyfile", str(cert.key)]


def _sse_handler(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    if cert is not None:
        # The demo, with ssl_options given to its HTTPServer.
        return [
            sys.executable, str(APPS / "sse_handler_tls_app.py"),
            "--host", "127.0.0.1", "--port", str(port), *_tls_args(cert),
        ]  # fmt: skip
    return [
        sys.executable,
        "-m",
        "sse_handler",
        "demo",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _sse_handler_frozen(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    return [
        sys.executable,
        str(APPS / "sse_handler_frozen_app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _tornado(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    return [sys.executable, str(APPS / "tornado_app.py"), "--port", str(port), *_tls_args(cert)]


def _floor(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    return [sys.executable, str(APPS / "floor_app.py"), "--port", str(port)]


def _starlette(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    return [
        str(PEERS_PYTHON), "-m", "uvicorn", "--app-dir", str(APPS), "starlette_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def _aiohttp(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    return [str(PEERS_PYTHON), str(APPS / "aiohttp_app.py"), "--port", str(port)]


def nginx_head(workdir: Path, worker_connections: int = 20000) -> str:
    """The start of every nginx configuration of the bench, up to and with
    the ``http`` block's first lines: nchan's module, one worker, the
    open-files limit, files under ``workdir``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""load_module {NCHAN_MODULE};
{user}worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{
    worker_connections {worker_connections};
}}
http {{
    access_log off;
{temp}
"""


def nginx_conf(port: int, workdir: Path, cert: Cert | None = None) -> str:
    """One worker, one channel: nchan's eventsource subscriber and its publisher.

    With ``cert``: over TLS (HTTP/1.1). nginx 1.22 leaves TLS 1.3 out of its
    default protocols and takes the client's order of cipher suites; with TLS 1.3
    allowed and its own order preferred it negotiates what Python's default
    server context does with the load generator (TLS 1.3, TLS_AES_256_GCM_SHA384).
    """
    listen = f"listen 127.0.0.1:{port};"
    if cert is not None:
        listen = (
            f"listen 127.0.0.1:{port} ssl;\n"
            f"        ssl_certificate {cert.cert};\n"
            f"        ssl_certificate_key {cert.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_prefer_server_ciphers on;"
        )
    return (
        nginx_head(workdir)
        + f"""    server {{
        {listen}
        location = /events {{
            nchan_subscriber eventsource;
            nchan_channel_id bench;
            # Like the other servers: a new client gets what is published next.
            nchan_subscriber_first_message newest;
        }}
        location = /publish {{
            nchan_publisher;
            nchan_channel_id bench;
        }}
    }}
}}
"""
    )


def _nchan(port: int, workdir: Path, cert: Cert | None) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(port, workdir, cert))
    return ["nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]


def _missing_peers() -> str | None:
    return None if PEERS_PYTHON.exists() else f"no peers virtualenv at {PEERS_VENV}"


def _missing_nchan() -> str | None:
    if shutil.which("nginx") is None:
        return "nginx is not installed (Debian: nginx)"
    if not NCHAN_MODULE.exists():
        return f"no {NCHAN_MODULE} (Debian: libnginx-mod-nchan)"
    return None


SERVERS = (
    Server(
        "sse_handler",
        "sse_handler's demo (`python -m sse_handler demo`; over TLS "
        "`bench/apps/sse_handler_tls_app.py`, the demo with `ssl_options` for its HTTPServer)",
        _sse_handler,
        lambda: None,
        metrics=True,
        tls=True,
    ),
    Server(
        "tornado",
        "hand-written Tornado RequestHandler, write + flush",
        _tornado,
        lambda: None,
        tls=True,
    ),
    Server(
        "sse-starlette",
        "sse-starlette on uvicorn (uvloop, httptools)",
        _starlette,
        _missing_peers,
    ),
    Server("aiohttp-sse", "aiohttp-sse on aiohttp", _aiohttp, _missing_peers),
    Server("nchan", "nginx + nchan (1 worker)", _nchan, _missing_nchan, tls=True),
    Server(
        "floor",
        "no framework: plain asyncio and sockets on the same Python, one regex per request "
        "head, one epoll for the streams (`bench/apps/floor_app.py`): what accepting and "
        "writing cost in Python itself; only with `--servers floor`",
        _floor,
        lambda: None,
        on_request=True,
    ),
)


#: The server of the frozen-readers scenarios: the demo with a write deadline
#: shorter than the run (bench/apps/sse_handler_frozen_app.py).
FROZEN_SERVER = Server(
    "sse_handler",
    "sse_handler's demo with `write_timeout = 2 s` and `max_queue_bytes = 256 KiB` "
    "(`bench/apps/sse_handler_frozen_app.py`)",
    _sse_handler_frozen,
    lambda: None,
    metrics=True,
)


def snapshot_library(servers: list[Server], dest: Path) -> tuple[list[Server], str]:
    """Serve sse_handler from a copy of ``sse_handler/`` taken now.

    Other people edit the library while the bench runs; without the copy, runs
    of one invocation could measure different code. ``python -m sse_handler``
    run in ``dest`` imports the copy (the current directory comes first on
    ``sys.path``, before an installed or editable one). Returns the servers and
    which commit the copy is.
    """
    commit = _commit()
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(
        REPO / "sse_handler", dest / "sse_handler", ignore=shutil.ignore_patterns("__pycache__")
    )
    return [replace(s, cwd=dest) if s.name == "sse_handler" else s for s in servers], commit


def snapshot_baseline(ref: str, dest: Path) -> tuple[Server, str]:
    """sse_handler as it was at git ``ref``, as one more server: ``sse_handler@<short>``.

    ``git archive <ref> sse_handler`` unpacked into ``dest``, and served from
    there as :func:`snapshot_library` serves the work tree's copy (same Python,
    same Tornado, same bench apps). Returns the server and the full commit;
    raises SystemExit if ``ref`` is not a commit with ``sse_handler/`` in it.
    """
    git = ["git", "-C", str(REPO)]
    found = subprocess.run(
        [*git, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"--baseline {ref}: not a commit of {REPO}")
    commit = found.stdout.strip()
    short = subprocess.run(
        [*git, "rev-parse", "--short", commit], capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        [*git, "archive", "--format=tar", commit, "sse_handler"], capture_output=True
    )
    if archive.returncode != 0:
        why = archive.stderr.decode(errors="replace").strip()
        raise SystemExit(f"--baseline {ref}: git archive failed: {why}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "sse_handler" / "demo" / "app.py").exists():
        raise SystemExit(f"--baseline {ref}: {short} has no sse_handler/demo/app.py")
    library = next(s for s in SERVERS if s.name == "sse_handler")
    server = replace(
        library,
        name=f"sse_handler@{short}",
        description=f"sse_handler at commit {short} (`--baseline {ref}`), served like "
        "sse_handler from `git archive` of its `sse_handler/`",
        cwd=dest,
    )
    return server, commit


def coalescing(library: Server, ms: float) -> Server:
    """sse_handler's demo with ``--coalesce-window MS``, as one more server;
    over TLS with the demo's own ``--tls-cert`` / ``--tls-key``."""

    def argv(port: int, workdir: Path, cert: Cert | None) -> list[str]:
        tls = [] if cert is None else ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
        return [*library.argv(port, workdir, None), "--coalesce-window", f"{ms:g}", *tls]

    return replace(
        library,
        name=f"sse_handler {ms:g} ms window",
        description=f"sse_handler's demo with `--coalesce-window {ms:g}` (events for one "
        f"stream within {ms:g} ms leave in one write)",
        argv=argv,
        tls=True,
    )


def make_cert(dest: Path) -> Cert:
    """A self-signed certificate for 127.0.0.1, made now with the ``openssl`` CLI.

    ECDSA P-256, the key unencrypted; raises OSError or CalledProcessError when
    ``openssl`` is missing or fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cert, key = dest / "cert.pem", dest / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "7",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        capture_output=True,
        check=True,
    )  # fmt: skip
    version = _first_line(["openssl", "version"])
    return Cert(cert, key, f"self-signed ECDSA P-256 for 127.0.0.1, made by {version}")


def ensure_peers(log: Callable[[str], None]) -> None:
    """Create bench/.venv-peers and install the pinned peers into it (once)."""
    stamp = PEERS_VENV / ".installed"
    wanted = PEERS_REQUIREMENTS.read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    log(f"installing the peers into {PEERS_VENV.relative_to(REPO)}")
    if not PEERS_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run(
        [str(PEERS_PYTHON), "-m", "pip", "install", "-q", "-r", str(PEERS_REQUIREMENTS)],
        check=True,
    )
    stamp.write_text(wanted)


def build_loadgen() -> Path:
    """``go build`` the load generator: standard library only, no network."""
    out = BUILD / "loadgen"
    env = {
        **os.environ,
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(BUILD / "go-cache"),
        "GOPATH": str(BUILD / "gopath"),
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        ["go", "build", "-o", str(out), "."], cwd=BENCH / "loadgen", env=env, check=True
    )
    return out


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return ((done.stdout or done.stderr).strip().splitlines() or ["unknown"])[0]


def _peer_versions() -> dict[str, str]:
    if not PEERS_PYTHON.exists():
        return {}
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({n: m.version(n) for n in "
        "('sse-starlette', 'starlette', 'uvicorn', 'uvloop', 'httptools', "
        "'aiohttp', 'aiohttp-sse', 'py-spy')}))"
    )
    done = subprocess.run([str(PEERS_PYTHON), "-c", code], capture_output=True, text=True)
    versions: dict[str, str] = json.loads(done.stdout) if done.returncode == 0 else {}
    return versions


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """Cores, kernel and every version that the figures depend on."""
    import tornado

    import sse_handler

    nchan = _first_line(["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"])
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tornado": tornado.version,
        "sse_handler": getattr(sse_handler, "__version__", None) or _dist_version("sse_handler"),
        "nginx": _first_line(["nginx", "-v"]).removeprefix("nginx version: "),
        "nchan": nchan,
        "go": _first_line(["go", "version"]).removeprefix("go version "),
        "peers": _peer_versions(),
    }


def _commit() -> str:
    """The commit measured, marked when sse_handler/ differs from it (others edit it too)."""
    head = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    try:
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "sse_handler"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return head
    return f"{head} + uncommitted changes in sse_handler/" if dirty else head


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
