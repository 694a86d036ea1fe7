"""Every Python snippet of README.md and docs/*.md runs as written, or says it is a fragment.

The conventions (docs/testing.md, "The documentation's snippets"):

- ``<!-- fragment -->`` before the fence: a piece of a program (names from
  around it, top-level ``await``); it must compile, nothing more.
- A block that starts with ``>>>``: an interpreter session, checked with doctest.
- ``<!-- serves: /path -->`` before the fence: a whole program that listens on
  port 8888 until it is stopped. It runs in its own interpreter with 8888
  replaced by a free port, and must answer ``GET /path`` with an event stream
  whose first event arrives.
- Anything else: a whole program. It runs in its own interpreter (warnings are
  errors), must exit with status 0 and print nothing on stderr; then every
  ``test_*`` function it defines is called too.
"""

from __future__ import annotations

import ast
import asyncio
import doctest
import subprocess
import sys
from pathlib import Path

import pytest
from doc_blocks import Block, blocks_in
from support import free_port

from sse_handler.testing import EventStreamClient

SNIPPETS = blocks_in("python")
PORT_IN_DOCS = "8888"

# Runs a snippet file as __main__, then the test functions it defines.
_RUN_PROGRAM = """\
import runpy, sys
namespace = runpy.run_path(sys.argv[1], run_name="__main__")
for name, value in list(namespace.items()):
    if name.startswith("test_") and callable(value):
        value()
"""


def kind(block: Block) -> str:
    if block.marker == "fragment":
        return "fragment"
    if block.marker is not None and block.marker.startswith("serves: /"):
        return "serves"
    assert block.marker is None, f"{block.where}: unknown marker <!-- {block.marker} -->"
    if block.text.lstrip().startswith(">>>"):
        return "session"
    return "program"


def by_kind(wanted: str) -> list[pytest.ParameterSet]:
    return [pytest.param(b, id=b.where) for b in SNIPPETS if kind(b) == wanted]


def test_every_snippet_has_a_known_kind() -> None:
    # `kind` fails on a misspelt marker; every convention is in use.
    assert len(SNIPPETS) > 20
    kinds = {kind(block) for block in SNIPPETS}
    assert kinds == {"fragment", "serves", "session", "program"}


@pytest.mark.parametrize("block", by_kind("fragment"))
def test_fragment_compiles(block: Block) -> None:
    compile(block.text, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("block", by_kind("session"))
def test_session_gives_what_it_shows(block: Block) -> None:
    test = doctest.DocTestParser().get_doctest(
        block.text, {}, block.where, str(block.path), block.line
    )
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{block.where}: the session's output differs (see above)"


@pytest.mark.parametrize("block", by_kind("program"))
def test_program_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.text, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _RUN_PROGRAM, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, ""), f"{block.where}:\n{done.stderr}"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("block", by_kind("serves"))
async def test_server_program_serves(block: Block, tmp_path: Path) -> None:
    assert block.marker is not None
    path = block.marker.removeprefix("serves: ")
    assert block.text.count(PORT_IN_DOCS) == 1, f"{block.where}: listens on {PORT_IN_DOCS} once"
    port = free_port()
    script = tmp_path / "snippet.py"
    script.write_text(block.text.replace(PORT_IN_DOCS, str(port)), encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-W", "error", str(script), cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    try:
        client = await connect_when_listening(f"http://127.0.0.1:{port}{path}", proc)
        async with client:
            assert client.status == 200
            assert client.headers["Content-Type"].startswith("text/event-stream")
            await client.next_event(timeout=10)
        assert proc.returncode is None, "the program stopped serving"
    finally:
        if proc.returncode is None:
            proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    # SIGTERM ends Python silently: anything on stderr came from the program.
    assert stderr == b"", stderr.decode(errors="replace")


async def connect_when_listening(
    url: str, proc: asyncio.subprocess.Process, timeout: float = 20.0
) -> EventStreamClient:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert proc.returncode is None, "the program exited instead of serving"
        try:
            return await EventStreamClient.connect(url)
        except ConnectionRefusedError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
