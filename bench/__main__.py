"""``python -m bench``: sse_handler against its peers (issue 3).

From the repository root::

    python -m bench --quick        # every server, small scenarios, one run (tox -e bench)
    python -m bench                # the full run; writes docs/benchmarks.md
    python -m bench --render bench/.build/results-STAMP.json   # the doc again, from raw results

The servers run on core 0 and the Go load generator on core 1 (``taskset``).
The peers install into ``bench/.venv-peers`` (never dependencies of the library);
the load generator is built with ``go build`` into ``bench/.build``, where the
raw results of every invocation are kept as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hotspots import hot_spots, render
from .report import medians, metrics, render_doc, summary_table
from .run import PROFILE_ACCEPT_SECONDS, PROFILE_RATE, BenchError, Scenario, run_once
from .servers import (
    BENCH,
    BUILD,
    REPO,
    SERVERS,
    Server,
    build_loadgen,
    ensure_peers,
    machine_info,
    snapshot_library,
)

FULL = (
    Scenario("1000x50", conns=1000, rate=50, duration=10),
    Scenario("5000x20", conns=5000, rate=20, duration=10),
    Scenario("idle9000", conns=9000, rate=0, duration=0),
)
QUICK = (
    Scenario("200x50", conns=200, rate=50, duration=5),
    Scenario("idle1000", conns=1000, rate=0, duration=0),
)
PROFILED = "5000x20"
DOC = REPO / "docs" / "benchmarks.md"

METHOD = """\
- Each server runs alone, pinned to core 0 (`taskset -c 0`); the load generator
  (`bench/loadgen`, Go, one epoll loop for all the streams) is pinned to core 1.
  A fresh server process per run; runs are interleaved (run 1 of every server,
  then run 2, ...) so that noise from this shared machine spreads over all servers.
- The machine is shared with other work (test suites, browsers). Before each run
  the bench waits up to 30 s for the rest of the machine to use less than 0.3 of
  a core, and it records how much CPU everything else used during the run
  (*others' load*: all non-idle CPU time of the machine minus the server's, the
  load generator's and the bench's own). Latency and accept time suffer most
  from it; CPU per delivery and RSS hardly.
- Before measuring, one stream and one publish warm the server up. The load
  generator then opens every connection (at most 100 being opened at once: dial
  to response head) and checks each answers `200` with `text/event-stream`.
  *Accept time* is from the first dial to the last head. After 1 s of rest the
  bench reads the server's RSS (VmRSS, summed over its process tree);
  *RSS per idle connection* = (that - RSS after the warm-up) / connections.
- Publishing: `POST /publish` at a fixed rate from 4 keep-alive connections for
  the scenario's duration; the body is `<unix-nanos> <seq> <padding>`, 100 bytes.
  Each client records, per event, receive time - the timestamp in the data
  (*latency*), and counts each seq once. After the last publish the generator
  waits up to 5 s for the rest. *Loss* = 1 - deliveries received / offered
  (events scheduled x clients); *reached* = deliveries received / the time from
  the first publish to the last delivery (at least the scheduled duration).
- *Server CPU* = utime + stime from `/proc/<pid>/stat` over the server's process
  tree (nginx: master + worker), from the first publish to the end of the drain,
  before the clients disconnect; *CPU µs / delivery* = that / deliveries
  received; *server CPU* and *loadgen CPU* in % of one core over the same window.
