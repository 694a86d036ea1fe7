"""The cells of the bench's Markdown tables, shared by its reports: medians
that skip the runs a figure does not apply to (NaN), numbers, run-by-run
lists and ratios, with a dash where there is nothing."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

X = "\N{MULTIPLICATION SIGN}"
NONE = "\N{EN DASH}"


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def fmt(v: float, spec: str = ".2f") -> str:
    return NONE if v != v else format(v, spec)


def runs(values: Sequence[float], spec: str = ".2f") -> str:
    return ", ".join(fmt(v, spec) for v in values)


def ratio(a: float, b: float) -> str:
    return NONE if a != a or b != b or b == 0 else f"{a / b:.2f}{X}"
