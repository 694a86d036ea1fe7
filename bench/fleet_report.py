"""The figures of the one-process scenarios (bench/fleet.py) and their section of
docs/benchmarks.md: the storm's table, the fleet's table at each size, and what
100,000 streams per process would cost, from how each figure grows."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from .fleet import BROADCASTS, FLEET, KEEPALIVE, LIVE, LIVE_RATE, PER_LOADGEN, WINDOW
from .scaleout import STORM_WORST
from .scaleout import figures as storm_figures
from .servers import BUILD
from .tables import NONE, X
from .tables import fmt as _fmt
from .tables import median as _median
from .tables import ratio as _ratio
from .tables import runs as _runs

__all__ = ["SECTION", "extrapolate", "figures", "latest_results", "section"]

SECTION = "## One process: a reconnect storm and the biggest fleet"
NAN = math.nan
#: Issue 15's targets.
RSS_TARGET_KIB = 4.0
P99_TARGET = 1.5
TARGET = 100_000
#: A figure that changes by less than this fraction of its median over the
#: sizes (which grow about tenfold) is shown flat. Not a ratio of the largest
#: to the smallest: a figure with a large fixed part (RSS, the interpreter
#: and the application) grows with the streams and still stays within 2x.
FLAT = 0.5


def figures(r: dict[str, Any]) -> dict[str, float]:
    """One run's figures (NaN where a figure does not apply)."""
    if FLEET[r["scenario"]].kind == "storm":
        return storm_figures(r)
    live = r["live_connected"]
    streams = live["connected"] + sum(c["connected"] for c in r["idle_connected"])
    idle = sum(c["connected"] for c in r["idle_connected"])
    out: dict[str, float] = {
        "streams": streams,
        "failed_open": live["failed"] + sum(c["failed"] for c in r["idle_connected"]),
        "accept_s": r["accept_seconds"],
        "accept_cpu_us": r["accept_cpu_seconds"] / idle * 1e6 if idle else NAN,
        "rss_per_stream_kib": (r["rss_after"] - r["rss_before"]) / max(streams, 1) / 1024,
        "rss_mib": r["rss_after"] / 2**20,
    }
    for window in ("alone", "beside"):
        w = r[window]
        d = w["done"]
        lat = d["latency_ms"]
        out[f"{window}_p50"] = lat.get("p50", NAN)
        out[f"{window}_p99"] = lat.get("p99", NAN)
        out[f"{window}_max"] = lat.get("max", NAN)
        out[f"{window}_lost"] = d["expected"] - d["received"]
        out[f"{window}_cpu"] = w["server_cpu_seconds"] / w["wall_seconds"]
        out[f"{window}_others"] = w["others"]
        sweep = w.get("sweep")
        if sweep and sweep["period"]:
            periods = w["wall_seconds"] / sweep["period"]
            out[f"{window}_sweep_ms"] = sweep["seconds"] / periods * 1e3
            out[f"{window}_sweep_max_ms"] = sweep["max_seconds"] * 1e3
            out[f"{window}_sweep_p99_ms"] = sweep.get("p99_seconds", NAN) * 1e3
            out[f"{window}_sweep_callbacks"] = sweep["callbacks"] / periods
    for q in ("p50", "p99"):
        a, b = out["alone_" + q], out["beside_" + q]
        out[q + "_ratio"] = b / a if a == a and b == b and a else NAN
    last, lost, failed = [], 0, 0
    for b in r["broadcasts"]:
        awaited = b["awaited"]
        lost = max(lost, sum(a["expected"] - a["received"] for a in awaited))
        failed += sum(1 for s in b["statuses"] if not 200 <= s < 300)
        ends = [a["last_recv_ns"] for a in awaited if a["received"]]
        complete = all(a["received"] >= a["expected"] for a in awaited)
        last.append((max(ends) - b["stamp_ns"]) / 1e6 if ends and complete else NAN)
    ok = [v for v in last if v == v]
    out["broadcast_ms"] = statistics.median(ok) if ok else NAN
    out["broadcast_lost"] = lost
    out["broadcast_failed"] = failed
    return out