- Each figure is the median over the runs, taken figure by figure.
"""


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small scenarios, one run, no doc")
    p.add_argument("--runs", type=int, help="runs per server and scenario (default 3; quick 1)")
    p.add_argument(
        "--servers", help="comma-separated subset of: " + ", ".join(s.name for s in SERVERS)
    )
    p.add_argument("--scenarios", help="comma-separated subset of the scenario names")
    p.add_argument("--duration", type=float, help="seconds of publishing per run (override)")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"profile sse_handler with py-spy in one extra {PROFILED} run and one extra "
        "idle run (default: on for the full run)",
    )
    p.add_argument("--doc", type=Path, help="write the Markdown report here")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument(
        "--profile-only", action="store_true", help="skip the measured runs: only the profiles"
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: write the doc again from bench/.build/results-*.json (and notes.md)",
    )
    return p


def _select(all_: Sequence[Any], names: str | None, what: str) -> list[Any]:
    if not names:
        return list(all_)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {x.name: x for x in all_}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in wanted]


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 20000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _profile(loadgen: Path, server: Server, sc: Scenario, stamp: str) -> str | None:
    """One extra sse_handler run under py-spy: the publishing phase, or for idle
    clients the opening of the connections."""
    out = BUILD / f"profile-{sc.name}-{stamp}.txt"
    _log(f"profiling sse_handler under {sc.name} with py-spy -> {out.relative_to(REPO)}")
    try:
        run_once(server, sc, loadgen, profile=out)
    except BenchError as exc:
        _log(f"profile run failed: {exc}")
        return None
    if not out.exists():
        _log("py-spy wrote no profile")
        return None
    seconds = PROFILE_ACCEPT_SECONDS if sc.idle else sc.duration
    md = render(hot_spots(out), seconds, PROFILE_RATE)
    print(md, file=sys.stderr)
    what = "opening the connections" if sc.idle else "publishing"
    rel = out.relative_to(REPO)
    return (
        f"### {sc.title}: {what}\n\n"
        f"One extra run under `py-spy record --native` (raw stacks: `{rel}`).\n\n{md}"
    )


def _summarise(
    scenarios: Sequence[Scenario], raw: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, list[dict[str, float]]]], dict[str, dict[str, dict[str, float]]]]:
    """Per-run figures and their medians, by scenario and server."""
    by_name = {sc.name: sc for sc in scenarios}
    per_run: dict[str, dict[str, list[dict[str, float]]]] = {}
    for result in raw:
        sc = by_name[result["scenario"]]
        per_run.setdefault(sc.name, {}).setdefault(result["server"], []).append(
            metrics(result, sc)
        )
    med = {
        name: {server: medians(ms) for server, ms in by_server.items()}
        for name, by_server in per_run.items()
    }
    return per_run, med


def _write_doc(results: dict[str, Any], doc: Path) -> None:
    """docs/benchmarks.md from the raw results of one invocation (and bench/notes.md)."""
    scenarios = [Scenario(**sc) for sc in results["scenarios"]]
    per_run, med = _summarise(scenarios, results["runs"])
    notes = BENCH / "notes.md"
    doc.write_text(
        render_doc(
            command=shlex.join(["python", "-m", "bench", *results["argv"]]),
            date=results["date"],
            machine=results["machine"],
            scenarios=scenarios,
            runs=results["run_count"],
            servers=results["servers"],
            med=med,
            per_run=per_run,
            errors=results["errors"],
            profile_md="\n".join(results["profiles"]) or None,
            method_md=METHOD,
            notes_md=notes.read_text() if notes.exists() else None,
        )
    )
    _log(f"wrote {doc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        _write_doc(json.loads(args.render.read_text()), args.doc or DOC)
        return 0
    scenarios: list[Scenario] = _select(QUICK if args.quick else FULL, args.scenarios, "scenario")
    if args.duration:
        scenarios = [
            sc if sc.idle else Scenario(sc.name, sc.conns, sc.rate, args.duration)
            for sc in scenarios
        ]
    runs = args.runs or (1 if args.quick else 3)
    _raise_fd_limit()
    BUILD.mkdir(exist_ok=True)
    ensure_peers(_log)
    _log("building the load generator")
    loadgen = build_loadgen()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    snapshot = BUILD / "snapshot"
    wanted, commit = snapshot_library(list(SERVERS), snapshot)
    _log(f"sse_handler is served from a copy of the work tree ({commit}) in {snapshot}")
    servers = []
    for server in _select(wanted, args.servers, "server"):
        why = server.missing()
        if why:
            _log(f"skipping {server.name}: {why}")
        else:
            servers.append(server)
    library = next(s for s in wanted if s.name == "sse_handler")
    raw: list[dict[str, Any]] = []
    errors: list[str] = []
    for i in range(0 if args.profile_only else runs):
        for sc in scenarios:
            for server in servers:
                _log(f"run {i + 1}/{runs}: {server.name}, {sc.title}")
                try:
                    result = run_once(server, sc, loadgen)
                except BenchError as exc:
                    errors.append(f"run {i + 1}, {sc.name}, {server.name}: {exc}")
                    _log(f"  failed: {exc}")
                    continue
                raw.append({"run": i + 1, **result})
                m = metrics(result, sc)
                _log("  " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
    _, med = _summarise(scenarios, raw)
    for sc in scenarios:
        if sc.name in med:
            print(f"\n## {sc.title} (median of {runs})\n\n{summary_table(sc, med[sc.name])}")
    profiles: list[str] = []
    want_profile = args.profile_only or (
        args.profile if args.profile is not None else not args.quick
    )
    if want_profile:
        busy = next((s for s in scenarios if s.name == PROFILED), None)
        busy = busy or next((s for s in scenarios if not s.idle), None)
        idle = next((s for s in scenarios if s.idle), None)
        for target in (busy, idle):
            md = None if target is None else _profile(loadgen, library, target, stamp)
            if md is not None:
                profiles.append(md)
    results = {
        "argv": argv_list,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine_info(), "commit": commit},
        "scenarios": [dataclasses.asdict(sc) for sc in scenarios],
        "run_count": runs,
        "servers": {s.name: s.description for s in servers},
        "runs": raw,
        "errors": errors,
        "profiles": profiles,
    }
    path = BUILD / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    _log(f"raw results: {path.relative_to(REPO)} (python -m bench --render it again)")
    doc = args.doc or (None if args.quick or args.no_doc or args.profile_only else DOC)
    if doc is not None:
        _write_doc(results, doc)
    for e in errors:
        _log(f"FAILED {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
