"""Hot spots from a py-spy profile (``py-spy record --format raw``: collapsed stacks).

Each line of the profile is ``frame;frame;...;frame COUNT``, outermost first,
a frame being ``function (file:line)``. Samples are counted per function (the
line number dropped): *self* where the function is the innermost frame,
*total* where it is anywhere on the stack (once per stack).

py-spy reports a thread blocked in ``epoll_wait`` as active when native frames
are on; such samples are the event loop waiting, so they are counted apart and
the shares are of the remaining (*busy*) samples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HotSpots", "hot_spots", "render"]

_LINE = re.compile(r":\d+\)$")


_WAITING = ("epoll_wait ", "epoll_pwait ", "select ", "poll ")


@dataclass(frozen=True)
class HotSpots:
    samples: int  # busy samples
    waiting: int  # samples in epoll_wait
    self_counts: list[tuple[str, int]]
    total_counts: list[tuple[str, int]]


def _function(frame: str) -> str:
    """``send (sse_handler/connection.py:271)`` -> ``send (sse_handler/connection.py)``."""
    frame = _LINE.sub(")", frame.strip())
    # Keep paths short: from the package or library directory on.
    for marker in ("site-packages/", "/lib/python3", "/snapshot/", "/work/main/"):
        if marker in frame:
            head, _, tail = frame.partition("(")
            path = tail.rsplit(marker, 1)[-1]
            frame = f"{head}({path}"
    return frame


def hot_spots(path: Path, top: int = 15) -> HotSpots:
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        if frames[-1].startswith(_WAITING):
            waiting += n
            continue
        samples += n
        self_counts[frames[-1]] += n
        for name in set(frames):
            if not name.startswith("0x"):  # an unresolved native address
                total_counts[name] += n
    # The frames on (nearly) every stack are the event loop's own chain: no news.
    totals = [(k, v) for k, v in total_counts.most_common() if v < 0.9 * samples]
    return HotSpots(samples, waiting, self_counts.most_common(top), totals[:top])


def render(spots: HotSpots, seconds: float, rate: int) -> str:
    """A Markdown summary: shares of the busy samples."""
    if not spots.samples:
        return "The profile holds no samples.\n"
    lines = [
        f"{spots.samples:,} busy samples and {spots.waiting:,} in `epoll_wait` "
        f"(py-spy at {rate}/s for {seconds:g} s). Shares are of the busy samples; "
        "the event loop's own frames, on every stack, are left out of *total*.",
        "",
        "| self | function |",
        "|---:|---|",
    ]
    lines += [f"| {n / spots.samples:.1%} | `{name}` |" for name, n in spots.self_counts]
    lines += ["", "| total (incl. callees) | function |", "|---:|---|"]
    lines += [f"| {n / spots.samples:.1%} | `{name}` |" for name, n in spots.total_counts]
    return "\n".join(lines) + "\n"
