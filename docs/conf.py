"""Sphinx configuration of the sse_handler documentation.

The pages are Markdown (myst-parser); the API reference comes from the
docstrings (reST) through autodoc. The build runs with ``-W --keep-going -n``
(``tox -e docs``): every warning, every unresolved reference, is an error.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from docutils.nodes import Element
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util.nodes import make_refnode

DOCS = Path(__file__).resolve().parent
# Build from a checkout without installing it first.
sys.path.insert(0, str(DOCS.parent))

project = "sse_handler"
author = "sse_handler contributors"
copyright = "sse_handler contributors, MIT licence"

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
# Anchors for "page.md#a-heading" links, down to ###.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "sse_handler"
html_theme_options = {
    "description": "Server-Sent Events for Tornado",
    "fixed_sidebar": True,
    "page_width": "1240px",
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}

# nitpicky (-n) wants every type in a signature to resolve. There is no
# intersphinx (the build must not fetch inventories), so the standard
# library's and Tornado's / redis-py's / prometheus-client's classes cannot
# resolve; they are listed here, and nothing of sse_handler's own is.
nitpick_ignore_regex = [
    (r"py:(class|obj|exc|data)", r"(tornado|redis|prometheus_client)(\..+)?"),
    (
        r"py:(class|obj|exc|data)",
        r"(_?asyncio|socket|ssl|collections|collections\.abc|enum|types|typing|dataclasses)\..+",
    ),
    # Names that annotations use without their module (``from x import Y``
    # under ``from __future__ import annotations``).
    (
        r"py:(class|obj)",
        r"(Any|Awaitable|Callable|Collection|Iterable|Iterator|ClassVar|Protocol|"
        r"StrEnum|HTTPServerRequest|HTTPHeaders|RequestHandler|CollectorRegistry|"
        r"Collector|Counter|TracebackType)",
    ),
]


def _resolve_short_names(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
) -> Element | None:
    """Resolve ``:class:`ServerSentEventHandler``` from any module of the package.

    Docstrings name the package's classes without their module (the public
    name is ``sse_handler.X``; the object is documented where it is defined,
    ``sse_handler.handler.X``). When the exact lookup failed, try Python's
    "ends with .name" search, the one ``:class:`.X``` asks for; it only
    answers when exactly one object matches.
    """
    if node.get("refdomain") != "py" or node.get("refspecific"):
        return None
    target = node["reftarget"]
    # sse_handler.X (the re-export) -> the documented sse_handler.<module>.X
    short = target.removeprefix("sse_handler.")
    domain: Any = env.get_domain("py")
    matches = domain.find_obj(
        env, None, None, short, node["reftype"] if node["reftype"] != "obj" else None, 1
    )
    if len(matches) != 1:
        return None
    name, obj = matches[0]
    return make_refnode(app.builder, node["refdoc"], obj.docname, obj.node_id, contnode, name)


# docs/benchmarks.md is written by ``python -m bench`` (and committed with its
# numbers); the docs must build, warning-free, with or without it. A toctree
# naming a missing document warns, and a document in no toctree warns, so the
# link is decided here, when the index page is read.
BENCHMARKS_INDEX = "benchmarks-index"
_BENCHMARKS_PRESENT = """
The numbers, the scenarios, the machine and the method:
[Benchmark results](benchmarks.md).

```{toctree}
:hidden:

benchmarks
```
"""
_BENCHMARKS_ABSENT = """
The results page (`docs/benchmarks.md`) has not been written in this
checkout yet: run `python -m bench` to produce it.
"""


def _link_benchmarks(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname == BENCHMARKS_INDEX:
        present = (Path(app.srcdir) / "benchmarks.md").is_file()
        source[0] += _BENCHMARKS_PRESENT if present else _BENCHMARKS_ABSENT


ROOT_PAGE = "index"
_TOCTREE = re.compile(r"^```\{toctree\}\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _unlisted_pages(srcdir: Path) -> list[str]:
    """Top-level pages that no toctree names (other work adds pages to docs/).

    A page in no toctree fails the build; rather than that, the root page
    lists such pages under "More", so a new page shows up in the navigation.
    """
    listed = {ROOT_PAGE, "benchmarks"}  # benchmarks: see _link_benchmarks
    for page in srcdir.rglob("*.md"):
        if "_build" in page.parts:
            continue
        folder = page.parent.relative_to(srcdir)
        for block in _TOCTREE.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                entry = line.strip()
                if entry and not entry.startswith(":"):
                    listed.add((folder / entry).as_posix().removeprefix("./"))
    return sorted(p.stem for p in srcdir.glob("*.md") if p.stem not in listed)


def _list_unlisted_pages(app: Sphinx, docname: str, source: list[str]) -> None:
    if docname == ROOT_PAGE:
        pages = _unlisted_pages(Path(app.srcdir))
        if pages:
            source[0] += "\n```{toctree}\n:caption: More\n:maxdepth: 2\n\n"
            source[0] += "\n".join(pages) + "\n```\n"


PACKAGE_PAGE = "api/sse_handler"


def _list_public_names(app: Sphinx, docname: str, source: list[str]) -> None:
    """The package page lists ``sse_handler.__all__``, read at build time.

    Each name links to where it is defined; a name added to ``__all__`` appears
    here by itself, and one that is not documented anywhere fails the build.
    """
    if docname != PACKAGE_PAGE:
        return
    import sse_handler

    rows = [
        f"| {{py:obj}}`{name} <sse_handler.{name}>` | `{getattr(sse_handler, name).__module__}` |"
        for name in sse_handler.__all__
    ]
    source[0] += "\n".join(
        ["", "## Public names", "", "| name | defined in |", "|---|---|", *rows, ""]
    )


def _reread_generated(
    app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    # Their text depends on other files: read them again on every build, so an
    # incremental build notices benchmarks.md or a new page appearing, or
    # __all__ changing.
    return [BENCHMARKS_INDEX, PACKAGE_PAGE, ROOT_PAGE]


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", _resolve_short_names)
    app.connect("source-read", _link_benchmarks)
    app.connect("source-read", _list_public_names)
    app.connect("source-read", _list_unlisted_pages)
    app.connect("env-get-outdated", _reread_generated)
    return {"parallel_read_safe": True}
