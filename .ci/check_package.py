"""The release as PyPI would get it, checked end to end (``tox -e package``).

1. ``python -m build``: the sdist, then the wheel built from that sdist.
2. ``twine check --strict`` on both.
3. Their contents: the sdist holds every tracked file of tests/, docs/,
   examples/ and bench/, .ci/, LICENSE, CHANGELOG.md, README.md, tox.ini; the
   wheel holds the package with ``py.typed``, the demo page and LICENSE, and
   no tests.
4. The wheel alone in a fresh virtualenv: ``import sse_handler`` from there,
   ``py.typed`` beside it, ``sse-handler --version``, and ``sse-handler demo``
   on a free port serving ``/`` (200) and ``/events`` (an event stream) until
   SIGTERM, after which it exits 0.
5. The tests of the unpacked sdist against that installed wheel (with the
   ``test`` extra): the sdist's own ``sse_handler/`` is moved aside first, so
   the tests can only import the wheel's.

Usage: ``python .ci/check_package.py [PYTEST ARGS]`` (default: the tests in
``SDIST_TESTS``). Needs ``build`` and ``twine``; everything else is made in a
temporary directory and removed.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Shipped whole in the sdist: every file git tracks under these.
SHIPPED_TREES = ("tests", "docs", "examples", "bench")
SHIPPED_FILES = (
    ".ci/run",
    ".ci/check_package.py",
    "LICENSE",
    "CHANGELOG.md",
    "README.md",
    "tox.ini",
    "pyproject.toml",
    "MANIFEST.in",
)
#: What the unpacked sdist runs by default: the wire format, the handler, the
#: command line of the installed script and the typed surface of the wheel.
SDIST_TESTS = (
    "tests/test_event.py",
    "tests/test_parser.py",
    "tests/test_handler.py",
    "tests/test_public_api.py",
    "tests/test_typed_surface.py",
    "tests/test_cli.py",
)


class CheckFailed(Exception):
    pass


def step(title: str) -> None:
    print(f"\n=== check_package: {title}", flush=True)


def sh(*command: str | Path, cwd: Path | None = None) -> str:
    """Run ``command``; its output is echoed, and returned."""
    print("$", " ".join(map(str, command)), flush=True)
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        raise CheckFailed(f"exit status {result.returncode}: {' '.join(map(str, command))}")
    return result.stdout


def build(dist: Path) -> tuple[Path, Path]:
    step("build the sdist, and the wheel from it")
    sh(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    step("twine check --strict")
    sh(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
    return sdist, wheel


def tracked(tree: str) -> set[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", tree], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {line for line in out.splitlines() if (ROOT / line).is_file()}


def check_contents(sdist: Path, wheel: Path) -> None:
    step("the contents of the sdist and the wheel")
    with tarfile.open(sdist) as tar:
        names = {name.partition("/")[2] for name in tar.getnames()}
    wanted = set(SHIPPED_FILES)
    if (ROOT / ".git").exists():
        for tree in SHIPPED_TREES:
            wanted |= tracked(tree)
    else:  # checked from an unpacked sdist: what it holds must survive a rebuild
        wanted |= {"tests/conftest.py", "tests/support.py", "tests/redis_server.py"}
    missing = sorted(wanted - names)
    if missing:
        raise CheckFailed(f"the sdist lacks {len(missing)} files: {missing[:20]}")
    junk = sorted(n for n in names if "__pycache__" in n or n.startswith("bench/.build"))
    if junk:
        raise CheckFailed(f"the sdist holds build products: {junk[:20]}")
    with zipfile.ZipFile(wheel) as whl:
        members = set(whl.namelist())
    for needed in (
        "sse_handler/py.typed",
        "sse_handler/demo/page.html",
        "sse_handler/__main__.py",
    ):
        if needed not in members:
            raise CheckFailed(f"the wheel lacks {needed}")
    if not any(m.endswith(".dist-info/licenses/LICENSE") for m in members):
        raise CheckFailed("the wheel lacks LICENSE in its .dist-info/licenses/")
    strays = sorted(
        m for m in members if m.split("/")[0] in ("tests", "bench", "examples", "docs")
    )
    if strays:
        raise CheckFailed(f"the wheel holds files outside the package: {strays[:20]}")
    print(f"sdist: {len(names)} files, all {len(wanted)} expected; wheel: {len(members)} files")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    """GET ``path``: status, Content-Type and the first bytes of the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read1(65536)
    finally:
        conn.close()