def _load(path: Any) -> dict[str, Any] | None:
    try:
        results = dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    return results if {"argv", "scenarios", "runs", "machine"} <= results.keys() else None


def latest_results() -> list[dict[str, Any]]:
    """bench/.build/fleet-results-*.json, oldest first."""
    loaded = (_load(p) for p in sorted(BUILD.glob("fleet-results-*.json")))
    return [r for r in loaded if r is not None]


def _pick(candidates: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Scenario -> the latest results that completed a run of it (else that tried it)."""
    out: dict[str, dict[str, Any]] = {}
    for name in FLEET:
        tried = [r for r in candidates if any(sc["name"] == name for sc in r["scenarios"])]
        ran = [r for r in tried if any(run["scenario"] == name for run in r["runs"])]
        if tried:
            out[name] = (ran or tried)[-1]
    return out


class _Figures:
    """Per-run figures by scenario and server, from the results picked for each."""

    def __init__(self, picks: dict[str, dict[str, Any]]) -> None:
        self.runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        for name, results in picks.items():
            for r in results["runs"]:
                if r["scenario"] == name:
                    self.runs.setdefault(name, {}).setdefault(r["server"], []).append(figures(r))

    def col(self, sc: str, server: str, key: str) -> list[float]:
        return [f.get(key, NAN) for f in self.runs.get(sc, {}).get(server, [])]

    def med(self, sc: str, server: str, key: str) -> float:
        return _median(self.col(sc, server, key))

    def worst(self, sc: str, server: str, key: str) -> float:
        values = [v for v in self.col(sc, server, key) if v == v]
        return max(values) if values else NAN

    def paired(self, sc: str, key: str) -> list[float]:
        a, b = self.col(sc, "sse_handler", key), self.col(sc, "nchan", key)
        return [x / y if y else NAN for x, y in zip(a, b, strict=False)]


def extrapolate(sizes: Sequence[float], values: Sequence[float], at: float) -> float:
    """The least-squares line through (size, value), at ``at``."""
    points = [(s, v) for s, v in zip(sizes, values, strict=True) if v == v]
    if len(points) < 2:
        return NAN
    slope, intercept = statistics.linear_regression(*zip(*points, strict=True))
    return intercept + slope * at


def _sources(picks: dict[str, dict[str, Any]]) -> list[str]:
    out = ["| scenarios | measured | with | commit | runs |", "|---|---|---|---|---:|"]
    by_file: dict[int, list[str]] = {}
    results = {id(r): r for r in picks.values()}
    for name, r in picks.items():
        by_file.setdefault(id(r), []).append(name)
    for key, names in by_file.items():
        r = results[key]
        out.append(
            f"| {', '.join(names)} | {r['date']} | `python -m bench {' '.join(r['argv'])}` | "
            f"{r['machine'].get('commit', '?')} | {r['run_count']} |"
        )
    return out


def _storm(f: _Figures, servers: list[str]) -> list[str]:
    sc = FLEET["storm9000"]
    out = [
        f"### Reconnect storm: {sc.title}",
        "",
        f"{sc.conns:,} clients on one process get {sc.pre} events (published at "
        f"{sc.rate:g}/s); the load generator closes every stream at once, waits 0.5 s, "
        f"publishes {sc.missed} events at {sc.rate:g}/s, waits 0.5 s, then opens all the "
        "streams again at once (no limit on concurrent dials), each with the id of the "
        "last event it read as `Last-Event-ID`, to the same process: the replay comes from "
        "its memory (sse_handler's MemoryBroker, nchan's memory store with 1,000 messages "
        "per channel). *Replay done* = from the first reconnect dial to the moment a client "
        "has every event (the last client: the storm's length). Lost = (events x clients) - "
        "distinct (client, event) received; duplicated = an event a client received twice "
        "over its connections. A stream the server closes after the reconnect comes back "
        "after the `retry` it sent (3 s without one), as an EventSource does.",
        "",
        "| figure | " + " | ".join(servers) + " | sse_handler ÷ nchan | paired |",
        "|---|" + "---:|" * len(servers) + "---:|---|",
    ]
    name = sc.name
    for label, key, spec in (
        ("last client's replay done (s)", "replay_s", ".3f"),
        ("replay done p50 ms", "replay_p50_ms", ".0f"),
        ("replay done p99 ms", "replay_p99_ms", ".0f"),
        ("all reconnected: last head (s)", "reconnect_s", ".3f"),
        ("server CPU µs / replayed delivery", "cpu_us_per_delivery", ".2f"),
        (f"first accept of the {sc.conns:,} (s)", "accept_s", ".2f"),
    ):
        cells = [_fmt(f.med(name, s, key), spec) for s in servers]
        ratio = _ratio(f.med(name, "sse_handler", key), f.med(name, "nchan", key))
        out.append(
            f"| {label} | " + " | ".join(cells) + f" | {ratio} | {_runs(f.paired(name, key))} |"
        )
    for label, key in STORM_WORST:
        cells = [_fmt(f.worst(name, s, key), ".0f") for s in servers]
        out.append(f"| {label} | " + " | ".join(cells) + " | | |")
    out.append("")
    for s in servers:
        complete = [
            f"{c:.0f}/{n:.0f}"
            for c, n in zip(
                f.col(name, s, "complete"), f.col(name, s, "reconnecting"), strict=True
            )
        ]
        out.append(
            f"- {s}, run by run: last replay {_runs(f.col(name, s, 'replay_s'), '.3f')} s; "
            f"clients with every event {', '.join(complete)}; others' load "
            f"{_runs(f.col(name, s, 'others_cores'))} cores"
        )
    return [*out, ""]


#: The fleet table's rows: (label, key, format); "{idle}" is the idle streams' count.
FLEET_ROWS = (
    ("accept {idle} idle streams (s)", "accept_s", ".2f"),
    ("server CPU per accepted stream (µs)", "accept_cpu_us", ".0f"),
    (f"RSS per stream (KiB; target ≤ {RSS_TARGET_KIB:g})", "rss_per_stream_kib", ".2f"),
    ("RSS with every stream open (MiB)", "rss_mib", ".0f"),
    ("live p50 ms, alone", "alone_p50", ".1f"),
    ("live p50 ms, beside the idle streams", "beside_p50", ".1f"),
    ("live p99 ms, alone", "alone_p99", ".1f"),
    ("live p99 ms, beside the idle streams", "beside_p99", ".1f"),
    ("server CPU beside the idle streams (% of a core)", "beside_cpu", ".1%"),
    ("keep-alive sweep: ms of callbacks per period", "beside_sweep_ms", ".2f"),
    ("keep-alive sweep: p99 of its callbacks (ms)", "beside_sweep_p99_ms", ".2f"),
    ("keep-alive sweep: longest callback (ms)", "beside_sweep_max_ms", ".2f"),
    ("keep-alive sweep: callbacks per period", "beside_sweep_callbacks", ".1f"),
    ("broadcast: last stream has it (ms)", "broadcast_ms", ".1f"),
)


def _fleet(f: _Figures, servers: list[str]) -> list[str]:
    names = [n for n, sc in FLEET.items() if sc.kind == "fleet" and n in f.runs]
    out = [
        "### The biggest fleet one process holds: "
        + ", ".join(f"{FLEET[n].conns:,}" for n in names)
        + " streams",
        "",
        "A process here may open at most 20,000 files (a hard limit), so 19,000 streams "
        f"is about the most one process holds. Each run: {LIVE:,} live clients on a "
        f"channel of their own receive {LIVE_RATE:g} events/s for {WINDOW:g} s *alone*; "
        f"then the idle streams open (at most 100 being opened at once; {PER_LOADGEN:,} "
        "per load generator process at most, each with a source address of its own, "
        "127.0.0.x); after 1 s the server's RSS is read (*RSS per stream* = that - RSS "
        "after the warm-up, ÷ every stream open, live ones included); then the live "
        f"clients receive {LIVE_RATE:g} events/s for {WINDOW:g} s again, *beside* the "
        f"idle streams; last, {BROADCASTS} broadcasts 1 s apart, each one event to every "
        "stream (sse_handler: `handler.send_all()` through a bench-only `POST /send_all`; "
        "nchan: one publish to each of its two channels at once), stamped just before "
        "the request leaves: *last stream has it* = to the last receipt over every load "
        "generator, median of the three.",
        "",
        f"Both servers keep each stream alive every {KEEPALIVE:g} s (sse_handler: "
        "`keepalive`, one housekeeping timer that visits every connection each "
        f"{KEEPALIVE / 2:g} s and writes a comment to one quiet for the interval; nchan: "
        "`nchan_eventsource_ping_interval`, a timer per stream), short enough for the "
        "sweep to run several times in a live window. *Keep-alive sweep*: sse_handler's "
        "housekeeping callbacks timed with `perf_counter` in the bench app over the "
        "window beside the idle streams: their time per period (the walk and the "
        "comments written), how many ran per period, and the p99 of their durations and "
        "the longest (how long one callback holds the loop). "
        f"Issue 15's targets: RSS per stream ≤ {RSS_TARGET_KIB:g} KiB; live p99 beside "
        f"the idle streams ≤ {P99_TARGET:g}{X} alone.",
        "",
        "| figure | streams | " + " | ".join(servers) + " | sse_handler ÷ nchan | paired |",
        "|---|---:|" + "---:|" * len(servers) + "---:|---|",
    ]
    for label, key, spec in FLEET_ROWS:
        for n in names:
            sc = FLEET[n]
            cells = [_fmt(f.med(n, s, key), spec) for s in servers]
            if all(c == NONE for c in cells):
                continue
            ratio = _ratio(f.med(n, "sse_handler", key), f.med(n, "nchan", key))
            paired = _runs(f.paired(n, key)) if ratio != NONE else ""
            out.append(
                f"| {label.format(idle=f'{sc.idle:,}')} | {sc.conns:,} | "
                + " | ".join(cells) + f" | {ratio} | {paired} |"
            )  # fmt: skip
    for n in names:
        cells = []
        for s in servers:
            values = f.col(n, s, "p99_ratio")
            ok = [v for v in values if v == v]
            mark = ""
            if ok:
                mark = " ✓" if _median(ok) <= P99_TARGET else " ✗"
            cells.append(f"{_fmt(_median(ok))}{X}{mark} ({_runs(values)})" if ok else NONE)
        out.append(
            f"| live p99 beside ÷ alone (target ≤ {P99_TARGET:g}{X}) | {FLEET[n].conns:,} | "
            + " | ".join(cells) + " | | |"
        )  # fmt: skip
    for label, key in (
        ("failed opens, worst run", "failed_open"),
        ("live deliveries lost, worst run (alone)", "alone_lost"),
        ("live deliveries lost, worst run (beside)", "beside_lost"),
        ("broadcast deliveries lost, worst broadcast", "broadcast_lost"),
    ):
        for n in names:
            cells = [_fmt(f.worst(n, s, key), ".0f") for s in servers]
            out.append(f"| {label} | {FLEET[n].conns:,} | " + " | ".join(cells) + " | | |")
    out.append("")
    for s in servers:
        parts = [
            f"{FLEET[n].conns:,}: p99 alone → beside {_runs(f.col(n, s, 'alone_p99'), '.1f')} → "
            f"{_runs(f.col(n, s, 'beside_p99'), '.1f')} ms; broadcast "
            f"{_runs(f.col(n, s, 'broadcast_ms'), '.0f')} ms; others' load "
            f"{_runs(f.col(n, s, 'beside_others'))} cores"
            for n in names
        ]
        out.append(f"- {s}, run by run: " + "; ".join(parts))
    return [*out, ""]


#: What the extrapolation follows: (label, key, format).
GROWTH = (
    ("RSS with every stream open (MiB)", "rss_mib", ".0f"),
    ("keep-alive sweep: ms of callbacks per period", "beside_sweep_ms", ".2f"),
    ("keep-alive sweep: p99 of its callbacks (ms)", "beside_sweep_p99_ms", ".2f"),
    ("keep-alive sweep: longest callback (ms)", "beside_sweep_max_ms", ".2f"),
    ("broadcast: last stream has it (ms)", "broadcast_ms", ".1f"),
    ("accept the idle streams (s)", "accept_s", ".2f"),
)


def _growth(f: _Figures, servers: list[str]) -> list[str]:
    names = [n for n, sc in FLEET.items() if sc.kind == "fleet" and n in f.runs]
    if len(names) < 2:
        return []
    sizes = [FLEET[n].conns for n in names]
    head = " | ".join(f"{s:,}" for s in sizes)
    steps = [f"per 1,000, {a // 1000:,}k→{b // 1000:,}k" for a, b in itertools.pairwise(sizes)]
    out = [
        f"### What {TARGET:,} streams per process would cost",
        "",
        "Medians at each size, how much each figure grows per 1,000 more streams between "
        f"two sizes (equal steps: it grows linearly), and the least-squares line through "
        f"the sizes at {TARGET:,} streams; a figure that changes by less than {FLAT:.0%} "
        "of its median over the sizes does not follow the streams (e.g. a sweep callback, "
        "at most one slice of connections): its median. Not measured: "
        f"{TARGET:,} streams need {TARGET:,} open files in one process, "
        f"{TARGET // 20_000} times this machine's limit.",
        "",
        f"| figure | server | {head} | " + " | ".join(steps) + f" | at {TARGET:,} |",
        "|---|---|" + "---:|" * (len(sizes) + len(steps) + 1),
    ]
    for label, key, spec in GROWTH:
        for s in servers:
            values = [f.med(n, s, key) for n in names]
            if all(v != v for v in values):
                continue
            slopes = [
                (b - a) / (nb - na) * 1000
                for (a, b), (na, nb) in zip(
                    itertools.pairwise(values), itertools.pairwise(sizes), strict=True
                )
            ]
            at_cell = _fmt(extrapolate(sizes, values, TARGET), spec)
            measured = [v for v in values if v == v]
            if len(measured) == len(values) and is_flat(measured):
                at_cell = f"flat: ≈ {_fmt(_median(measured), spec)}"
            out.append(
                f"| {label} | {s} | " + " | ".join(_fmt(v, spec) for v in values) + " | "
                + " | ".join(_fmt(v, ".3f") for v in slopes) + f" | {at_cell} |"
            )  # fmt: skip
    return [*out, ""]


def is_flat(measured: list[float]) -> bool:
    """Does a figure stay put while the streams grow (see :data:`FLAT`)?"""
    return max(measured) - min(measured) < FLAT * _median(measured)


def section(picks: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The Markdown of the section, each scenario from the latest raw results that
    measured it (``picks``: scenario -> results; default: bench/.build's); None
    without any."""
    picks = _pick(latest_results()) if picks is None else picks
    if not picks:
        return None
    f = _Figures(picks)
    servers = [s for s in ("sse_handler", "nchan") if any(s in v for v in f.runs.values())]
    m = list(picks.values())[-1]["machine"]
    out = [
        SECTION,
        "",
        "Issue 15. One server process on core 0, the load generators on core 1; "
        "interleaved runs (each run: every scenario, sse_handler then nchan, each on a "
        "fresh server). Medians; *paired* = run *i* ÷ run *i*.",
        "",
        *_sources(picks),
        "",
        f"- Machine: {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, Python "
        f"{m['python']}, Tornado {m['tornado']}, nginx {m['nginx']} with libnginx-mod-nchan "
        f"{m['nchan']}, Go {m['go']}.",
        "- sse_handler: the demo, `python -m sse_handler demo` (the storm; its "
        "MemoryBroker, default settings) or `bench/apps/sse_handler_fleet_app.py` (the "
        "fleet: the demo with `keepalive`, `POST /send_all` and its housekeeping "
        "callbacks timed). nchan: nginx, one worker, its memory store (`nchan_channel_id` "
        "from the `channel` query argument, `nchan_message_buffer_length 1000`), listen "
        "backlog 4,096 as the demo's.",
        "",
    ]
    if "storm9000" in f.runs:
        out += _storm(f, servers)
    out += _fleet(f, servers)
    out += _growth(f, servers)
    errors = [
        e
        for name, r in picks.items()
        for e in r.get("errors", [])
        if e.split(", ", 2)[1:2] == [name]
    ]
    if errors:
        out += ["Runs that failed:", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(out)
