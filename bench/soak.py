"""Soak: the node for half an hour or more under steady load, stations coming and going.

One run (issue 15, item 5): ``--stations`` stations through the node to the bench CSMS,
offering ``--rate`` CALLs per second in all (Heartbeats, or ``--mix fleet``), each station
leaving after a random lifetime (exponential, mean ``--churn`` seconds, never with a CALL
in flight) and dialling again at once. After ``--warmup`` minutes the node's RSS is
sampled every ``--sample`` seconds for ``--minutes``. The warm-up should cover the node's
first garbage collector sweep (router/gcwatch.py: due once 1,000 sessions have ended, run
within 300 s), before which frozen cycles of ended sessions accumulate; the figures:

* RSS at the end of the warm-up, its highest and its last sample, and the growth (aim:
  no more than 5%);
* every CALL answered (aim: none lost): CALLs that waited more than ``--call-timeout``,
  links closed under a station, stations stuck at the end;
* CALLs per second, p50/p99/max, the node's CPU, departures and re-dials, and the node's
  garbage collector sweeps (``gc_sweep`` log lines) and long pauses.

    .venv/bin/python bench/soak.py                      # 10 + 30 minutes, 2,000 stations
    .venv/bin/python bench/soak.py --minutes 3 --warmup 1   # a quick look

Long runs live here, never in the test suite. Writes bench/results/soak-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchutil import write_results
from forwarding import (
    BENCH_DIR,
    LineProcess,
    Middle,
    cpu_seconds_sum,
    csms_argv,
    rss_bytes_sum,
    standalone_options,
    start_middle,
    stop_all,
)

AIM_GROWTH_PCT = 5.0


def soak(opts: argparse.Namespace) -> dict[str, Any]:
    n = opts.stations
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        csms = LineProcess.spawn("csms", csms_argv("none"), workdir)
        middle: Middle | None = None
        loadgen: LineProcess | None = None
        try:
            csms_port = int(csms.wait_for("listening", 20.0)["port"])
            middle = start_middle("node", csms_port, workdir, n, "none", opts)
            loadgen = LineProcess.spawn("loadgen", [
                str(BENCH_DIR / "loadgen.py"), "--url", middle.url, "--stations", str(n),
                "--rate", str(opts.rate), "--mix", opts.mix, "--churn", str(opts.churn),
                "--call-timeout", str(opts.call_timeout),
                "--connect-concurrency", "256"], workdir)
            loadgen.wait_connected_and_start(900.0, 60.0)
            time.sleep(opts.warmup * 60.0)
            samples: list[tuple[float, float]] = []  # (minutes into the window, MiB)
            cpu0 = cpu_seconds_sum(middle.procs)
            wall0 = time.perf_counter()
            loadgen.send("mark")
            loadgen.wait_for("marked", 30.0)
            end = wall0 + opts.minutes * 60.0
            while True:
                now = time.perf_counter()
                samples.append(((now - wall0) / 60.0, rss_bytes_sum(middle.procs) / 2**20))
                if now >= end:
                    break
                time.sleep(min(opts.sample, end - now))
            loadgen.send("end")
            cpu1 = cpu_seconds_sum(middle.procs)
            wall = time.perf_counter() - wall0
            summary = loadgen.wait_for("summary", 120.0)
            loadgen.wait_for("closed", 120.0)
            time.sleep(1.0)
            checks = middle.checks()
        finally:
            stop_all(loadgen, middle, csms)
    start_mib, last_mib = samples[0][1], samples[-1][1]
    peak_mib = max(mib for _, mib in samples)
    return {
        "stations": n,
        "offered_calls_per_s": opts.rate,
        "mix": opts.mix,
        "churn_mean_s": opts.churn,
        "warmup_min": opts.warmup,
        "minutes": wall / 60.0,
        "calls": summary["window_calls"],
        "calls_per_s": summary["calls_per_s"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "unanswered": (summary["timeouts"] + summary["disconnects"]
                       + summary["stuck_stations"]),
        "timeouts": summary["timeouts"],
        "disconnects": summary["disconnects"],
        "stuck_stations": summary["stuck_stations"],
        "call_errors": summary["call_errors"] + summary["bad_answers"],
        "departures": summary["departures"],
        "rejoin_failures": summary["rejoin_failures"],
        "node_cpu_pct": (cpu1 - cpu0) / wall * 100,
        "rss_start_mib": start_mib,
        "rss_peak_mib": peak_mib,
        "rss_last_mib": last_mib,
        "rss_growth_pct": (last_mib - start_mib) / start_mib * 100,
        "rss_peak_growth_pct": (peak_mib - start_mib) / start_mib * 100,
        "rss_median_last_quarter_mib": statistics.median(
            mib for minute, mib in samples if minute >= 0.75 * samples[-1][0]),
        "rss_samples": [(round(m, 2), round(mib, 1)) for m, mib in samples],
        "gc_sweeps": checks.get("gc_sweeps", []),
        "node_checks": checks,
    }


def report(r: dict[str, Any]) -> list[str]:
    growth = r["rss_growth_pct"]
    return [
        f"soak: {r['stations']} stations, {r['offered_calls_per_s']:g} CALLs/s offered "
        f"(--mix {r['mix']}), each leaving and dialling again after {r['churn_mean_s']:g} s "
        f"on average; {r['minutes']:.1f} minutes after {r['warmup_min']:g} of warm-up",
        f"  CALLs {r['calls']} ({r['calls_per_s']:.0f}/s), p50 {r['p50_ms']:.1f} ms, "
        f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms; node CPU {r['node_cpu_pct']:.0f}%",
        f"  departures {r['departures']}, re-dials failed {r['rejoin_failures']}; "
        f"GC sweeps {len(r['gc_sweeps'])}"
        + (f" (longest {max(s.get('ms', 0.0) for s in r['gc_sweeps']):.0f} ms)"
           if r["gc_sweeps"] else ""),
        f"  RSS after warm-up {r['rss_start_mib']:.1f} MiB, peak {r['rss_peak_mib']:.1f}, "
        f"last {r['rss_last_mib']:.1f}: {growth:+.1f}% (aim <= +{AIM_GROWTH_PCT:g}%: "
        f"{'ok' if growth <= AIM_GROWTH_PCT else 'OVER'})",
        f"  CALLs unanswered: {r['unanswered']} (timeouts {r['timeouts']}, links closed "
        f"{r['disconnects']}, stuck {r['stuck_stations']}); CALLERRORs {r['call_errors']}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stations", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=1000.0, help="CALLs/s offered in all")
    parser.add_argument("--mix", choices=("heartbeat", "fleet"), default="heartbeat")
    parser.add_argument("--churn", type=float, default=300.0,
                        help="mean seconds a station stays connected (default 300)")
    parser.add_argument("--minutes", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="minutes before it (default 10: past the first GC sweep)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--call-timeout", type=float, default=60.0)
    parser.add_argument("--json", default=None, help="results file (default bench/results/...)")
    opts = parser.parse_args()
    standalone_options(opts, opts.stations)
    result = soak(opts)
    for line in report(result):
        print(line)
    write_results(result, "soak", opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
