"""The command line as a user meets it: ``sse-handler`` and ``python -m sse_handler``
run as subprocesses on real ports, judged by their exit status and stderr.

A mistake of the user's is one line on stderr (after argparse's usage line for
a usage error), exit status 2 for usage and 1 otherwise, never a traceback.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer
from support import DemoProcess, free_port
from tornado.testing import bind_unused_port

import sse_handler
from sse_handler.testing import EventStreamClient

#: The console script that installing the package put next to this interpreter.
SCRIPT = Path(sys.executable).with_name("sse-handler")


def _env(**extra: str) -> dict[str, str]:
    """The environment for the CLI: the sse_handler these tests import first on the path."""
    root = str(Path(sse_handler.__file__).resolve().parent.parent)
    paths = [*extra.pop("PYTHONPATH", "").split(os.pathsep), root, os.environ.get("PYTHONPATH")]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def run(*args: str, module: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    """``sse-handler ARGS`` (``python -m sse_handler ARGS`` with ``module``), to its end.

    A command that starts serving instead of failing fails the test on the timeout.
    """
    command = [sys.executable, "-m", "sse_handler"] if module else [str(SCRIPT)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=20, env=_env(**env)
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start leaves on stderr."""
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    return line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port that another socket listens on."""
    sock, port = bind_unused_port()
    try:
        yield port
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that is bound but not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# --- names and version ---------------------------------------------------------------------


def test_the_script_is_installed() -> None:
    assert SCRIPT.is_file(), f"no console script at {SCRIPT}: is the package installed?"


def test_help_of_the_script_names_the_script() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: sse-handler [-h] [--version] {demo}")
    assert "python -m" not in result.stdout


def test_help_of_a_command_of_the_script_names_the_script() -> None:
    result = run("demo", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: sse-handler demo [-h]")


def test_help_of_the_module_names_the_module() -> None:
    result = run("--help", module=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m sse_handler [-h] [--version] {demo}")


@pytest.mark.parametrize("module", [False, True], ids=["script", "module"])
def test_version_is_the_installed_distribution(module: bool) -> None:
    result = run("--version", module=module)
    assert result.returncode == 0
    assert result.stdout == f"sse-handler {importlib.metadata.version('sse_handler')}\n"
    assert result.stderr == ""


# --- usage errors: exit status 2 -------------------------------------------------------------


def test_an_unknown_command_is_a_usage_error() -> None:
    result = run("serve")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sse-handler ")
    assert "invalid choice: 'serve'" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_a_redis_url_without_scheme_is_a_usage_error() -> None:
    result = run("demo", "--port", str(free_port()), "--redis", "127.0.0.1:6379")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: sse-handler demo ")
    assert result.stderr.splitlines()[-1] == (
        "sse-handler demo: error: --redis 127.0.0.1:6379: "
        "not a Redis URL (redis://, rediss:// or unix://)"
    )
    assert "Traceback" not in result.stderr


# --- cannot start: exit status 1 ------------------------------------------------------------


def test_a_port_in_use(taken_port: int) -> None:
    result = run("demo", "--port", str(taken_port))
    assert result.returncode == 1
    assert error_line(result) == (
        f"sse-handler demo: error: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
    )


def test_a_port_in_use_through_python_m(taken_port: int) -> None:
    result = run("demo", "--port", str(taken_port), module=True)
    assert result.returncode == 1
    assert error_line(result).startswith("python -m sse_handler demo: error: cannot listen on ")


def test_a_host_that_does_not_resolve() -> None:
    result = run("demo", "--host", "no-such-host.invalid", "--port", str(free_port()))
    assert result.returncode == 1
    assert error_line(result).startswith(
        "sse-handler demo: error: cannot listen on no-such-host.invalid:"
    )


def test_redis_without_the_redis_extra(tmp_path: Path, closed_port: int) -> None:
    # A `redis` package first on the path that fails to import, as when the
    # extra is not installed.
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'redis'\")\n"
    )
    result = run(
        "demo",
        "--port", str(free_port()),
        "--redis", f"redis://127.0.0.1:{closed_port}/0",
        PYTHONPATH=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert error_line(result) == (
        "sse-handler demo: error: --redis needs the redis extra: pip install 'sse_handler[redis]'"
    )


def test_redis_that_does_not_answer_at_start(closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    result = run("demo", "--port", str(free_port()), "--redis", url)
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"sse-handler demo: error: no Redis answers at --redis {url}: ")
    assert "Connection refused" in line or "Connect call failed" in line


def test_the_redis_password_stays_out_of_the_error(closed_port: int) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{closed_port}/0"
    result = run("demo", "--port", str(free_port()), "--redis", url)
    assert result.returncode == 1
    line = error_line(result)
    assert "s3cret" not in line
    assert f"--redis redis://user:***@127.0.0.1:{closed_port}/0: " in line


def test_tls_files_that_do_not_exist(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    result = run(
        "demo", "--port", str(free_port()), "--tls-cert", str(cert), "--tls-key", str(key)
    )
    assert result.returncode == 1
    assert error_line(result) == (
        f"sse-handler demo: error: cannot read --tls-cert {cert}: No such file or directory"
    )


# --- and what does start ----------------------------------------------------------------------


async def test_redis_that_answers_serves_the_demo(redis_server: RedisServer) -> None:
    demo = DemoProcess("--redis", redis_server.url, keep_stderr=True)
    try:
        await demo.start()
        status, published = await demo.publish("through Redis")
    finally:
        returncode = await demo.stop()
    assert (status, published["delivered_to"]) == (200, 0)
    assert returncode == 0, demo.stderr
    assert "Traceback" not in demo.stderr


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        *(("--coalesce-window", v, "milliseconds >= 0") for v in ("-5", "inf", "nan", "soon")),
        *(("--history-size", v, "a positive number of events") for v in ("0", "-3", "1.5", "x")),
    ],
)
def test_a_number_out_of_its_range_is_a_usage_error(flag: str, value: str, expected: str) -> None:
    result = run("demo", "--port", str(free_port()), f"{flag}={value}")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"sse-handler demo: error: argument {flag}: expected {expected}, not {value!r}"
    )
    assert "Traceback" not in result.stderr


async def test_the_history_size_bounds_what_a_client_can_resume_from() -> None:
    # Two events kept per channel: after four, a client that read only the
    # first has missed one the history no longer holds (a reset); one that
    # read the second gets the last two.
    demo = DemoProcess("--history-size", "2", keep_stderr=True)
    try:
        await demo.start()
        ids = [(await demo.publish(f"event {n}"))[1]["id"] for n in range(4)]
        resumed = {}
        for last in ids[:2]:
            client = await EventStreamClient.connect(demo.url + "/events", {"Last-Event-ID": last})
            try:
                events = [await client.next_event()]
                while events[-1].event != "welcome":
                    events.append(await client.next_event())
            finally:
                client.close()
            resumed[last] = [(e.event, e.data) for e in events[:-1]]
    finally:
        returncode = await demo.stop()
    assert resumed[ids[0]] == [("reset", '{"reason":"history_exceeded"}')]
    assert resumed[ids[1]] == [("message", "event 2"), ("message", "event 3")]
    assert returncode == 0, demo.stderr


async def test_the_coalesce_window_sends_events_of_one_window_together() -> None:
    # A window long enough for two publishes: both events leave in one write,
    # so they are in the stream's first read after the welcome.
    demo = DemoProcess("--coalesce-window", "500", keep_stderr=True)
    try:
        await demo.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", demo.port)
        try:
            writer.write(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{demo.port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"event: welcome"), 5)
            await asyncio.wait_for(reader.readuntil(b"\n\n\r\n"), 5)
            first = await demo.publish("one")
            second = await demo.publish("two")
            both = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
    finally:
        returncode = await demo.stop()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (first[0], second[0]) == (200, 200)
    assert both.count(b"data: ") == 2, both
    assert both.index(b"data: one") < both.index(b"data: two")
    assert returncode == 0, demo.stderr


async def test_a_demo_whose_port_was_taken_meanwhile_starts_on_another() -> None:
    """The tests' DemoProcess picks a free port before the demo binds it;
    taken in between, the demo says "cannot listen on" and starts again."""
    taken = socket.socket()  # bound, not listening: as an outgoing connection's end
    taken.bind(("127.0.0.1", 0))
    demo = DemoProcess()
    demo._listen_on(taken.getsockname()[1])
    try:
        await demo.start()
        assert demo.port != taken.getsockname()[1]
        assert (await demo.fetch("/")).code == 200
    finally:
        taken.close()
        await demo.stop()
