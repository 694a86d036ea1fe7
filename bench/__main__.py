"""``python -m bench``: sse_handler against its peers (issue 3).

From the repository root::

    python -m bench --quick        # every server, small scenarios, one run (tox -e bench)
    python -m bench                # the full run; writes docs/benchmarks.md
    python -m bench --scenarios frozen   # one scenario; the doc keeps the others' latest results
    python -m bench --render       # the doc again, from the latest raw results of each scenario
    python -m bench --render bench/.build/results-STAMP.json ...   # ... or from these
    python -m bench --baseline main~3   # also sse_handler as of main~3, side by side
    python -m bench --scenarios scaleout,storm,perchannel --servers sse_handler,nchan
                                   # scale-out on Redis (bench/scaleout.py): 2 processes each
    python -m bench --scenarios storm9000,fleet2000,fleet9000,fleet19000 --runs 3
                                   # one process, many streams (bench/fleet.py)
    python -m bench --render --scenarios fleet19000   # their section and the notes again

The servers run on core 0 and the Go load generator on core 1 (``taskset``).
``--baseline REF`` adds sse_handler as it was at git ref REF (``git archive``
into ``bench/.build/baseline``) as one more server, interleaved with the others.
The TLS scenarios (``tls1000x50``; ``tls200x50`` in ``--quick``) serve HTTPS
with a self-signed certificate made by ``openssl`` at bench time.
The peers install into ``bench/.venv-peers`` (never dependencies of the library);
the load generator is built with ``go build`` into ``bench/.build``, where the
raw results of every invocation are kept as JSON. docs/benchmarks.md shows, for
each scenario of the full run, the latest invocation that measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import fleet, fleet_report, scaleout
from .hotspots import hot_spots, render
from .report import (
    Source,
    baseline_table,
    medians,
    metrics,
    render_doc,
    row_label,
    splice_section,
    summary_table,
    tls_table,
)
from .run import PROFILE_ACCEPT_SECONDS, PROFILE_RATE, BenchError, Scenario, run_once
from .servers import (
    BENCH,
    BUILD,
    FROZEN_SERVER,
    REPO,
    SERVERS,
    Cert,
    Server,
    build_loadgen,
    coalescing,
    ensure_peers,
    machine_info,
    make_cert,
    snapshot_baseline,
    snapshot_library,
)

FULL = (
    Scenario("1000x50", conns=1000, rate=50, duration=10),
    # Over HTTPS, next to its plain twin: TLS's cost per delivery (TLS servers only).
    Scenario("tls1000x50", conns=1000, rate=50, duration=10, tls=True),
    Scenario("5000x20", conns=5000, rate=20, duration=10),
    Scenario("idle9000", conns=9000, rate=0, duration=0),
    # Issue 6: 100 frozen readers next to 1,000 clients (sse_handler only).
    Scenario("frozen", conns=1000, rate=50, duration=10, size=1024, frozen=100),
)
QUICK = (
    Scenario("200x50", conns=200, rate=50, duration=5),
    Scenario("tls200x50", conns=200, rate=50, duration=5, tls=True),
    Scenario("idle1000", conns=1000, rate=0, duration=0),
    Scenario("frozen200", conns=200, rate=50, duration=5, size=1024, frozen=20),
)
PROFILED = "5000x20"
DOC = REPO / "docs" / "benchmarks.md"

METHOD = """\
- Each server runs alone, pinned to core 0 (`taskset -c 0`); the load generator
  (`bench/loadgen`, Go, one epoll loop for all the streams; over TLS a goroutine
  per stream) is pinned to core 1.
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

