"""Fleet benchmark: thousands of mostly idle stations through the node, against direct.

For each scenario (``direct``: stations straight to the bench CSMS; ``node``: through the
node, one socket per station upstream as a Local Controller opens them; ``node-tasks``,
asked for by name: the node with ``forwarding_loop = false``, a trio task per link) it
starts fresh processes and measures, in one run:

* **connect**: all ``--stations`` dial at once, ``--connect-concurrency`` at a time
  (a connect storm after a node restart): stations per second;
* **RSS per station** of the middle process once they are connected;
* **steady load**: each station sends a Heartbeat every ``--heartbeat`` seconds
  (``--mix heartbeat``), or that plus a StatusNotification and a MeterValues every 10-60 s
  each (``--mix fleet``), for ``--seconds`` after a warm-up: p50/p99/max of every CALL's
  round trip, CPU % of the middle process, CALLs answered and lost;
* **reconnect storm**: every station's link closed, then, once the middle and the CSMS
  are idle again (their wind-down of the sessions done), all dial again at once;
* **CPU per station** of each process (middle, CSMS, stations) and how busy the machine
  was, for the first connect, the stations leaving and the storm.

The stations' process runs no collector pass during the measured window
(``--loadgen-gc`` lets it): with 9,000 stations in one asyncio process a young
collection stalled all of them for 40-55 ms every two seconds and a full one for 130-170
ms every twenty, and they then sent what had come due in one burst. Those stalls set
the p99 of both scenarios (direct 38-62 ms, 4-10 ms without them, 2026-11-28). Real
stations are each their own machine. The CSMS's and the stations' own collector pauses
of 20 ms or more in the window are printed beside the figures, as are their CPU shares:
all three processes share this machine's cores.

``--profile 2`` runs both hops with TLS and the stations with Basic auth (security profile
2, a PKI made for the run, one password for all stations: see bench/forwarding.Profile2).

The load generator (bench/loadgen.py) and CSMS (bench/csms.py) are the forwarding
benchmark's; so is the way the node is started (bench/forwarding.py). The machine caps a
process at 20,000 open files, two per station through the node: N = 9,000 is the default.

    .venv/bin/python bench/fleet.py                              # N = 9000, ~6 minutes
    .venv/bin/python bench/fleet.py --stations 1000 --seconds 20 # quicker
    .venv/bin/python bench/fleet.py --trace /tmp/calls             # when was each CALL slow

Aims (issue 15): node p99 <= direct p99 + 20 ms; connect rate >= 0.5x direct; RSS <= 25 KiB
per station; every CALL answered. No aim is asserted: the figures are printed (and written
to bench/results/fleet-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import psutil  # type: ignore[import-untyped, unused-ignore]
from benchutil import write_results
from forwarding import (
    BENCH_DIR,
    BenchError,
    LineProcess,
    Middle,
    Profile2,
    cpu_seconds,
    cpu_seconds_sum,
    csms_argv,
    machine_busy_seconds,
    rss_bytes_sum,
    standalone_options,
    start_middle,
    stop_all,
)

SCENARIOS = ("direct", "node")
AIM_P99_EXTRA_MS = 20.0
AIM_CONNECT_RATIO = 0.5
AIM_KIB_PER_STATION = 25.0


def run_one(kind: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One scenario with fresh processes; the figures as a dict."""
    n = opts.stations
    with tempfile.TemporaryDirectory(prefix=f"fleet-{kind}-") as tmp:
        workdir = Path(tmp)
        profile2: Profile2 | None = opts.profile2
        csms = LineProcess.spawn("csms", csms_argv(
            "none", *(profile2.csms_flags() if profile2 else [])), workdir)
        middle: Middle | None = None
        loadgen: LineProcess | None = None
        try:
            csms_port = int(csms.wait_for("listening", 20.0)["port"])
            middle = start_middle(kind, csms_port, workdir, n, "none", opts)
            time.sleep(0.5)
            rss_before = rss_bytes_sum(middle.procs)
            loadgen = LineProcess.spawn("loadgen", [
                str(BENCH_DIR / "loadgen.py"), "--url", middle.url, "--stations", str(n),
                "--rate", str(n / opts.heartbeat), "--mix", opts.mix, "--storm",
                "--connect-concurrency", str(opts.connect_concurrency),
                "--no-wire-bytes", *(["--gc-off-in-window"] if not opts.loadgen_gc else []),
                *(profile2.loadgen_flags() if profile2 else []),
                *(["--trace", str(Path(f"{opts.trace}.{kind}.json").resolve())]
                  if opts.trace else [])], workdir)
            phases = {"dial": _now()}
            csms_ps = psutil.Process(csms.proc.pid)
            loadgen_ps = psutil.Process(loadgen.proc.pid)
            dial0 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            connected = loadgen.wait_for("connected", 900.0)
            dial1 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            phases["connected"] = _now()
            if connected["failed"]:
                raise BenchError(f"{connected['failed']} of {n} stations failed to connect "
                                 f"(first: {connected['first_error']})")
            time.sleep(1.0)
            rss_connected = rss_bytes_sum(middle.procs)
            loadgen.send("start")
            loadgen.wait_for("running", 60.0)
            time.sleep(opts.warmup)
            window0 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            epoch0 = time.time()
            phases["window"] = _now()
            loadgen.send("mark")
            loadgen.wait_for("marked", 30.0)
            time.sleep(max(0.0, opts.seconds - (time.perf_counter() - window0.wall)))
            loadgen.send("end")
            window = _used(window0, _cpu_marks(middle.procs, csms_ps, loadgen_ps))
            epoch1 = time.time()
            summary = loadgen.wait_for("summary", 120.0)
            leave0 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            loadgen.wait_for("closed", 120.0)
            # the middle sees every station leave: wait until it and the CSMS are idle, so
            # the storm measures dialling again and not the last sessions' wind-down
            wind_down_s = _wait_idle([*middle.procs, csms_ps])
            phases["window_end"] = _now()
            storm0 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            loadgen.send("storm")
            stormed = loadgen.wait_for("stormed", 900.0)
            storm1 = _cpu_marks(middle.procs, csms_ps, loadgen_ps)
            phases["storm_done"] = _now()
            loadgen.wait_for("storm_closed", 120.0)
            checks = middle.checks()
        finally:
            stop_all(loadgen, middle, csms)
        # a pause line is written as it ends: count those that overlap the window
        csms_pauses = [(p["generation"], p["ms"]) for p in _json_lines(csms.stderr_path)
                       if p.get("event") == "gc_pause"
                       and p["ts"] >= epoch0 and p["ts"] - p["ms"] / 1e3 <= epoch1]
    measured = bool(middle.procs)
    return {
        "scenario": kind,
        "security_profile": 2 if profile2 else 0,
        "stations": n,
        "mix": opts.mix,
        "heartbeat_s": opts.heartbeat,
        "connect_s": connected["seconds"],
        "connect_per_s": n / connected["seconds"] if connected["seconds"] else None,
        "storm_s": stormed["seconds"],
        "storm_per_s": stormed["stations"] / stormed["seconds"] if stormed["seconds"] else None,
        "storm_failed": stormed["failed"],
        "calls": summary["window_calls"],
        "calls_per_s": summary["calls_per_s"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "unanswered": summary["stuck_stations"] + summary["disconnects"] + summary["timeouts"],
        "call_errors": summary["call_errors"] + summary["bad_answers"],
        "middle_cpu_pct": window.middle / window.wall * 100 if measured else None,
        "csms_cpu_pct": window.csms / window.wall * 100,
        "loadgen_cpu_pct": window.loadgen / window.wall * 100,
        "machine_busy_pct": _busy_pct(window),
        "kib_per_station": (rss_connected - rss_before) / 1024 / n if measured else None,
        "middle_checks": checks,
        "helper_gc_pauses": {"csms": csms_pauses,
                             "loadgen": [tuple(p) for p in summary["gc_pauses"]]},
        "phases": phases,
        # CPU ms per station dialled, by process, and how busy the machine was: the
        # stations' figure for the first connect includes their process's start
        "connect_cpu": _per_station(_used(dial0, dial1), n, connected["seconds"]),
        "storm_cpu": _per_station(_used(storm0, storm1), stormed["stations"],
                                  stormed["seconds"]),
        # every station closing its link, until the middle and the CSMS are idle again
        "leave_cpu": _per_station(_used(leave0, storm0), n, storm0.wall - leave0.wall),
        "wind_down_s": wind_down_s,
    }


def _wait_idle(procs: list[psutil.Process], timeout_s: float = 60.0) -> float | None:
    """Wait until these processes together used under 5% of a core over 0.5 s (at least
    1 s after the call): the seconds waited, or None when they were still busy after
    ``timeout_s`` (the storm that follows then overlaps their work, and the report says)."""
    start = time.monotonic()
    time.sleep(0.5)
    while time.monotonic() < start + timeout_s:
        before = cpu_seconds_sum(procs)
        time.sleep(0.5)
        if cpu_seconds_sum(procs) - before < 0.025:
            return time.monotonic() - start
    return None


class _Marks(NamedTuple):
    """CPU seconds of the middle, the CSMS and the stations, the machine's busy seconds and
    the wall time: read at both ends of a phase (or, from :func:`_used`, what it took)."""

    middle: float
    csms: float
    loadgen: float
    busy: float
    wall: float


def _cpu_marks(middle: list[psutil.Process], csms: psutil.Process,
               loadgen: psutil.Process) -> _Marks:
    return _Marks(cpu_seconds_sum(middle), cpu_seconds(csms), cpu_seconds(loadgen),
                  machine_busy_seconds(), time.perf_counter())


def _used(before: _Marks, after: _Marks) -> _Marks:
    return _Marks(*(b - a for a, b in zip(before, after, strict=True)))


def _busy_pct(used: _Marks) -> float | None:
    """How busy the whole machine was over a phase, % of all its cores."""
    return used.busy / (used.wall * (psutil.cpu_count() or 1)) * 100 if used.wall > 0 else None


def _per_station(used: _Marks, stations: int, seconds: float) -> dict[str, float | None]:
    """A connect phase's CPU per station dialled (ms) for each process, and the share of
    the machine that was busy over the phase's wall time."""

    def ms(cpu_s: float) -> float | None:
        return cpu_s / stations * 1e3 if stations else None

    return {"middle_ms": ms(used.middle) if used.middle else None, "csms_ms": ms(used.csms),
            "stations_ms": ms(used.loadgen), "seconds": seconds,
            "machine_busy_pct": _busy_pct(used)}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects among a helper's stderr lines."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _now() -> str:
    """UTC wall time as the node's log lines write it, to place its events in the run."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def report(results: list[dict[str, Any]]) -> list[str]:
    by = {r["scenario"]: r for r in results}
    lines = [f"fleet: {results[0]['stations']} stations, --mix {results[0]['mix']}, heartbeat "
             f"every {results[0]['heartbeat_s']:g} s, security profile "
             f"{results[0]['security_profile']}",
             f"{'scenario':<10} {'connect/s':>9} {'storm/s':>8} {'calls/s':>8} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'max ms':>7} {'CPU %':>6} {'KiB/st':>7} {'lost':>5} {'errors':>6}"]
    for r in results:
        cpu = "-" if r["middle_cpu_pct"] is None else f"{r['middle_cpu_pct']:.0f}"
        kib = "-" if r["kib_per_station"] is None else f"{r['kib_per_station']:.1f}"
        lines.append(f"{r['scenario']:<10} {r['connect_per_s']:9.0f} {r['storm_per_s']:8.0f} "
                     f"{r['calls_per_s']:8.0f} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} "
                     f"{r['max_ms']:7.0f} {cpu:>6} {kib:>7} {r['unanswered']:5d} "
                     f"{r['call_errors']:6d}")
        lines.append(f"  {r['scenario']}: CPU % of the CSMS {r['csms_cpu_pct']:.0f}, of the "
                     f"stations' process {r['loadgen_cpu_pct']:.0f}; all {psutil.cpu_count()} "
                     f"cores {r['machine_busy_pct']:.0f}% busy; their collector pauses >= 20 "
                     f"ms in the window (generation, ms): {r['helper_gc_pauses']}")
        lines.append(f"  {r['scenario']}: {_connect_cpu_line(r)}")
        if r["wind_down_s"] is None:
            lines.append(f"  {r['scenario']}: still busy 60 s after the stations left: the "
                         "storm overlapped that work")
        checks = r["middle_checks"]
        if "gc_long_pauses" in checks:
            lines.append(f"  {r['scenario']}: {checks['gc_long_pauses']} GC pauses >= 20 ms, "
                         f"longest logged {checks['gc_pause_max_ms']:.0f} ms "
                         f"({checks['gc_pause_max_cpu_ms']:.0f} ms of CPU); logged pauses by "
                         f"generation (ms): {checks['gc_logged_by_generation']}")
    if "direct" in by and "node" in by:
        d, n = by["direct"], by["node"]
        extra = n["p99_ms"] - d["p99_ms"]
        ratio = n["connect_per_s"] / d["connect_per_s"]
        storm = n["storm_per_s"] / d["storm_per_s"]
        lines.append(f"node p99 - direct p99: {extra:+.1f} ms (aim <= {AIM_P99_EXTRA_MS:g}: "
                     f"{_met(extra <= AIM_P99_EXTRA_MS)}); connect rate {ratio:.3f}x direct "
                     f"(aim >= {AIM_CONNECT_RATIO:g}: {_met(ratio >= AIM_CONNECT_RATIO)}), "
                     f"storm {storm:.3f}x; {n['kib_per_station']:.1f} KiB per station "
                     f"(aim <= {AIM_KIB_PER_STATION:g}: "
                     f"{_met(n['kib_per_station'] <= AIM_KIB_PER_STATION)}); "
                     f"{n['unanswered']} CALLs unanswered ({_met(n['unanswered'] == 0)})")
    return lines


def _met(held: bool) -> str:
    return "ok" if held else "MISSED"


def _connect_cpu_line(r: dict[str, Any]) -> str:
    """CPU per station, by process: first connect, leaving, storm."""
    phases = (r["connect_cpu"], r["leave_cpu"], r["storm_cpu"])

    def each(key: str, spec: str = ".2f") -> str:
        return "/".join("-" if p[key] is None else f"{p[key]:{spec}}" for p in phases)

    node = f"node {each('middle_ms')}, " if phases[0]["middle_ms"] is not None else ""
    return (f"CPU ms per station (connect/leave/storm): {node}CSMS {each('csms_ms')}, "
            f"stations {each('stations_ms')} (their connect includes their process's "
            f"start); all cores busy {each('machine_busy_pct', '.0f')}%")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=9000)
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="seconds between a station's Heartbeats (default 5)")
    parser.add_argument("--mix", choices=("heartbeat", "fleet"), default="heartbeat")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="direct, node, node-tasks (the node without its forwarding loop)")
    parser.add_argument("--profile", type=int, choices=(0, 2), default=0,
                        help="security profile on both hops: 0 (plain), 2 (TLS and Basic "
                             "auth, a PKI made for the run)")
    parser.add_argument("--distinct-passwords", action="store_true",
                        help="with --profile 2: a password (and a [[stations]] entry) per "
                             "station, so each first connection costs the node a scrypt check")
    parser.add_argument("--loadgen-gc", action="store_true",
                        help="let the stations' process run its collector in the measured "
                             "window too (it stalls all stations for 40-170 ms at a time at "
                             "N = 9,000, in both scenarios)")
    parser.add_argument("--trace", default=None,
                        help="write every measured CALL's send time and round trip to "
                             "<this path>.<scenario>.json")
    parser.add_argument("--json", default=None, help="results file (default bench/results/...)")
    opts = parser.parse_args()
    standalone_options(opts, opts.stations)
    results = []
    with tempfile.TemporaryDirectory(prefix="fleet-pki-") as pki:
        names = [f"BENCH{i:04d}" for i in range(opts.stations)]  # loadgen's default names
        opts.profile2 = (Profile2.make(Path(pki), names if opts.distinct_passwords else None)
                         if opts.profile == 2 else None)
        for kind in opts.scenarios.split(","):
            print(f"running {kind} ...", file=sys.stderr, flush=True)
            results.append(run_one(kind, opts))
    for line in report(results):
        print(line)
    write_results(results, "fleet", opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
