"""The servers under test, the peers' virtualenv, and the load generator's build.

Every server serves ``GET /events`` (the broadcast stream) and ``POST /publish``
(body = event data, sent to every client) on 127.0.0.1. Each is started as its
own process tree; :mod:`bench.run` pins it to one core.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "BENCH",
    "BUILD",
    "FROZEN_SERVER",
    "REPO",
    "SERVERS",
    "Server",
    "build_loadgen",
    "ensure_peers",
    "machine_info",
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
class Server:
    """How to start one server: ``argv(port, workdir)`` run in ``cwd``, and why it cannot
    run here."""

    name: str
    description: str
    argv: Callable[[int, Path], list[str]]
    missing: Callable[[], str | None]
    cwd: Path = REPO
    #: Serves Prometheus metrics at ``/metrics`` (read after each run).
    metrics: bool = False


def _sse_handler(port: int, workdir: Path) -> list[str]:
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


def _sse_handler_frozen(port: int, workdir: Path) -> list[str]:
    return [
        sys.executable,
        str(APPS / "sse_handler_frozen_app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _tornado(port: int, workdir: Path) -> list[str]:
    return [sys.executable, str(APPS / "tornado_app.py"), "--port", str(port)]


def _starlette(port: int, workdir: Path) -> list[str]:
    return [
        str(PEERS_PYTHON), "-m", "uvicorn", "--app-dir", str(APPS), "starlette_app:app",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip


def _aiohttp(port: int, workdir: Path) -> list[str]:
    return [str(PEERS_PYTHON), str(APPS / "aiohttp_app.py"), "--port", str(port)]


def nginx_conf(port: int, workdir: Path) -> str:
    """One worker, one channel: nchan's eventsource subscriber and its publisher."""
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
    worker_connections 20000;
}}
http {{
    access_log off;
{temp}
    server {{
        listen 127.0.0.1:{port};
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


def _nchan(port: int, workdir: Path) -> list[str]:
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(port, workdir))
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
        "sse_handler's demo (`python -m sse_handler demo`)",
        _sse_handler,
        lambda: None,
        metrics=True,
    ),
    Server(
        "tornado", "hand-written Tornado RequestHandler, write + flush", _tornado, lambda: None
    ),
    Server(
        "sse-starlette",
        "sse-starlette on uvicorn (uvloop, httptools)",
        _starlette,
        _missing_peers,
    ),
    Server("aiohttp-sse", "aiohttp-sse on aiohttp", _aiohttp, _missing_peers),
    Server("nchan", "nginx + nchan (1 worker)", _nchan, _missing_nchan),
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