METHOD_FROZEN = """\
- Frozen readers (issue 6): sse_handler only, on its demo app with a write
  deadline shorter than the run (`bench/apps/sse_handler_frozen_app.py`). The
  load generator opens the frozen connections along with the others, spread
  evenly in the order of connection (1 in 11 with 1,000 + 100), each with
  SO_RCVBUF 4 KiB (the kernel doubles it) and an MSS of 1,460 bytes set before
  connect; each reads its response head and nothing more. The MSS is
  Ethernet's: with loopback's ~64 KiB the server's kernel sizes each send
  buffer at 4 MiB, which holds over a minute of these events before the
  server's `send` would block, where on a network it holds tens of KiB. The
  bench reads the server's
  `sse_connections_closed_total` from `/metrics` before the first publish and
  after the drain: *closed `slow` (server)* is the difference for reason
  `slow`, *other closes* that for every other reason. The server's FIN waits
  behind the data it could not send, so a client cannot see the close without
  reading: after the measurement the load generator reads each frozen
  connection to its end (*closed (clients saw)*: EOF or ECONNRESET; still open:
  nothing more for 0.5 s). *RSS at end*: the server's RSS after the drain,
  before the clients leave.
"""


METHOD_TLS = """\
- TLS scenarios (`tls1000x50`; in `--quick` `tls200x50`): their plain twin
  over HTTPS (HTTP/1.1), with the servers that serve TLS here: sse_handler
  (`bench/apps/sse_handler_tls_app.py`: the demo, its `HTTPServer` given
  `ssl_options=<ssl.SSLContext>`), the hand-written Tornado handler
  (`ssl_options` too) and nginx+nchan (`listen ... ssl`, one worker, TLS 1.2
  and 1.3 with its own order of cipher suites preferred, which makes it
  negotiate what Python's default server context does). The certificate is
  self-signed, ECDSA P-256 for 127.0.0.1, made by `openssl req` at the start of
  each invocation into `bench/.build/tls`. The table shows the protocol and
  cipher suite that each server's first stream got from Go's client.
- The load generator's TLS mode (`-tls`) reads each stream in a goroutine of
  its own through Go's `crypto/tls` (the certificate is not verified), with the
  same parser and latency accounting as the epoll loop (close-delimited and
  chunked bodies); at most 100 streams are being opened at once, dial to
  response head including the handshake. Publishing goes over TLS too: the
  same POSTs from 4 keep-alive HTTPS connections (one handshake each). The
  warm-up and `/metrics` go over HTTPS as well.
- *What TLS costs* = a server's CPU per delivery over TLS ÷ its CPU per
  delivery in the plain scenario of the same shape, both from the same
  invocation (every round runs the plain one, then the TLS one); paired runs
  divide run *i* by run *i*. Latency over TLS also includes the load
  generator's decryption and goroutine switches, which its epoll loop does not
  pay in the plain scenario.
- A server that cannot serve the stream over TLS (a failed handshake, bytes
  that are not TLS records, an answer that is not `200 text/event-stream`, no
  stream opened or nothing delivered) fails that run: it is listed under *Runs
  that failed*, and the bench goes on.
"""