def smoke_test(venv: Path, wheel: Path, outside: Path) -> None:
    step("the wheel alone in a fresh virtualenv")
    sh(sys.executable, "-m", "venv", venv)
    python, script = venv / "bin" / "python", venv / "bin" / "sse-handler"
    sh(python, "-m", "pip", "install", "--quiet", wheel)
    where = sh(
        python,
        "-c",
        "import importlib.metadata, pathlib, sse_handler; "
        "p = pathlib.Path(sse_handler.__file__).parent; "
        "assert (p / 'py.typed').is_file(), 'no py.typed'; "
        "print(p); print(importlib.metadata.version('sse_handler'))",
        cwd=outside,
    )
    if not where.splitlines()[0].startswith(str(venv)):
        raise CheckFailed(f"sse_handler imported from outside the virtualenv: {where}")
    sh(script, "--version", cwd=outside)

    step("sse-handler demo from the wheel: / and /events")
    port = free_port()
    demo = subprocess.Popen([script, "demo", "--port", str(port)], cwd=outside)
    try:
        deadline = time.monotonic() + 20
        while True:
            if demo.poll() is not None:
                raise CheckFailed(f"sse-handler demo exited with {demo.returncode}")
            try:
                status, ctype, body = get(port, "/", {})
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise CheckFailed("sse-handler demo did not serve / within 20 s") from None
                time.sleep(0.1)
        if status != 200 or not ctype.startswith("text/html") or b"EventSource" not in body:
            raise CheckFailed(f"GET / answered {status} {ctype}: {body[:200]!r}")
        print(f"GET / {status} {ctype!r}")
        status, ctype, body = get(port, "/events", {"Accept": "text/event-stream"})
        if status != 200 or not ctype.startswith("text/event-stream") or not body.startswith(b":"):
            raise CheckFailed(f"GET /events answered {status} {ctype}: {body[:200]!r}")
        print(f"GET /events {status} {ctype!r}, first bytes {body[:40]!r}")
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        try:
            returncode = demo.wait(15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
            raise CheckFailed("sse-handler demo did not stop within 15 s of SIGTERM") from None
    if returncode != 0:
        raise CheckFailed(f"sse-handler demo exited with {returncode} after SIGTERM")


def sdist_tests(
    venv: Path, wheel: Path, sdist: Path, unpack: Path, pytest_args: list[str]
) -> None:
    step("the tests of the unpacked sdist, against the installed wheel")
    python = venv / "bin" / "python"
    sh(python, "-m", "pip", "install", "--quiet", f"{wheel}[test]")
    with tarfile.open(sdist) as tar:
        tar.extractall(unpack, filter="data")
    [src] = unpack.iterdir()
    # The tests must import the wheel's sse_handler, never the sdist's copy.
    (src / "sse_handler").rename(src / "sse_handler.not-imported")
    # The venv's pytest script, not `python -m pytest`: the latter puts the
    # working directory on sys.path.
    sh(venv / "bin" / "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args, cwd=src)


def main(pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="sse-check-package-") as tmp:
        work = Path(tmp)
        (work / "outside").mkdir()
        try:
            sdist, wheel = build(work / "dist")
            check_contents(sdist, wheel)
            smoke_test(work / "venv", wheel, work / "outside")
            sdist_tests(
                work / "venv", wheel, sdist, work / "sdist", pytest_args or list(SDIST_TESTS)
            )
        except CheckFailed as exc:
            print(f"\ncheck_package: FAILED: {exc}", file=sys.stderr)
            return 1
    print("\ncheck_package: the sdist and the wheel are fit to publish")
    return 0


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)  # nothing from the checkout leaks into the venv
    sys.exit(main(sys.argv[1:]))
