"""Admin endpoint under load: do 1,000 scrapes of /metrics raise the stations' p99?

The node (``python -m router run``, profile 0, one primary backend = ``bench/csms.py``,
``[admin]`` on) carries N stations from ``bench/loadgen.py`` (paced, so the node is below
saturation and latency is the node's, not a queue's). Each round runs twice with fresh
processes: ``quiet`` (nobody asks the admin endpoint) and ``scraped`` (``--scrapes``
GETs of /metrics spread evenly over the measured window, over one keep-alive connection
as a Prometheus server would). The aim: p99 scraped / p99 quiet <= 1.1.

    .venv/bin/python bench/admin_load.py                 # 50 stations, 1,000 scrapes, ~2 min
    .venv/bin/python bench/admin_load.py --quick         # smoke run, < 30 s
    .venv/bin/python bench/admin_load.py --rate 0        # closed loop (the node saturates)
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchutil import percentile, raise_nofile_limit  # noqa: E402
from forwarding import (  # noqa: E402
    NODE_CONFIG,
    BenchError,
    LineProcess,
    cpu_seconds,
    machine_busy_seconds,
    wait_until_quiet,
)

from tests.nodeproc import NodeProcess, start_node  # noqa: E402

AIM = 1.1
ADMIN = '\n[admin]\nhost = "127.0.0.1"\nport = 0\n'


def start_admin_node(config: str, workdir: Path) -> tuple[NodeProcess, int]:
    """The node and its admin port (from the ``admin_listening`` log line)."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": pythonpath}
    node = start_node(config, workdir, env=env)
    try:
        admin = node.wait_for_event("admin_listening", timeout=20.0)
    except TimeoutError:
        node.stop()
        raise
    return node, int(admin["port"])


@dataclass
class Scraper:
    """GETs /metrics ``count`` times, evenly over ``seconds``, on one keep-alive connection."""

    port: int
    count: int
    seconds: float
    path: str = "/metrics"
    durations: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    body_bytes: int = 0
    samples: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        interval = self.seconds / self.count
        began = time.perf_counter()
        for i in range(self.count):
            delay = began + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            try:
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"HTTP {response.status}")
                    continue
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            self.durations.append(time.perf_counter() - t0)
            if i == 0:
                self.body_bytes = len(body)
                self.samples = sum(1 for line in body.splitlines()
                                   if line and not line.startswith(b"#"))
        conn.close()