METHOD_BASELINE = """\
- `--baseline REF`: sse_handler as it was at git ref REF (`git archive REF
  sse_handler`, unpacked into `bench/.build/baseline`) is one more server,
  `sse_handler@<short commit>`, in every scenario but the frozen-readers one.
  It is served exactly as the work tree's copy is (the same Python, Tornado and
  bench apps; its own `sse_handler/` first on `sys.path`), and runs right after
  sse_handler in every round.
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
    p.add_argument(
        "--scenarios",
        help="comma-separated subset of the scenario names; scale-out on Redis (not "
        "with the others): " + ", ".join(scaleout.SCALEOUT) + "; one process, many "
        "streams (not with the others): " + ", ".join(fleet.FLEET),
    )
    p.add_argument("--duration", type=float, help="seconds of publishing per run (override)")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"profile sse_handler with py-spy in one extra {PROFILED} run and one extra "
        "idle run (default: on for the full run)",
    )
    p.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure sse_handler as it was at git ref REF (a commit, a branch, "
        "main~3, ...), as one more server in every scenario but the frozen-readers one",
    )
    p.add_argument(
        "--coalesce-windows",
        type=_milliseconds,
        default=[],
        metavar="MS,MS",
        help="also measure sse_handler with each of these coalescing windows "
        "(`demo --coalesce-window MS`), as more servers in the plain scenarios",
    )
    p.add_argument("--doc", type=Path, help="write the Markdown report here")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument(
        "--profile-only", action="store_true", help="skip the measured runs: only the profiles"
    )
    p.add_argument(
        "--render",
        type=Path,
        nargs="*",
        metavar="RESULTS_JSON",
        help="run nothing: write the doc again (and notes.md) from these raw results "
        "(where several have a scenario, the last one given wins), or without files from "
        "the latest bench/.build/results-*.json of each scenario of the full run",
    )
    return p


def _milliseconds(value: str) -> list[float]:
    try:
        windows = [float(ms) for ms in value.split(",") if ms.strip()]
    except ValueError:
        windows = []
    if not windows or not all(0 < ms < float("inf") for ms in windows):
        raise argparse.ArgumentTypeError(f"expected milliseconds > 0, comma-separated: {value!r}")
    return windows


def _select(all_: Sequence[Any], names: str | None, what: str) -> list[Any]:
    if not names:
        return [x for x in all_ if not getattr(x, "on_request", False)]
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
    """Per-run figures and their medians, by scenario and server (or variant)."""
    by_name = {sc.name: sc for sc in scenarios}
    per_run: dict[str, dict[str, list[dict[str, float]]]] = {}
    for result in raw:
        sc = by_name[result["scenario"]]
        per_run.setdefault(sc.name, {}).setdefault(row_label(result, sc), []).append(
            metrics(result, sc)
        )
    med = {
        name: {server: medians(ms) for server, ms in by_server.items()}
        for name, by_server in per_run.items()
    }
    return per_run, med


def _load(path: Path) -> dict[str, Any] | None:
    """The raw results of one invocation, or None if unreadable or of an older format."""
    try:
        results: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("argv", "date", "machine", "scenarios", "run_count", "servers", "runs")
    return results if all(k in results for k in keys) else None


def _latest_results(but: Path | None = None) -> list[dict[str, Any]]:
    """bench/.build/results-*.json (but ``but``), oldest first (their names sort by time)."""
    loaded = (_load(p) for p in sorted(BUILD.glob("results-*.json")) if p != but)
    return [r for r in loaded if r is not None]


def _pick(candidates: Sequence[dict[str, Any]], names: Sequence[str] | None) -> list[Any]:
    """For each scenario, the last of ``candidates`` that measured it (at least one run
    completed; else the last that tried): [(results, [scenario names])], in the order
    of ``names`` (default: the scenarios of the candidates as they come)."""
    if names is None:
        names = list(dict.fromkeys(sc["name"] for r in candidates for sc in r["scenarios"]))
    chosen: dict[str, int] = {}
    for name in names:
        tried = [i for i, r in enumerate(candidates) if name in _scenario_names(r)]
        ran = [i for i in tried if any(run["scenario"] == name for run in candidates[i]["runs"])]
        if tried:
            chosen[name] = (ran or tried)[-1]
    picks: list[Any] = []
    for i in sorted(set(chosen.values())):
        picks.append((candidates[i], [n for n in names if chosen.get(n) == i]))
    return picks


def _scenario_names(results: dict[str, Any]) -> list[str]:
    return [sc["name"] for sc in results["scenarios"]]


def _error_scenario(error: str) -> str:
    """The scenario of a failed run's message: "run 2, 1000x50, nchan: why"."""
    parts = error.split(", ", 2)
    return parts[1] if len(parts) > 1 else ""


def _error_row(error: str) -> str:
    """The row (server or variant) of a failed run's message."""
    parts = error.split(", ", 2)
    return parts[2].split(": ", 1)[0] if len(parts) > 2 else ""


def _failed(errors: Sequence[str]) -> dict[str, list[str]]:
    """Scenario -> the rows with a failed run."""
    out: dict[str, list[str]] = {}
    for e in errors:
        rows = out.setdefault(_error_scenario(e), [])
        if _error_row(e) not in rows:
            rows.append(_error_row(e))
    return out


