"""The fenced code blocks of the project's Markdown, with the marker each carries.

A marker is an HTML comment on the line right before a block's opening fence,
``<!-- fragment -->`` or ``<!-- serves: /events -->``: invisible in the rendered
pages, read by the tests (the conventions are in docs/testing.md).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<marker>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, marker and text (dedented)."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    marker: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def markdown_files() -> list[Path]:
    """README.md and every page of docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        assert end < len(lines), f"{path}:{i + 1}: a fenced block that never closes"
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        blocks.append(
            Block(
                path=path,
                line=i + 1,
                language=opening["info"].strip().split(" ")[0],
                marker=None if marker is None else marker["marker"],
                text=textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n",
            )
        )
        i = end + 1
    return blocks


def blocks_in(language: str, paths: list[Path] | None = None) -> list[Block]:
    """Every block of ``language`` in ``paths`` (default: :func:`markdown_files`)."""
    return [
        block
        for path in (markdown_files() if paths is None else paths)
        for block in fenced_blocks(path)
        if block.language == language
    ]
