"""Figures from raw runs: per-run metrics, medians, ratios, targets, and the Markdown doc."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .run import Scenario

__all__ = [
    "ISSUE6_P99_RATIO",
    "Source",
    "baseline_table",
    "frozen_target",
    "medians",
    "metrics",
    "render_doc",
    "row_label",
    "splice_section",
    "summary_table",
    "targets",
    "tls_table",
]

BASE, REFERENCE = "sse_handler", "nchan"
NAN = math.nan
TIMES = "\N{MULTIPLICATION SIGN}"
NONE = "\N{EN DASH}"
#: Issue 6: the normal clients' p99 with the frozen readers, at most this times
#: their p99 without them.
ISSUE6_P99_RATIO = 1.2


def row_label(run: dict[str, Any], sc: Scenario) -> str:
    """The row of a run in its scenario's table: the server, or for the frozen-readers
    scenarios the variant."""
    if not sc.frozen:
        return str(run["server"])
    frozen = run.get("frozen", 0)
    return f"{run['server']} + {frozen:,} frozen" if frozen else f"{run['server']}, none frozen"


def metrics(run: dict[str, Any], sc: Scenario) -> dict[str, float]:
    """The figures of one run (NaN where a figure does not apply)."""
    connected, done = run["connected"], run["done"]
    n = connected["connected"]
    m: dict[str, float] = {
        "run": run.get("run", NAN),
        "connected": n,
        "failed": connected["failed"],
        "accept_s": connected["accept_seconds"],
        "open_p99_ms": connected["open_ms"].get("p99", NAN),
    }
    if sc.idle:
        m["others_cores"] = run.get("others_connecting", NAN)
        m["rss_per_conn_kib"] = (run["rss_after"] - run["rss_before"]) / max(n, 1) / 1024
        m["rss_mib"] = run["rss_after"] / 2**20
        return m
    # Connected and not yet sent anything (the warm-up's and each client's welcome aside).
    m["rss_per_conn_kib"] = (run["rss_after"] - run["rss_before"]) / max(n, 1) / 1024
    received, offered = done.get("received", 0), done.get("offered", 0)
    latency = done.get("latency_ms", {})
    m.update(
        cpu_s=run["cpu_seconds"],
        cpu_us_per_delivery=run["cpu_seconds"] / received * 1e6 if received else NAN,
        cpu_util=run["cpu_seconds"] / run["wall_seconds"],
        loadgen_cpu_util=run.get("loadgen_cpu_seconds", NAN) / run["wall_seconds"],
        others_cores=run.get("others_publishing", NAN),
        reached_per_s=done.get("deliveries_per_s", 0.0),
        offered_per_s=done.get("offered_per_s", 0.0),
        loss=1 - received / offered if offered else NAN,
        published=done.get("published", 0),
        publish_errors=done.get("publish_errors", 0),
        disconnected=done.get("disconnected", 0),
        **{q: latency.get(q, NAN) for q in ("p50", "p90", "p99", "max")},
    )
    if sc.frozen:
        m.update(_frozen_metrics(run))
    return m


def _frozen_metrics(run: dict[str, Any]) -> dict[str, float]:
    """Memory, and what became of the frozen readers: closed by the server with
    reason ``slow`` (its /metrics), and closed as the clients saw it (read out
    after the run)."""
    closed = run.get("server_closed")  # None: the server had no /metrics
    probe = run.get("frozen_probe") or {}
    frozen = run.get("frozen", 0)
    return {
        "run": run.get("run", NAN),
        "frozen": frozen,  # asked for; frozen_opened: how many opened
        "rss_mib": run["rss_after"] / 2**20,
        "rss_end_mib": run.get("rss_end", NAN) / 2**20,
        "frozen_opened": run["connected"].get("frozen_opened", 0),
        "closed_slow": NAN if closed is None else closed.get("slow", 0),
        "closed_other": NAN if closed is None else sum(closed.values()) - closed.get("slow", 0),
        "frozen_closed_seen": probe.get("closed_by_server", 0 if not frozen else NAN),
    }


def medians(per_run: Sequence[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over the runs (each figure on its own)."""
    keys = per_run[0].keys() if per_run else ()
    return {k: statistics.median(r[k] for r in per_run) for k in keys}


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return NONE
    return f"{a / b:.2f}{TIMES}"