def _negotiated(
    scenarios: Sequence[Scenario], raw: Sequence[dict[str, Any]]
) -> dict[str, dict[str, str]]:
    """TLS scenario -> server -> the protocol and cipher suite its first stream got."""
    by_name = {sc.name: sc for sc in scenarios if sc.tls}
    out: dict[str, dict[str, str]] = {}
    for r in raw:
        sc = by_name.get(r["scenario"])
        if sc is not None and r["connected"].get("tls"):
            out.setdefault(sc.name, {}).setdefault(row_label(r, sc), r["connected"]["tls"])
    return out


def _plain_twin(sc: Scenario, measured: Sequence[Scenario]) -> Scenario | None:
    """The plain scenario of a TLS scenario's shape among ``measured``."""
    return next((p for p in measured if not p.tls and not p.idle and p.same_shape(sc)), None)


def _write_doc(picks: Sequence[tuple[dict[str, Any], Sequence[str]]], doc: Path) -> None:
    """docs/benchmarks.md from raw results: each scenario from the results given
    with it (see :func:`_pick`), and bench/notes.md."""
    order = [sc.name for sc in FULL]
    scenarios: list[Scenario] = []
    raw: list[dict[str, Any]] = []
    errors: list[str] = []
    sources: list[Source] = []
    servers: dict[str, str] = {}
    profiles: list[str] = []
    frozen_server: str | None = None
    baseline_of: dict[str, str] = {}
    tls_plain: dict[str, Scenario | None] = {}
    for results, names in picks:
        these = [Scenario(**sc) for sc in results["scenarios"] if sc["name"] in names]
        scenarios += these
        baseline = results.get("baseline")
        if baseline:
            baseline_of.update({sc.name: baseline["server"] for sc in these if not sc.frozen})
        # TLS's cost needs the plain twin measured by the same invocation, and shown.
        tls_plain.update({sc.name: _plain_twin(sc, these) for sc in these if sc.tls})
        raw += [r for r in results["runs"] if r["scenario"] in names]
        errors += [e for e in results.get("errors", []) if _error_scenario(e) in names]
        sources.append(
            Source(
                command=shlex.join(["python", "-m", "bench", *results["argv"]]),
                date=results["date"],
                commit=results["machine"].get("commit", "?"),
                runs=results["run_count"],
                scenarios=tuple(sc.title for sc in these),
            )
        )
        if any(not sc.frozen for sc in these):
            servers.update(results["servers"])
        if any(sc.frozen for sc in these):
            frozen_server = results.get("frozen_server", frozen_server)
        profiles = results.get("profiles") or profiles
    scenarios.sort(key=lambda sc: order.index(sc.name) if sc.name in order else len(order))
    per_run, med = _summarise(scenarios, raw)
    method = METHOD + (METHOD_FROZEN if any(sc.frozen for sc in scenarios) else "")
    method += METHOD_TLS if any(sc.tls for sc in scenarios) else ""
    method += METHOD_BASELINE if baseline_of else ""
    notes = BENCH / "notes.md"
    text = render_doc(
        sources=sources,
        machine=picks[-1][0]["machine"],
        scenarios=scenarios,
        servers=servers,
        med=med,
        per_run=per_run,
        errors=errors,
        profile_md="\n".join(profiles) or None,
        method_md=method,
        notes_md=notes.read_text() if notes.exists() else None,
        frozen_server=frozen_server,
        baseline_of=baseline_of,
        tls_plain=tls_plain,
        negotiated=_negotiated(scenarios, raw),
        failed=_failed(errors),
    )
    redis_results = scaleout.latest_results()
    if redis_results is not None:  # the latest scale-out invocation's section
        text = scaleout.splice(text, scaleout.section(redis_results))
    fleet_md = fleet_report.section()
    if fleet_md is not None:  # each one-process scenario from its latest invocation
        text = _splice_fleet(text, fleet_md)
    doc.write_text(text)
    _log(f"wrote {doc}: " + "; ".join(f"{', '.join(n)} from {s.command}" for s, n in zip(
        sources, (names for _, names in picks), strict=True
    )))  # fmt: skip