def run_phase(phase: str, opts: argparse.Namespace) -> dict[str, Any]:
    """One measured window with fresh processes; ``phase`` is quiet or scraped."""
    with tempfile.TemporaryDirectory(prefix=f"bench-admin-{phase}-") as tmp:
        workdir = Path(tmp)
        csms = LineProcess.spawn("csms", [str(BENCH_DIR / "csms.py"), "--port", "0"], workdir)
        node: NodeProcess | None = None
        loadgen: LineProcess | None = None
        scraper: Scraper | None = None
        try:
            csms_port = int(csms.wait_for("listening", 20.0)["port"])
            config = NODE_CONFIG.format(csms_port=csms_port).replace(
                'id = "bench-edge"', f'id = "bench-edge"\nstate_dir = "{workdir}/state"')
            node, admin_port = start_admin_node(config + ADMIN, workdir)
            loadgen = LineProcess.spawn(
                "loadgen", [str(BENCH_DIR / "loadgen.py"), "--url", node.url(""),
                            "--stations", str(opts.stations), "--rate", str(opts.rate)],
                workdir)
            procs = [psutil.Process(x.pid) for x in (node.proc, loadgen.proc, csms.proc)]
            if opts.pin_plan:
                procs[0].cpu_affinity(opts.pin_plan["node"])
                for other in (*procs[1:], psutil.Process()):
                    other.cpu_affinity(opts.pin_plan["load"])
            loadgen.wait_connected_and_start(120.0, 30.0)
            time.sleep(opts.warmup)
            me = psutil.Process()
            cpu0 = [cpu_seconds(x) for x in (*procs, me)] + [machine_busy_seconds()]
            loadgen.send("mark")
            loadgen.wait_for("marked", 10.0)
            began = time.perf_counter()
            if phase == "scraped":
                scraper = Scraper(admin_port, opts.scrapes, opts.seconds, opts.path)
                scraper.start()
            time.sleep(max(0.0, opts.seconds - (time.perf_counter() - began)))
            if scraper is not None:
                scraper.join(60.0)  # the last scrape was due just before the window closed
            loadgen.send("end")
            cpu1 = [cpu_seconds(x) for x in (*procs, me)] + [machine_busy_seconds()]
            wall = time.perf_counter() - began
            summary = loadgen.wait_for("summary", 60.0)
            loadgen.wait_for("closed", 30.0)
            alive = node.alive()
        finally:
            if loadgen is not None:
                loadgen.stop()
            if node is not None:
                node.stop()
            csms.stop()
    durations = sorted(scraper.durations) if scraper is not None else []
    return {
        "phase": phase,
        "calls_per_s": summary["calls_per_s"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": summary["call_errors"] + summary["bad_answers"] + summary["disconnects"],
        "scrapes": len(durations),
        "scrape_failures": scraper.failures[:3] if scraper is not None else [],
        "scrape_failed": len(scraper.failures) if scraper is not None else 0,
        "scrape_p50_ms": percentile(durations, 50) * 1e3,
        "scrape_p99_ms": percentile(durations, 99) * 1e3,
        "scrape_bytes": scraper.body_bytes if scraper is not None else 0,
        "scrape_samples": scraper.samples if scraper is not None else 0,
        "node_alive": alive,
        "node_cpu_pct": (cpu1[0] - cpu0[0]) / wall * 100,
        # CPU the measured processes did not use: other jobs on the machine (noise)
        "other_cpu_pct": max(0.0, ((cpu1[-1] - cpu0[-1]) - sum(
            cpu1[i] - cpu0[i] for i in range(len(cpu1) - 1))) / wall * 100),
    }


def fmt(value: float, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total station calls/s, paced (0 = closed loop)")
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--path", default="/metrics",
                        help="what to GET (e.g. /healthz, to see the HTTP layer's own cost)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured window; the scrapes are spread over it (default 20)")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured load first")
    parser.add_argument("--rounds", type=int, default=None, help="quiet+scraped pairs (3)")
    parser.add_argument("--pin", action="store_true",
                        help="the node on the last CPU, everything else on the others")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="before each phase wait up to S seconds for an idle machine")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 200 scrapes")
    opts = parser.parse_args()
    if opts.quick:
        opts.seconds = opts.seconds or 4.0
        opts.warmup = 0.5 if opts.warmup is None else opts.warmup
        opts.rounds = opts.rounds or 1
        opts.scrapes = min(opts.scrapes, 200)
    opts.seconds = opts.seconds or 20.0
    opts.warmup = 2.0 if opts.warmup is None else opts.warmup
    opts.rounds = opts.rounds or 3
    raise_nofile_limit()
    cpus = sorted(psutil.Process().cpu_affinity() or [])
    opts.pin_plan = None
    if opts.pin:
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        opts.pin_plan = {"node": cpus[-1:], "load": cpus[:-1]}

    results: list[dict[str, Any]] = []
    for round_no in range(1, opts.rounds + 1):
        # alternate the order, so a drift in the machine's load favours neither phase
        for phase in ("quiet", "scraped") if round_no % 2 else ("scraped", "quiet"):
            if opts.quiet_wait > 0 and wait_until_quiet(opts.quiet_wait) is None:
                print(f"machine still busy after {opts.quiet_wait:g} s; running anyway",
                      file=sys.stderr)
            print(f"round {round_no} {phase:<8} ...", end=" ", file=sys.stderr, flush=True)
            try:
                result = run_phase(phase, opts)
            except (BenchError, TimeoutError, OSError) as exc:
                print(f"FAILED\n{exc}", file=sys.stderr)
                return 1
            result["round"] = round_no
            results.append(result)
            print(f"p99 {result['p99_ms']:.2f} ms (other {result['other_cpu_pct']:.0f}%)",
                  file=sys.stderr, flush=True)

    load = f"paced {opts.rate:g} calls/s" if opts.rate else "closed loop"
    print(f"\nadmin endpoint under load: {opts.stations} stations, {load}; "
          f"{opts.scrapes} scrapes of {opts.path} over each {opts.seconds:g} s window "
          f"({opts.scrapes / opts.seconds:.0f}/s, keep-alive); {os.cpu_count()} CPUs"
          f"{', node pinned' if opts.pin_plan else ''}; "
          "node serves [admin] itself\n")
    head = (f"{'round':>5} {'phase':<8} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'errors':>6} {'scrapes':>7} {'scrape p50':>10} {'scrape p99':>10} "
            f"{'node%':>5} {'other%':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['round']:>5} {r['phase']:<8} {r['calls_per_s']:>8.0f} {fmt(r['p50_ms']):>7} "
              f"{fmt(r['p99_ms']):>7} {r['errors']:>6} {r['scrapes'] or '-':>7} "
              f"{fmt(r['scrape_p50_ms']):>10} {fmt(r['scrape_p99_ms']):>10} "
              f"{r['node_cpu_pct']:>5.0f} {r['other_cpu_pct']:>6.0f}")
    ratios = []
    for round_no in range(1, opts.rounds + 1):
        quiet, scraped = (next(r for r in results if r["round"] == round_no and r["phase"] == p)
                          for p in ("quiet", "scraped"))
        ratios.append(scraped["p99_ms"] / quiet["p99_ms"])
    ratio = statistics.median(ratios)
    scraped_runs = [r for r in results if r["phase"] == "scraped"]
    sample = scraped_runs[0]
    print(f"\none scrape: {sample['scrape_bytes']:,} bytes, {sample['scrape_samples']} samples")
    print("node%: the node's CPU in the window (% of one core); other%: CPU of other work on "
          "the machine (noise: the p99 of a run with much of it is not comparable)")
    failed = sum(r["scrape_failed"] for r in scraped_runs)
    if failed:
        print(f"scrape failures: {failed} (e.g. {scraped_runs[0]['scrape_failures']})")
    if not all(r["node_alive"] for r in results):
        print("note: a node process had exited before the end of its run")
    print(f"p99 scraped / quiet per round: {', '.join(f'{x:.2f}x' for x in ratios)}; "
          f"median {ratio:.2f}x; aim <= {AIM}x: {'met' if ratio <= AIM else 'NOT met'}")
    return 0 if not failed and all(r["scrapes"] == opts.scrapes for r in scraped_runs) else 1


if __name__ == "__main__":
    sys.exit(main())