def _ms(v: float) -> str:
    return NONE if math.isnan(v) else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def _cores(v: float) -> str:
    return NONE if math.isnan(v) else f"{v:.2f} cores"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def summary_table(sc: Scenario, med: dict[str, dict[str, float]]) -> str:
    """One Markdown table of medians for a scenario, with ratios to sse_handler and nchan."""
    if sc.frozen:
        return _frozen_table(med)
    base, ref = med.get(BASE, {}), med.get(REFERENCE, {})
    if sc.idle:
        head = ["server", "connected", "accept time (s)", "÷ sse_handler", "÷ nchan",
                "RSS / idle conn (KiB)", "÷ sse_handler", "÷ nchan",
                "RSS total (MiB)", "others' load"]  # fmt: skip
        lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
        for name, m in med.items():
            lines.append(_row([
                name, f"{m['connected']:,.0f}/{sc.conns:,}", f"{m['accept_s']:.2f}",
                _ratio(m["accept_s"], base.get("accept_s", NAN)),
                _ratio(m["accept_s"], ref.get("accept_s", NAN)),
                f"{m['rss_per_conn_kib']:.1f}",
                _ratio(m["rss_per_conn_kib"], base.get("rss_per_conn_kib", NAN)),
                _ratio(m["rss_per_conn_kib"], ref.get("rss_per_conn_kib", NAN)),
                f"{m['rss_mib']:.0f}", _cores(m["others_cores"]),
            ]))  # fmt: skip
        return "\n".join(lines) + "\n"
    head = ["server", "CPU µs / delivery", "÷ sse_handler", "÷ nchan", "server CPU",
            "deliveries/s reached / offered", "loss", "p50 ms", "p90 ms", "p99 ms",
            "÷ sse_handler", "÷ nchan", "max ms", "loadgen CPU", "others' load"]  # fmt: skip
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for name, m in med.items():
        lines.append(_row([
            name, f"{m['cpu_us_per_delivery']:.2f}",
            _ratio(m["cpu_us_per_delivery"], base.get("cpu_us_per_delivery", NAN)),
            _ratio(m["cpu_us_per_delivery"], ref.get("cpu_us_per_delivery", NAN)),
            f"{m['cpu_util']:.0%}",
            f"{m['reached_per_s']:,.0f} / {m['offered_per_s']:,.0f}",
            f"{m['loss']:.2%}", _ms(m["p50"]), _ms(m["p90"]), _ms(m["p99"]),
            _ratio(m["p99"], base.get("p99", NAN)), _ratio(m["p99"], ref.get("p99", NAN)),
            _ms(m["max"]), f"{m['loadgen_cpu_util']:.0%}", _cores(m["others_cores"]),
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def _count(v: float) -> str:
    return NONE if math.isnan(v) else f"{v:,.0f}"


def _split(med: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """The medians of a frozen-readers scenario: (without frozen readers, with)."""
    without = next((m for m in med.values() if m["frozen"] == 0), {})
    with_ = next((m for m in med.values() if m["frozen"] > 0), {})
    return without, with_


def _frozen_table(med: dict[str, dict[str, float]]) -> str:
    without, _ = _split(med)
    head = ["variant", "frozen readers open", "closed `slow` (server)", "closed (clients saw)",
            "other closes", "p50 ms", "p90 ms", "p99 ms", "÷ none frozen", "max ms",
            "deliveries/s reached / offered", "loss", "CPU µs / delivery", "server CPU",
            "RSS connected (MiB)", "RSS at end (MiB)", "others' load"]  # fmt: skip
    lines = [_row(head), _row(["---"] + ["---:"] * (len(head) - 1))]
    for name, m in med.items():
        lines.append(_row([
            name, _count(m["frozen_opened"]), _count(m["closed_slow"]),
            _count(m["frozen_closed_seen"]), _count(m["closed_other"]),
            _ms(m["p50"]), _ms(m["p90"]), _ms(m["p99"]),
            _ratio(m["p99"], without.get("p99", NAN)), _ms(m["max"]),
            f"{m['reached_per_s']:,.0f} / {m['offered_per_s']:,.0f}", f"{m['loss']:.2%}",
            f"{m['cpu_us_per_delivery']:.2f}", f"{m['cpu_util']:.0%}",
            f"{m['rss_mib']:.1f}", f"{m['rss_end_mib']:.1f}", _cores(m["others_cores"]),
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def _paired(runs: dict[str, list[dict[str, float]]], key: str) -> list[float]:
    """Per run of a frozen-readers scenario: with ÷ without, for the runs that have both."""
    by_run: dict[float, dict[bool, float]] = {}
    for rows in runs.values():
        for r in rows:
            by_run.setdefault(r["run"], {})[r["frozen"] > 0] = r[key]
    return [
        pair[True] / pair[False]
        for _, pair in sorted(by_run.items())
        if True in pair and False in pair and pair[False]
    ]


def _paired_by_run(
    runs: dict[str, list[dict[str, float]]], a: str, b: str, key: str
) -> list[float]:
    """Run by run, ``a``'s figure ÷ ``b``'s (the rows of one scenario, or of two
    scenarios of one invocation: run numbers pair them)."""
    mine = {r["run"]: r[key] for r in runs.get(a, [])}
    theirs = {r["run"]: r[key] for r in runs.get(b, [])}
    return [
        mine[i] / theirs[i]
        for i in sorted(mine.keys() & theirs.keys())
        if theirs[i] and not math.isnan(mine[i]) and not math.isnan(theirs[i])
    ]


def _runs_cell(ratios: Sequence[float]) -> str:
    return ", ".join(f"{r:.2f}{TIMES}" for r in ratios) if len(ratios) > 1 else ""


def _fig(v: float, key: str) -> str:
    if math.isnan(v):
        return "failed"
    return (
        _ms(v)
        if key == "p99"
        else f"{v:.2f}"
        if key in ("cpu_us_per_delivery", "accept_s")
        else f"{v:.1f}"
    )


#: The figures compared with a baseline: (key, label), for busy and idle scenarios.
BASELINE_FIGURES = {
    False: (("cpu_us_per_delivery", "CPU µs / delivery"), ("p99", "p99 ms")),
    True: (("rss_per_conn_kib", "RSS / idle conn (KiB)"), ("accept_s", "accept time (s)")),
}


def baseline_table(
    scenarios: Sequence[Scenario],
    med: dict[str, dict[str, dict[str, float]]],
    per_run: dict[str, dict[str, list[dict[str, float]]]],
    baseline_of: dict[str, str],
) -> str | None:
    """sse_handler ÷ its baseline (``--baseline``), figure by figure, for each scenario
    measured with one (``baseline_of``: scenario name -> the baseline's row); None if
    none was."""
    names = {baseline_of[sc.name] for sc in scenarios if sc.name in baseline_of}
    one = next(iter(names)) if len(names) == 1 else None
    head = ["scenario", "figure", BASE, one or "baseline", "÷ baseline", "paired runs"]
    lines = [_row(head), _row(["---", "---", "---:", "---:", "---:", "---"])]
    for sc in scenarios:
        baseline = baseline_of.get(sc.name)
        if baseline is None or sc.frozen:
            continue
        rows = med.get(sc.name, {})
        mine, theirs = rows.get(BASE, {}), rows.get(baseline, {})
        for key, label in BASELINE_FIGURES[sc.idle]:
            a, b = mine.get(key, NAN), theirs.get(key, NAN)
            paired = _paired_by_run(per_run.get(sc.name, {}), BASE, baseline, key)
            lines.append(_row([
                sc.title, label, _fig(a, key),
                _fig(b, key) if one else f"{_fig(b, key)} ({baseline})", _ratio(a, b),
                _runs_cell(paired),
            ]))  # fmt: skip
    return "\n".join(lines) + "\n" if len(lines) > 2 else None


def tls_table(
    sc: Scenario,
    plain: Scenario | None,
    med: dict[str, dict[str, dict[str, float]]],
    per_run: dict[str, dict[str, list[dict[str, float]]]],
    negotiated: dict[str, str],
    failed: Sequence[str] = (),
) -> str:
    """What TLS costs each server: its figures over TLS ÷ the same figures in the plain
    scenario of the same shape, measured in the same invocation (``plain``; None: not
    measured with it). ``negotiated``: server -> TLS version and cipher suite;
    ``failed``: the servers with a failed run of ``sc``."""
    tls_rows = med.get(sc.name, {})
    plain_rows = med.get(plain.name, {}) if plain is not None else {}
    head = ["server", "TLS", "CPU µs / delivery, plain", "over TLS", "TLS ÷ plain",
            "paired runs", "p99 ms, plain", "over TLS", "accept time (s), plain",
            "over TLS", "RSS / conn (KiB), plain", "over TLS"]  # fmt: skip
    lines = [_row(head), _row(["---", "---"] + ["---:"] * 3 + ["---"] + ["---:"] * 6)]
    for name in dict.fromkeys([*tls_rows, *failed]):
        t, p = tls_rows.get(name, {}), plain_rows.get(name, {})
        cpu_t, cpu_p = t.get("cpu_us_per_delivery", NAN), p.get("cpu_us_per_delivery", NAN)
        paired: list[float] = []
        if plain is not None:
            runs = {
                "tls": per_run.get(sc.name, {}).get(name, []),
                "plain": per_run.get(plain.name, {}).get(name, []),
            }
            paired = _paired_by_run(runs, "tls", "plain", "cpu_us_per_delivery")
        lines.append(_row([
            name, negotiated.get(name) or NONE,
            _fig(cpu_p, "cpu_us_per_delivery") if p else NONE, _fig(cpu_t, "cpu_us_per_delivery"),
            _ratio(cpu_t, cpu_p), _runs_cell(paired),
            _ms(p.get("p99", NAN)), _fig(t.get("p99", NAN), "p99"),
            _fig(p.get("accept_s", NAN), "accept_s") if p else NONE,
            _fig(t.get("accept_s", NAN), "accept_s"),
            _fig(p.get("rss_per_conn_kib", NAN), "rss") if p else NONE,
            _fig(t.get("rss_per_conn_kib", NAN), "rss"),
        ]))  # fmt: skip
    return "\n".join(lines) + "\n"


def frozen_target(
    sc: Scenario,
    med: dict[str, dict[str, float]],
    per_run: dict[str, list[dict[str, float]]],
) -> tuple[str, str, bool | None]:
    """Issue 6's first bullet against the medians of a frozen-readers scenario."""
    without, with_ = _split(med)
    p0, p1 = without.get("p99", NAN), with_.get("p99", NAN)
    ratio = p1 / p0 if p0 else NAN
    paired = ", ".join(f"{r:.2f}{TIMES}" for r in _paired(per_run, "p99"))
    runs = [r for rows in per_run.values() for r in rows if r["frozen"] > 0]
    evicted = [f"{_count(r['closed_slow'])}/{_count(r['frozen_opened'])}" for r in runs]
    all_slow = bool(runs) and all(r["closed_slow"] == r["frozen_opened"] for r in runs)
    target = (
        f"{sc.conns:,} clients {TIMES} {sc.rate:g} events/s next to {sc.frozen:,} frozen "
        f"readers: the clients' p99 ≤ {ISSUE6_P99_RATIO:g} {TIMES} without them, every "
        "frozen reader closed with reason `slow`"
    )
    measured = (
        f"p99 {_ms(p1)} ms vs {_ms(p0)} ms = {_ratio(p1, p0)}"
        + (f" (paired runs: {paired})" if paired else "")
        + f"; closed `slow` by run: {', '.join(evicted) or NONE}"
    )
    unknown = math.isnan(ratio) or not runs or any(math.isnan(r["closed_slow"]) for r in runs)
    holds = None if unknown else ratio <= ISSUE6_P99_RATIO and all_slow
    return target, measured, holds


def targets(
    scenarios: Sequence[Scenario],
    med: dict[str, dict[str, dict[str, float]]],
    per_run: dict[str, dict[str, list[dict[str, float]]]],
) -> list[tuple[str, str, bool | None]]:
    """Issue 3's targets against the medians: (target, measured, holds; None = not measured)."""
    out: list[tuple[str, str, bool | None]] = []
    # Issue 6's: frozen_target(); over TLS: tls_table().
    scenarios = [s for s in scenarios if not s.frozen and not s.tls]
    by_shape = {(s.conns, s.rate): s.name for s in scenarios}

    def figure(scenario: str | None, server: str, key: str) -> float:
        if scenario is None:
            return NAN
        return med.get(scenario, {}).get(server, {}).get(key, NAN)

    def runs_of(scenario: str, server: str, key: str, fmt: str) -> str:
        values = [format(r[key], fmt) for r in per_run.get(scenario, {}).get(server, [])]
        return f" (runs: {', '.join(values)})" if len(values) > 1 else ""

    for sc in scenarios:
        if sc.idle:
            continue
        mine = figure(sc.name, BASE, "cpu_us_per_delivery")
        theirs = figure(sc.name, REFERENCE, "cpu_us_per_delivery")
        ratio = mine / theirs if theirs else NAN
        out.append((
            f"{sc.title}: server CPU per delivered event ≤ 0.9 {TIMES} nchan's",
            f"{mine:.2f} µs vs {theirs:.2f} µs = {ratio:.2f}{TIMES}"
            + runs_of(sc.name, BASE, "cpu_us_per_delivery", ".2f"),
            None if math.isnan(ratio) else ratio <= 0.9,
        ))  # fmt: skip
    name = by_shape.get((5000, 20))
    if name is not None:
        runs = per_run.get(name, {}).get(BASE, [])
        worst = max((r["loss"] for r in runs), default=NAN)
        p99 = figure(name, BASE, "p99")
        out.append((
            f"5,000 {TIMES} 20 events/s: all delivered, p99 ≤ 100 ms",
            f"loss {worst:.3%} (worst run), p99 {_ms(p99)} ms"
            + runs_of(name, BASE, "p99", ".1f"),
            None if math.isnan(p99) else worst == 0 and p99 <= 100,
        ))  # fmt: skip
    name = by_shape.get((1000, 50))
    if name is not None:
        p99 = figure(name, BASE, "p99")
        out.append((
            f"1,000 {TIMES} 50 events/s: p99 ≤ 20 ms",
            f"p99 {_ms(p99)} ms" + runs_of(name, BASE, "p99", ".1f"),
            None if math.isnan(p99) else p99 <= 20,
        ))  # fmt: skip
    idle = next((s for s in scenarios if s.idle), None)
    if idle is not None:
        rss = figure(idle.name, BASE, "rss_per_conn_kib")
        accept = figure(idle.name, BASE, "accept_s")
        out.append((
            "≤ 6 KB RSS per idle connection",
            f"{rss:.1f} KiB",
            None if math.isnan(rss) else rss <= 6,
        ))  # fmt: skip
        out.append((
            f"{idle.conns:,} connections accepted in ≤ 2 s",
            f"{accept:.2f} s" + runs_of(idle.name, BASE, "accept_s", ".2f"),
            None if math.isnan(accept) else accept <= 2,
        ))  # fmt: skip
    return out


def _holds(v: bool | None) -> str:
    return "not measured" if v is None else ("**holds**" if v else "**does not hold**")


@dataclass(frozen=True)
class Source:
    """One invocation of the bench whose results the doc shows."""

    command: str
    date: str
    commit: str
    runs: int
    scenarios: tuple[str, ...]  # the titles of the scenarios shown from it


def _header(sources: Sequence[Source]) -> list[str]:
    ratios = (
        "ratios are server ÷ sse_handler and server ÷ nginx+nchan, from the same run of the bench."
    )
    if len(sources) == 1:
        src = sources[0]
        return [
            f"Measured on {src.date} with `{src.command}` (from the repository root); this "
            f"file is written by that command. Medians of {src.runs} "
            f"run{'s' if src.runs != 1 else ''} per server and scenario; {ratios}",
        ]
    out = [
        "Written by `python -m bench` (from the repository root), from the latest "
        "invocation that measured each scenario (raw results in `bench/.build`). "
        f"Medians of the runs per server and scenario; {ratios}",
        "",
        "| scenarios | measured | with | commit | runs |",
        "|---|---|---|---|---:|",
    ]
    out += [
        f"| {'; '.join(s.scenarios)} | {s.date} | `{s.command}` | {s.commit} | {s.runs} |"
        for s in sources
    ]
    return out


def _frozen_section(
    sc: Scenario,
    med: dict[str, dict[str, float]] | None,
    per_run: dict[str, list[dict[str, float]]],
    server: str | None,
) -> list[str]:
    runs = len(next(iter(per_run.values()), []))
    out = [
        f"sse_handler only, served by {server or 'sse_handler'}. {sc.conns:,} clients read "
        f"{sc.rate:g} events/s of {sc.size:,} bytes of data for {sc.duration:g} s; in the "
        f"second variant {sc.frozen:,} frozen readers are connected next to them, spread "
        "among them in the order of connection (a small receive buffer and an "
        "Ethernet-sized MSS, the response head read, then nothing more; see Method). "
        "Every run measures both variants, each on a fresh server, one after the other "
        "(the order alternates from run to run); medians "
        f"of {runs} run{'s' if runs != 1 else ''}. Latency, deliveries and loss are the "
        "normal clients'; CPU per delivery counts only their deliveries.",
        "",
    ]
    if not med:
        return [*out, "No run completed.", ""]
    target, measured, holds = frozen_target(sc, med, per_run)
    out += [
        "| target (issue 6) | measured | |",
        "|---|---|---|",
        f"| {target} | {measured} | {_holds(holds)} |",
        "",
        summary_table(sc, med),
    ]
    return out


BASELINE_INTRO = (
    f"{BASE} (the work tree's copy) ÷ {BASE} at the baseline commit, measured in the same "
    "invocation: in each round the baseline runs right after it, each on a fresh server. "
    "Medians, then run by run. Every figure here is better lower: below 1"
    f"{TIMES} the work tree does better. The baseline's rows in the scenarios' tables "
    f"below also have their ratio to nginx+nchan."
)


def _tls_section(
    sc: Scenario,
    plain: Scenario | None,
    med: dict[str, dict[str, dict[str, float]]],
    per_run: dict[str, dict[str, list[dict[str, float]]]],
    negotiated: dict[str, str],
    failed: Sequence[str],
) -> list[str]:
    out = [
        "Over HTTPS (HTTP/1.1) with the bench's self-signed certificate, for the servers "
        "that serve TLS here; the load generator reads the streams through Go's "
        "crypto/tls, a goroutine per stream, and publishes over HTTPS too (see Method).",
        "",
    ]
    if sc.name in med:
        out.append(summary_table(sc, med[sc.name]))
    else:
        out.append("No run completed.\n")
    if plain is None:
        why = (
            f"No plain run of this shape in the same invocation, so no ratio: run both "
            f"together (e.g. `python -m bench --scenarios 1000x50,{sc.name}`)."
        )
    else:
        why = (
            f"Each server over TLS ÷ itself in *{plain.title}*, measured in the same "
            "invocation (paired runs: run *i* over TLS ÷ run *i* plain). *RSS / conn*: "
            "RSS once every client is connected, less RSS after the warm-up, per client."
        )
    out += [
        f"**What TLS costs.** {why}",
        "",
        tls_table(sc, plain, med, per_run, negotiated, failed),
    ]
    return out


def render_doc(
    *,
    sources: Sequence[Source],
    machine: dict[str, Any],
    scenarios: Sequence[Scenario],
    servers: dict[str, str],
    med: dict[str, dict[str, dict[str, float]]],
    per_run: dict[str, dict[str, list[dict[str, float]]]],
    errors: list[str],
    profile_md: str | None,
    method_md: str,
    notes_md: str | None,
    frozen_server: str | None = None,
    baseline_of: dict[str, str] | None = None,
    tls_plain: dict[str, Scenario | None] | None = None,
    negotiated: dict[str, dict[str, str]] | None = None,
    failed: dict[str, list[str]] | None = None,
) -> str:
    """The Markdown of docs/benchmarks.md. ``baseline_of``: scenario -> the row of
    sse_handler's ``--baseline`` in it; ``tls_plain``: TLS scenario -> the plain
    scenario of its shape measured in the same invocation (or None);
    ``negotiated``: scenario -> server -> TLS version and cipher suite;
    ``failed``: scenario -> the rows with a failed run."""
    peers = machine.get("peers", {})
    commits = {s.commit for s in sources}
    commit = machine.get("commit", "?") if len(commits) <= 1 else "see above"
    out = ["# Benchmarks", "", *_header(sources)]
    if any(not sc.frozen for sc in scenarios):
        out += [
            "",
            "## Issue 3's targets",
            "",
            "| target | sse_handler measured | |",
            "|---|---|---|",
        ]
        out += [f"| {t} | {m} | {_holds(h)} |" for t, m, h in targets(scenarios, med, per_run)]
        out += ["", "## Servers", ""]
        out += [f"- **{name}**: {desc}" for name, desc in servers.items()]
    before_after = baseline_table(scenarios, med, per_run, baseline_of or {})
    if before_after is not None:
        out += ["", "## Before and after (`--baseline`)", "", BASELINE_INTRO, "", before_after]
    for sc in scenarios:
        out += ["", f"## {sc.title}", ""]
        if sc.frozen:
            out += _frozen_section(sc, med.get(sc.name), per_run.get(sc.name, {}), frozen_server)
        elif sc.tls:
            out += _tls_section(
                sc,
                (tls_plain or {}).get(sc.name),
                med,
                per_run,
                (negotiated or {}).get(sc.name, {}),
                (failed or {}).get(sc.name, []),
            )
        elif sc.name in med:
            out.append(summary_table(sc, med[sc.name]))
        else:
            out.append("No run completed.\n")
    if notes_md:
        out += ["## Notes", "", notes_md]
    if profile_md:
        out += ["## Where sse_handler spends its CPU (py-spy)", "", profile_md]
    if errors:
        out += ["## Runs that failed", ""] + [f"- {e}" for e in errors] + [""]
    out += [
        "## Machine",
        "",
        f"- {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}",
        f"- Python {machine['python']}, Tornado {machine['tornado']}, "
        f"sse_handler {machine['sse_handler']} (commit {commit})",
        f"- nginx {machine['nginx']}, libnginx-mod-nchan {machine['nchan']}",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in peers.items()),
        f"- load generator: Go {machine['go']} (`bench/loadgen`, standard library only)",
        "",
        "## Method",
        "",
        method_md,
        "## Every run",
        "",
        _all_runs(scenarios, per_run),
    ]
    return "\n".join(out)


def _all_runs(
    scenarios: Sequence[Scenario], per_run: dict[str, dict[str, list[dict[str, float]]]]
) -> str:
    lines = []
    for sc in scenarios:
        for server, runs in per_run.get(sc.name, {}).items():
            if sc.idle:
                cells = [
                    f"{r['accept_s']:.2f} s, {r['rss_per_conn_kib']:.1f} KiB, "
                    f"others {r['others_cores']:.2f}"
                    for r in runs
                ]
            else:
                cells = [
                    f"{r['cpu_us_per_delivery']:.2f} µs, p99 {_ms(r['p99'])} ms, "
                    f"loss {r['loss']:.2%}, others {r['others_cores']:.2f}"
                    + (
                        f", closed slow {_count(r['closed_slow'])}/{_count(r['frozen_opened'])}"
                        if sc.frozen and r["frozen"]
                        else ""
                    )
                    for r in runs
                ]
            lines.append(f"- {sc.name}, {server}: " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def splice_section(doc: str, heading: str, md: str, before: Sequence[str] = ("## Notes",)) -> str:
    """``doc`` with its section ``heading`` (a ``## `` line, up to the next one)
    replaced by ``md``; without one, ``md`` goes before the first of the sections
    ``before`` that ``doc`` has, else at its end. The other sections are kept as
    they are: a scenario measured on its own never drops another's figures."""
    start = doc.find("\n" + heading + "\n")
    if start >= 0:
        end = doc.find("\n## ", start + 1 + len(heading))
        return doc[: start + 1] + md.rstrip("\n") + "\n" + (doc[end:] if end >= 0 else "")
    for other in before:
        at = doc.find("\n" + other + "\n")
        if at >= 0:
            return doc[: at + 1] + md.rstrip("\n") + "\n\n" + doc[at + 1 :]
    return doc.rstrip("\n") + "\n\n" + md