def _splice_fleet(doc: str, md: str) -> str:
    """``doc`` with the one-process section ``md`` in place (before the scale-out
    section when it is new) and its notes as bench/notes.md has them now."""
    doc = splice_section(doc, fleet_report.SECTION, md, before=(scaleout.SECTION, "## Notes"))
    notes = BENCH / "notes.md"
    if notes.exists():
        doc = splice_section(doc, "## Notes", "## Notes\n\n" + notes.read_text())
    return doc


def _render_fleet(doc: Path) -> int:
    """``--render --scenarios <one-process scenarios>``: their section and the notes,
    spliced into the doc from the latest raw results; the rest of the doc is kept."""
    md = fleet_report.section()
    if md is None:
        raise SystemExit(f"no raw results of the one-process scenarios in {BUILD}")
    doc.write_text(_splice_fleet(doc.read_text(), md))
    _log(f"wrote the one-process section and the notes of {doc}")
    return 0


def _render(files: Sequence[Path], doc: Path) -> int:
    """``--render``: the doc again from raw results, without running anything."""
    if files:
        loaded = [(_load(f), f) for f in files]
        bad = [str(f) for r, f in loaded if r is None]
        if bad:
            raise SystemExit(f"not raw results of this bench: {', '.join(bad)}")
        picks = _pick([r for r, _ in loaded if r is not None], None)
    else:
        picks = _pick(_latest_results(), [sc.name for sc in FULL])
    if not picks:
        raise SystemExit(f"no raw results in {BUILD}")
    _write_doc(picks, doc)
    return 0


def _jobs(
    sc: Scenario, servers: Sequence[Server], frozen_server: Server | None, run: int
) -> list[tuple[Server, int]]:
    """The measurements of one run of a scenario: (server, frozen readers)."""
    if sc.tls:
        return [(server, 0) for server in servers if server.tls]
    if not sc.frozen:
        return [(server, 0) for server in servers]
    if frozen_server is None:
        return []
    # Both variants, one after the other; the order alternates from run to run.
    variants = [(frozen_server, 0), (frozen_server, sc.frozen)]
    return variants if run % 2 == 0 else variants[::-1]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    asked = [n.strip() for n in (args.scenarios or "").split(",") if n.strip()]
    if args.render is not None:
        if asked and not args.render and all(n in fleet.FLEET for n in asked):
            return _render_fleet(args.doc or DOC)
        return _render(args.render, args.doc or DOC)
    if any(n in scaleout.SCALEOUT for n in asked):
        return _scaleout(args, asked, argv_list)
    if any(n in fleet.FLEET for n in asked):
        return _fleet(args, asked, argv_list)
    scenarios: list[Scenario] = _select(QUICK if args.quick else FULL, args.scenarios, "scenario")
    if args.duration:
        scenarios = [
            sc if sc.idle else dataclasses.replace(sc, duration=args.duration) for sc in scenarios
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
    baseline: Server | None = None
    baseline_info: dict[str, str] | None = None
    if args.baseline:
        baseline, full = snapshot_baseline(args.baseline, BUILD / "baseline")
        baseline_info = {"ref": args.baseline, "commit": full, "server": baseline.name}
        _log(f"baseline: {baseline.name} ({args.baseline}) in {baseline.cwd}")
        # Right after the work tree's copy in every round: the closest pairing.
        at = next((i + 1 for i, s in enumerate(servers) if s.name == "sse_handler"), 0)
        servers.insert(at, baseline)
    library = next((s for s in servers if s.name == "sse_handler"), None)
    for ms in reversed(args.coalesce_windows):
        if library is None:
            raise SystemExit("--coalesce-windows needs sse_handler among --servers")
        # Right after the work tree's copy in every round, as the baseline is.
        servers.insert(servers.index(library) + 1, coalescing(library, ms))
    cert: Cert | None = None
    cert_error = ""
    if any(sc.tls for sc in scenarios):
        try:
            cert = make_cert(BUILD / "tls")
            _log(f"TLS: {cert.description} in {cert.cert.parent.relative_to(REPO)}")
        except (OSError, subprocess.CalledProcessError) as exc:
            cert_error = f"no certificate for the TLS scenarios: {exc}"
            _log(cert_error)
    library = next(s for s in wanted if s.name == "sse_handler")
    # The frozen-readers scenarios: sse_handler only, on the demo with a short
    # write deadline (served from the same copy of the library).
    frozen_server = (
        dataclasses.replace(FROZEN_SERVER, cwd=library.cwd)
        if any(s.name == "sse_handler" for s in servers)
        else None
    )
    raw: list[dict[str, Any]] = []
    errors: list[str] = []
    for i in range(0 if args.profile_only else runs):
        for sc in scenarios:
            for server, frozen in _jobs(sc, servers, frozen_server, i):
                label = row_label({"server": server.name, "frozen": frozen}, sc)
                _log(f"run {i + 1}/{runs}: {label}, {sc.title}")
                if sc.tls and cert is None:
                    errors.append(f"run {i + 1}, {sc.name}, {label}: {cert_error}")
                    continue
                try:
                    result = run_once(server, sc, loadgen, frozen=frozen, cert=cert)
                except BenchError as exc:
                    errors.append(f"run {i + 1}, {sc.name}, {label}: {exc}")
                    _log(f"  failed: {exc}")
                    continue
                raw.append({"run": i + 1, **result})
                m = metrics(raw[-1], sc)
                _log("  " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))
    per_run, med = _summarise(scenarios, raw)
    for sc in scenarios:
        if sc.name in med:
            print(f"\n## {sc.title} (median of {runs})\n\n{summary_table(sc, med[sc.name])}")
    if baseline is not None:
        of = {sc.name: baseline.name for sc in scenarios if not sc.frozen}
        table = baseline_table(scenarios, med, per_run, of)
        if table is not None:
            print(f"\n## Before and after: sse_handler ÷ {baseline.name}\n\n{table}")
    negotiated, failed = _negotiated(scenarios, raw), _failed(errors)
    for sc in scenarios:
        if sc.tls:
            plain = _plain_twin(sc, scenarios)
            table = tls_table(
                sc, plain, med, per_run, negotiated.get(sc.name, {}), failed.get(sc.name, [])
            )
            against = f"÷ {plain.title}" if plain else "(no plain run of its shape)"
            print(f"\n## What TLS costs: {sc.title} {against}\n\n{table}")
    profiles: list[str] = []
    want_profile = args.profile_only or (
        args.profile if args.profile is not None else not args.quick
    )
    if want_profile:
        busy = next((s for s in scenarios if s.name == PROFILED), None)
        busy = busy or next(
            (s for s in scenarios if not s.idle and not s.frozen and not s.tls), None
        )
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
        "frozen_server": None if frozen_server is None else frozen_server.description,
        "baseline": baseline_info,
        "tls": None if cert is None else cert.description,
        "runs": raw,
        "errors": errors,
        "profiles": profiles,
    }
    path = BUILD / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    _log(f"raw results: {path.relative_to(REPO)} (python -m bench --render it again)")
    doc = args.doc or (None if args.quick or args.no_doc or args.profile_only else DOC)
    if doc is not None:
        if args.quick:  # an explicit --doc: this invocation's scenarios alone
            picks = _pick([results], None)
        else:  # the full run's scenarios, each from the latest invocation that measured it
            names = [sc.name for sc in FULL]
            names += [n for n in _scenario_names(results) if n not in names]
            candidates = [*_latest_results(but=path), results]
            picks = _pick(candidates, names)
            missing = [n for n in names if not any(n in _scenario_names(r) for r in candidates)]
            if missing and doc == DOC and DOC.exists():
                # A new machine has no raw results of earlier runs: writing the
                # doc would drop their sections.
                side = BUILD / f"doc-{stamp}.md"
                _log(
                    f"no raw results in bench/.build for {', '.join(missing)}: the doc "
                    f"would lose their sections, so this run's doc is {side.relative_to(REPO)}; "
                    f"merge its sections into {DOC.relative_to(REPO)} by hand"
                )
                doc = side
        _write_doc(picks, doc)
    for e in errors:
        _log(f"FAILED {e}")
    return 1 if errors else 0


def _separate_servers(args: argparse.Namespace, what: str, missing: str | None) -> list[str]:
    """The servers asked of scenarios that run on their own (scale-out,
    one-process): sse_handler and nchan only, no ``--baseline``; ``missing``
    (what the scenarios lack) or nchan's lack stops the run."""
    if args.baseline:
        raise SystemExit(f"--baseline is for the plain scenarios, not the {what} ones")
    known = ("sse_handler", "nchan")
    servers = [s.strip() for s in (args.servers or ",".join(known)).split(",") if s.strip()]
    if any(s not in known for s in servers):
        raise SystemExit(f"the {what} scenarios know the servers {', '.join(known)}")
    nchan = next(s for s in SERVERS if s.name == "nchan")
    why = missing or (nchan.missing() if "nchan" in servers else None)
    if why:
        raise SystemExit(why)
    return servers


def _separate_setup() -> tuple[Path, Path, str]:
    """The load generator, and a copy of the work tree to serve sse_handler
    from (with its commit), for scenarios that run on their own."""
    _raise_fd_limit()
    BUILD.mkdir(exist_ok=True)
    _log("building the load generator")
    loadgen = build_loadgen()
    snapshot = BUILD / "snapshot"
    _, commit = snapshot_library(list(SERVERS), snapshot)
    _log(f"sse_handler is served from a copy of the work tree ({commit}) in {snapshot}")
    return loadgen, snapshot, commit


def _scaleout(args: argparse.Namespace, names: list[str], argv: list[str]) -> int:
    """The scale-out scenarios on Redis (bench/scaleout.py): their own runs, their
    own raw results (``bench/.build/scaleout-results-*.json``) and their section of
    the doc, spliced into it in place."""
    other = [n for n in names if n not in scaleout.SCALEOUT]
    if other:
        raise SystemExit(f"the scale-out scenarios run on their own, not with: {', '.join(other)}")
    servers = _separate_servers(args, "scale-out", scaleout.redis_missing())
    loadgen, snapshot, commit = _separate_setup()
    results = scaleout.main(
        names, servers, args.runs or 3, loadgen, snapshot,
        {**machine_info(), "commit": commit}, argv, _log,
    )  # fmt: skip
    path = BUILD / f"scaleout-results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    _log(f"raw results: {path.relative_to(REPO)}")
    md = scaleout.section(results)
    print("\n" + md)
    doc = args.doc or (None if args.no_doc else DOC)
    if doc is not None:
        doc.write_text(scaleout.splice(doc.read_text(), md))
        _log(f"wrote the scale-out section of {doc}")
    for e in results["errors"]:
        _log(f"FAILED {e}")
    return 1 if results["errors"] else 0


def _fleet(args: argparse.Namespace, names: list[str], argv: list[str]) -> int:
    """One process, many streams (bench/fleet.py): their own runs, raw results
    (``bench/.build/fleet-results-*.json``) and section of the doc, spliced into it
    in place with each of these scenarios from the latest invocation that measured
    it; the notes are spliced again too."""
    other = [n for n in names if n not in fleet.FLEET]
    if other:
        raise SystemExit(
            f"the one-process scenarios run on their own, not with: {', '.join(other)}"
        )
    servers = _separate_servers(args, "one-process", None)
    loadgen, snapshot, commit = _separate_setup()
    results = fleet.main(
        names, servers, args.runs or 3, loadgen, snapshot,
        {**machine_info(), "commit": commit}, argv, _log,
    )  # fmt: skip
    path = BUILD / f"fleet-results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    _log(f"raw results: {path.relative_to(REPO)}")
    md = fleet_report.section()
    if md is not None:
        print("\n" + md)
        doc = args.doc or (None if args.no_doc else DOC)
        if doc is not None:
            doc.write_text(_splice_fleet(doc.read_text(), md))
            _log(f"wrote the one-process section and the notes of {doc}")
    for e in results["errors"]:
        _log(f"FAILED {e}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
