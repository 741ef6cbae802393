"""Forwarding benchmark: what the edge gateway costs compared with no proxy and a naive one.

For every N in ``--stations`` it runs four scenarios, each with fresh processes:

* ``direct``: the load generator's stations talk straight to the bench CSMS;
* ``relay``: through ``bench/relay.py``, a plain trio-websocket copy loop;
* ``nginx``: through nginx as a plain WebSocket reverse proxy (bench/nginx.py; the
  binary is installed with apt-get when missing, the scenario skipped if that fails);
* ``node``: through the real node (``python -m router run``, security profile 0,
  one primary backend = the bench CSMS), started with ``tests/nodeproc.start_node``.

The load generator (bench/loadgen.py) and the CSMS (bench/csms.py) run in their own
processes, so psutil figures for the middle process (relay, nginx or node) are its own.
Once all N stations are connected they run sequential CALLs (MeterValues, ~300 bytes)
for a warm-up, then for ``--seconds`` measured. ``--compression deflate`` (or
``none,deflate`` for both in one run) turns permessage-deflate on for every hop.
See bench/README.md.

    .venv/bin/python bench/forwarding.py             # N = 50, 500; ~4 minutes
    .venv/bin/python bench/forwarding.py --quick     # smoke run, < 30 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped, unused-ignore]
from benchutil import raise_nofile_limit, stop_process
from nginx import find_nginx, start_nginx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SCENARIOS = ("direct", "relay", "nginx", "node")
# stripped relays from the node's own parts (bench/floor.py), asked for by name only:
# what WebSocket framing in Python costs per frame, and what trio's task per link adds
FLOOR_SCENARIOS = {"floor-loop": "loop", "floor-tasks": "tasks"}
# the node with ``forwarding_loop = false``: a task per link, as before the forwarding loop
TASK_SCENARIOS = ("node-tasks",)
COMPRESSIONS = ("none", "deflate")
# duplication scenarios: the node with secondary backends subscribed to MeterValues
SECONDARY_SCENARIOS = {"node+1sec": (1, 0), "node+3sec": (2, 1)}  # (answering, stalled)
# in table order: the floor relays between nginx and the node
ALL_SCENARIOS = (*SCENARIOS[:-1], *FLOOR_SCENARIOS, *TASK_SCENARIOS, SCENARIOS[-1],
                 *SECONDARY_SCENARIOS)

AIM_US_PER_FRAME = 45.0
AIM_KIB_PER_STATION = 25.0
AIM_KIB_PER_STATION_DEFLATE = 32.0  # permessage-deflate on both hops
LOADGEN_SATURATED = 0.90  # fraction of one core
OTHER_BUSY = 0.15  # fraction of one core used by the rest of the machine
QUIET_BUSY = 0.10  # --quiet-wait: the machine counts as idle below this (one core = 1)

NODE_CONFIG = """\
[node]
id = "bench-edge"
call_timeout_s = 30
max_queued_calls = 16

[listen]
host = "127.0.0.1"
port = 0
path = "/ocpp"
subprotocols = ["ocpp2.1", "ocpp2.0.1", "ocpp1.6"]
security_profile = 0
max_message_bytes = 65536

[[stations]]
match = "*"

[[backends]]
name = "main"
role = "primary"
url = "ws://127.0.0.1:{csms_port}/ocpp"
auth = "none"
"""


class BenchError(RuntimeError):
    pass


@dataclass
class LineProcess:
    """A bench helper subprocess that talks JSON lines on stdout (and reads stdin)."""

    name: str
    proc: subprocess.Popen[str]
    stderr_path: Path
    lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)

    @classmethod
    def spawn(cls, name: str, argv: list[str], workdir: Path) -> LineProcess:
        stderr_path = workdir / f"{name}.stderr"
        with stderr_path.open("w") as errfile:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errfile,
                text=True,
                bufsize=1,
            )
        helper = cls(name=name, proc=proc, stderr_path=stderr_path)
        threading.Thread(target=helper._pump, daemon=True).start()
        return helper

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise BenchError(
                    f"{self.name}: no {event!r} within {timeout}s" + self.tail()
                ) from None
            if line is None:
                raise BenchError(f"{self.name} exited waiting for {event!r}" + self.tail())
            if line.get("event") == event:
                return line

    def wait_connected_and_start(self, connect_timeout: float,
                                 start_timeout: float) -> dict[str, Any]:
        """A load generator's stations all connected (else BenchError), then set going;
        the ``connected`` line."""
        connected = self.wait_for("connected", connect_timeout)
        if connected["failed"]:
            raise BenchError(f"{connected['failed']} stations failed to connect "
                             f"(first: {connected['first_error']})")
        self.send("start")
        self.wait_for("running", start_timeout)
        return connected

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def tail(self) -> str:
        try:
            text = self.stderr_path.read_text()
        except OSError:
            return ""
        return "\n--- stderr ---\n" + "\n".join(text.splitlines()[-30:]) if text else ""

    def stop(self) -> None:
        stop_process(self.proc)


def cpu_seconds(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


def cpu_seconds_sum(procs: list[psutil.Process]) -> float:
    return sum(cpu_seconds(proc) for proc in procs)


def kernel_seconds_sum(procs: list[psutil.Process]) -> float:
    """The part of :func:`cpu_seconds_sum` spent in the kernel (system time): for a relay
    on loopback, mostly the TCP work of its sends and receives, which any relay pays."""
    return sum(float(proc.cpu_times().system) for proc in procs)


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over all CPUs (includes steal and interrupts;
    guest time is counted in user and nice already, so not again, as psutil's
    cpu_percent does)."""
    t = psutil.cpu_times()
    guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - guest)


def rss_bytes(proc: psutil.Process | None) -> int:
    return 0 if proc is None else int(proc.memory_info().rss)


def rss_bytes_sum(procs: list[psutil.Process]) -> int:
    return sum(rss_bytes(proc) for proc in procs)


@dataclass
class Middle:
    """What the stations connect to, and the process whose cost is measured."""

    url: str  # station identity is appended
    procs: list[psutil.Process]  # summed; empty for direct (nothing in the middle)
    stop: Callable[[], None]
    checks: Callable[[], dict[str, Any]]


SECONDARY = """
[[backends]]
name = "{name}"
role = "secondary"
url = "ws://127.0.0.1:{port}/ocpp"
auth = "none"
subscribe = ["MeterValues"]
answer_timeout_s = 2
{compression}"""


def standalone_options(opts: argparse.Namespace, stations: int) -> argparse.Namespace:
    """A benchmark other than this one starting a middle with :func:`start_middle`: no CPU
    pinning, the node's default compression, no nginx; room for ``stations`` sockets."""
    opts.pin_plan, opts.compression_explicit, opts.nginx_binary = None, False, None
    opts.profile2 = getattr(opts, "profile2", None)
    raise_nofile_limit(4 * stations + 1024)
    return opts


def stop_all(*parts: LineProcess | Middle | None) -> None:
    """Stop a run's processes, the load generator first (those that were started)."""
    for part in parts:
        if part is not None:
            part.stop()


def compression_line(opts: argparse.Namespace, mode: str) -> str:
    """The node's ``compression`` key, written only when --compression was given."""
    return f'compression = "{mode}"\n' if opts.compression_explicit else ""


def node_config(csms_port: int, compression: str) -> str:
    """NODE_CONFIG with ``compression`` added to [listen] and to the primary backend."""
    config = NODE_CONFIG.format(csms_port=csms_port)
    if compression:
        config = config.replace("max_message_bytes = 65536\n",
                                "max_message_bytes = 65536\n" + compression, 1)
        config = config.replace('auth = "none"\n', 'auth = "none"\n' + compression, 1)
        assert config.count(compression) == 2
    return config


@dataclass(frozen=True)
class Profile2:
    """Security profile 2 on both hops: TLS (a PKI made for the run) and Basic auth. By
    default one password for every station, which the node checks with scrypt once; with
    ``entries`` a password per station, as a real fleet has, which costs the node one
    check per station after a restart (docs/scaling.md)."""

    ca: Path
    cert: Path
    key: Path
    password_hash: str
    password: str = "bench-station-password"
    #: with --distinct-passwords: each station's own entry (identity, hash of its password)
    entries: tuple[tuple[str, str], ...] = ()

    @classmethod
    def make(cls, directory: Path, distinct: list[str] | None = None) -> Profile2:
        """The PKI and the stations' password hashes; ``distinct``: the identities that each
        get their own password ("pw-<identity>"), hashed in a process pool."""
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from concurrent.futures import ProcessPoolExecutor

        from router.passwords import hash_password
        from tests.certs import make_pki

        pki = make_pki(directory)
        entries: tuple[tuple[str, str], ...] = ()
        if distinct:
            with ProcessPoolExecutor() as pool:
                hashes = pool.map(hash_password, [f"pw-{name}" for name in distinct],
                                  chunksize=64)
                entries = tuple(zip(distinct, hashes, strict=True))
        return cls(pki.ca_cert, pki.server_cert, pki.server_key,
                   hash_password(cls.password),
                   "pw-{name}" if entries else cls.password, entries)

    def csms_flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def loadgen_flags(self) -> list[str]:
        return ["--tls-ca", str(self.ca), "--password", self.password]

    def node_config(self, config: str) -> str:
        """A profile-0 bench config turned into profile 2 on both hops."""
        replaced = (config
                    # every station dials from 127.0.0.1, like a site behind one NAT
                    # address: checks in progress count against the address's failures
                    .replace("security_profile = 0\n",
                             f'security_profile = 2\ntls_cert = "{self.cert}"\n'
                             f'tls_key = "{self.key}"\nmax_auth_failures = 1000000\n')
                    .replace('[[stations]]\nmatch = "*"\n', "".join(
                        f'[[stations]]\nmatch = "{name}"\npassword_hash = "{hashed}"\n\n'
                        for name, hashed in self.entries)
                        + f'[[stations]]\nmatch = "*"\npassword_hash = "{self.password_hash}"\n')
                    .replace('url = "ws://', 'url = "wss://')
                    .replace('auth = "none"\n', f'auth = "none"\ntls_ca = "{self.ca}"\n'))
        assert replaced.count(str(self.ca)) == 1 and "security_profile = 2" in replaced
        return replaced


def csms_argv(mode: str, *extra: str) -> list[str]:
    flags = ["--compression", mode] if mode != "none" else []
    return [str(BENCH_DIR / "csms.py"), "--port", "0", *flags, *extra]


def start_middle(kind: str, csms_port: int, workdir: Path, stations: int, mode: str,
                 opts: argparse.Namespace) -> Middle:
    pin: list[int] | None = opts.pin_plan["middle"] if opts.pin_plan else None
    profile2: Profile2 | None = getattr(opts, "profile2", None)
    csms_url = f"{'wss' if profile2 else 'ws'}://127.0.0.1:{csms_port}"
    if kind == "direct":
        return Middle(f"{csms_url}/ocpp/", [], lambda: None, dict)
    if profile2 is not None and kind != "node":
        raise BenchError(f"security profile 2 is measured direct and through the node, "
                         f"not {kind}")
    if kind == "relay":
        relay = LineProcess.spawn(
            "relay", [str(BENCH_DIR / "relay.py"), "--backend", csms_url, "--port", "0"], workdir
        )
        port = relay.wait_for("listening", 20.0)["port"]
        proc = psutil.Process(relay.proc.pid)
        if pin:
            proc.cpu_affinity(pin)
        return Middle(f"ws://127.0.0.1:{port}/ocpp/", [proc], relay.stop, dict)
    if kind in FLOOR_SCENARIOS:
        floor = LineProcess.spawn(
            kind, [str(BENCH_DIR / "floor.py"), "--backend", csms_url, "--port", "0",
                   "--mode", FLOOR_SCENARIOS[kind]], workdir)
        port = floor.wait_for("listening", 20.0)["port"]
        proc = psutil.Process(floor.proc.pid)
        if pin:
            proc.cpu_affinity(pin)
        return Middle(f"ws://127.0.0.1:{port}/ocpp/", [proc], floor.stop, dict)
    if kind == "nginx":
        try:
            server = start_nginx(opts.nginx_binary, csms_port, workdir / "nginx", stations)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        master = psutil.Process(server.proc.pid)
        deadline = time.monotonic() + 10.0
        while not master.children() and time.monotonic() < deadline:
            time.sleep(0.02)
        procs = [master, *master.children()]
        if len(procs) < 2:
            server.stop()
            raise BenchError("nginx started no worker process:\n" + server.error_log_tail())
        if pin:
            for proc in procs:
                proc.cpu_affinity(pin)

        def nginx_checks() -> dict[str, Any]:
            return {"alive": server.proc.poll() is None
                    and all(proc.is_running() for proc in procs)}

        def nginx_stop() -> None:
            if server.proc.poll() is not None:
                print(f"  note: nginx exited with code {server.proc.returncode}; its error log:",
                      file=sys.stderr)
                for line in server.error_log_tail().splitlines():
                    print("    " + line[:300], file=sys.stderr)
            server.stop()

        return Middle(f"ws://127.0.0.1:{server.port}/ocpp/", procs, nginx_stop, nginx_checks)
    if kind == "node" or kind in TASK_SCENARIOS or kind in SECONDARY_SCENARIOS:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from tests.nodeproc import start_node

        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        compression = compression_line(opts, mode)
        config = node_config(csms_port, compression)
        if kind in TASK_SCENARIOS:
            config = config.replace("[listen]", "forwarding_loop = false\n\n[listen]", 1)
        if profile2 is not None:
            config = profile2.node_config(config)
        secondaries: list[LineProcess] = []
        answering, stalled = SECONDARY_SCENARIOS.get(kind, (0, 0))
        for index in range(answering + stalled):
            flags = ["--stall"] if index >= answering else []
            sec = LineProcess.spawn(f"secondary-{index}", csms_argv(mode, *flags), workdir)
            port = int(sec.wait_for("listening", 20.0)["port"])
            secondaries.append(sec)
            config += SECONDARY.format(name=f"sec-{index}", port=port, compression=compression)
        node = start_node(config.replace('id = "bench-edge"',
                                         f'id = "bench-edge"\nstate_dir = "{workdir}/state"'),
                          workdir, env={"PYTHONPATH": pythonpath,
                                        "OCPP_ROUTER_LOG_BUFFER": "1"})
        proc = psutil.Process(node.proc.pid)
        if pin:
            proc.cpu_affinity(pin)

        def node_checks() -> dict[str, Any]:
            names = ("station_connected", "station_rejected", "backend_failed", "frame_error",
                     "frame_dropped", "call_timeout", "station_disconnected")
            counts: dict[str, Any] = {name: len(node.events(name)) for name in names}
            pauses = node.events("gc_pause")  # >= 20 ms, at most one line a second
            counts["gc_long_pauses"] = max((p.get("long_pauses", 0) for p in pauses), default=0)
            counts["gc_pause_max_ms"] = max((p.get("ms", 0.0) for p in pauses), default=0.0)
            counts["gc_pause_max_cpu_ms"] = max((p.get("cpu_ms", 0.0) for p in pauses),
                                                default=0.0)
            counts["gc_pause_lines"] = [
                {k: p.get(k) for k in ("ts", "generation", "ms", "cpu_ms", "collected")}
                for p in pauses]
            counts["gc_logged_by_generation"] = {
                str(g): [round(p.get("ms", 0.0)) for p in pauses if p.get("generation") == g]
                for g in (0, 1, 2)}
            counts["gc_sweeps"] = [{k: p.get(k) for k in ("ts", "ms", "collected",
                                                          "sessions_ended", "quiet_s")}
                                   for p in node.events("gc_sweep")]
            counts["gc_holds"] = [{k: p.get(k) for k in ("ts", "event", "held_s")}
                                  for p in node.events("gc_held") + node.events("gc_resumed")]
            counts["alive"] = node.alive()
            return counts

        def node_stop() -> None:
            died = not node.alive()
            code = node.stop()
            if code != 0 or died:
                print(f"  note: node exited with code {code}; its last log lines:",
                      file=sys.stderr)
                for line in node.raw_stderr[-15:]:
                    print("    " + line.rstrip()[:300], file=sys.stderr)
            for sec in secondaries:
                sec.stop()

        return Middle(node.url(""), [proc], node_stop, node_checks)
    raise ValueError(kind)


def run_one(kind: str, stations: int, mode: str, opts: argparse.Namespace) -> dict[str, Any]:
    pins = opts.pin_plan
    with tempfile.TemporaryDirectory(prefix=f"bench-{kind}-") as tmp:
        workdir = Path(tmp)
        csms = LineProcess.spawn("csms", csms_argv(mode), workdir)
        middle: Middle | None = None
        loadgen: LineProcess | None = None
        try:
            csms_port = int(csms.wait_for("listening", 20.0)["port"])
            csms_ps = psutil.Process(csms.proc.pid)
            if pins:
                csms_ps.cpu_affinity(pins["load"])
            middle = start_middle(kind, csms_port, workdir, stations, mode, opts)
            time.sleep(min(0.5, opts.settle))
            rss_before = rss_bytes_sum(middle.procs)

            loadgen = LineProcess.spawn(
                "loadgen",
                [str(BENCH_DIR / "loadgen.py"), "--url", middle.url,
                 "--stations", str(stations), "--rate", str(opts.rate),
                 *(["--compression", mode] if mode != "none" else [])],
                workdir,
            )
            loadgen_ps = psutil.Process(loadgen.proc.pid)
            if pins:
                loadgen_ps.cpu_affinity(pins["load"])
            connected = loadgen.wait_for("connected", 120.0)
            if connected["failed"]:
                raise BenchError(
                    f"{connected['failed']} of {stations} stations failed to connect "
                    f"(first: {connected['first_error']})"
                )
            time.sleep(opts.settle)
            rss_connected = rss_bytes_sum(middle.procs)

            loadgen.send("start")
            loadgen.wait_for("running", 30.0)
            time.sleep(opts.warmup)

            me = psutil.Process()
            cpu0 = (cpu_seconds_sum(middle.procs), cpu_seconds(loadgen_ps), cpu_seconds(csms_ps),
                    cpu_seconds(me), machine_busy_seconds())
            kernel0 = kernel_seconds_sum(middle.procs)
            wall0 = time.perf_counter()
            loadgen.send("mark")
            loadgen.wait_for("marked", 10.0)
            time.sleep(max(0.0, opts.seconds - (time.perf_counter() - wall0)))
            loadgen.send("end")
            cpu1 = (cpu_seconds_sum(middle.procs), cpu_seconds(loadgen_ps), cpu_seconds(csms_ps),
                    cpu_seconds(me), machine_busy_seconds())
            kernel1 = kernel_seconds_sum(middle.procs)
            wall = time.perf_counter() - wall0
            rss_loaded = rss_bytes_sum(middle.procs)

            summary = loadgen.wait_for("summary", 60.0)
            loadgen.wait_for("closed", 30.0)
            checks = middle.checks()
        finally:
            stop_all(loadgen, middle, csms)

    frames = 2 * summary["window_calls"]
    mid_cpu = cpu1[0] - cpu0[0]
    mid_kernel = kernel1 - kernel0
    measured = bool(middle.procs)
    calls = summary["window_calls"]
    sent, received = summary.get("wire_sent"), summary.get("wire_received")
    return {
        "scenario": kind,
        "stations": stations,
        "compression": mode,
        "extensions": connected.get("extensions", []),
        "connect_s": connected["seconds"],
        "window_s": summary["window_s"],
        "calls": summary["window_calls"],
        "calls_per_s": summary["calls_per_s"],
        "p50_ms": summary["p50_ms"],
        "p90_ms": summary["p90_ms"],
        "p99_ms": summary["p99_ms"],
        "max_ms": summary["max_ms"],
        "frames_forwarded": frames if measured else 0,
        "middle_processes": len(middle.procs),
        "middle_cpu_s": mid_cpu if measured else None,
        "us_per_frame": (mid_cpu / frames * 1e6) if measured and frames else None,
        # of which in the kernel (system time); the rest is the process's own code
        "kernel_us_per_frame": (mid_kernel / frames * 1e6) if measured and frames else None,
        "middle_cpu_pct": mid_cpu / wall * 100 if measured else None,
        "loadgen_cpu_pct": (cpu1[1] - cpu0[1]) / wall * 100,
        "csms_cpu_pct": (cpu1[2] - cpu0[2]) / wall * 100,
        # process and machine-wide CPU are accounted differently; clamp the small skew
        "other_cpu_pct": max(
            0.0, ((cpu1[4] - cpu0[4]) - sum(cpu1[i] - cpu0[i] for i in range(4))) / wall * 100
        ),
        "rss_before_kib": rss_before / 1024 if measured else None,
        "rss_connected_kib": rss_connected / 1024 if measured else None,
        "rss_loaded_kib": rss_loaded / 1024 if measured else None,
        "kib_per_station": (rss_connected - rss_before) / 1024 / stations if measured else None,
        "kib_per_station_loaded": (rss_loaded - rss_before) / 1024 / stations
        if measured else None,
        # TCP payload bytes of the load generator's sockets in the window, per answered call
        "wire_up_per_call": sent / calls if sent is not None and calls else None,
        "wire_down_per_call": received / calls if received is not None and calls else None,
        "errors": {
            "call_errors": summary["call_errors"],
            "bad_answers": summary["bad_answers"],
            "disconnects": summary["disconnects"],
            "stuck_stations": summary["stuck_stations"],
        },
        "middle_checks": checks,
        "frame_bytes": summary["frame_bytes"],
    }


# ---------------------------------------------------------------- reporting


def fmt(value: float | None, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _cpu_split(node: dict[str, Any], ngx: dict[str, Any]) -> str | None:
    """Where a frame's CPU goes in each relay, user (its own code) against kernel (the
    loopback TCP work of its sends and receives), and what the node's own code may take
    for node/nginx to be 3x with the kernel share as measured."""
    if None in (node["us_per_frame"], node.get("kernel_us_per_frame"),
                ngx["us_per_frame"], ngx.get("kernel_us_per_frame")):
        return None
    node_k, ngx_k = node["kernel_us_per_frame"], ngx["kernel_us_per_frame"]
    room = 3 * ngx["us_per_frame"] - node_k
    return (f"user + kernel us per frame: node {node['us_per_frame'] - node_k:.1f} + "
            f"{node_k:.1f}, nginx {ngx['us_per_frame'] - ngx_k:.1f} + {ngx_k:.1f}; "
            f"3x nginx leaves the node's own code {room:.1f} us")

def _ladder(by: dict[tuple[str, int], dict[str, Any]], n: int) -> str | None:
    """CPU per frame from nginx up to the node through a floor relay (bench/floor.py), and
    on to the node without its forwarding loop: each step names what it adds."""
    steps = [("nginx", ""), ("floor-loop", "WebSocket framing in Python, one loop for all links"),
             ("node", "decoding, the call ledger, counters, the gate, on the node's loop"),
             ("node-tasks", "the node with a trio task per link instead of its loop")]
    present = [(kind, what, by[(kind, n)]) for kind, what in steps
               if (kind, n) in by and by[(kind, n)]["us_per_frame"] is not None]
    if len(present) < 2 or present[0][0] != "nginx":
        return None
    parts: list[str] = []
    last: float | None = None
    for kind, what, r in present:
        total = r["us_per_frame"]
        kernel = r.get("kernel_us_per_frame")
        split = f" ({total - kernel:.1f} + {kernel:.1f})" if kernel is not None else ""
        added = f" [+{total - last:.1f}: {what}]" if last is not None else ""
        parts.append(f"{kind} {total:.1f}{split}{added}")
        last = total
    return f"  N={n:<4} " + "\n         -> ".join(parts)


def report(results: list[dict[str, Any]], stations: list[int], mode: str) -> list[str]:
    """The table, ratios, aims and notes of one compression mode's results."""
    out: list[str] = []
    by = {(r["scenario"], r["stations"]): r for r in results}
    head = (f"{'scenario':<11} {'N':>5} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'+p50':>6} {'+p99':>6} {'us/frame':>8} {'KiB/stn':>7} {'(loaded)':>8} "
            f"{'mid%':>5} {'lg%':>5} {'csms%':>5} {'other%':>6}")
    out.append(head)
    out.append("-" * len(head))
    for n in stations:
        base = by.get(("direct", n))
        for kind in ALL_SCENARIOS:
            r = by.get((kind, n))
            if r is None:
                continue
            add50 = r["p50_ms"] - base["p50_ms"] if base and kind != "direct" else None
            add99 = r["p99_ms"] - base["p99_ms"] if base and kind != "direct" else None
            out.append(
                f"{kind:<11} {n:>5} {fmt(r['calls_per_s'], '.0f'):>8} {fmt(r['p50_ms'], '.2f'):>7} "
                f"{fmt(r['p99_ms'], '.2f'):>7} {fmt(add50, '.2f'):>6} {fmt(add99, '.2f'):>6} "
                f"{fmt(r['us_per_frame']):>8} {fmt(r['kib_per_station']):>7} "
                f"{fmt(r['kib_per_station_loaded']):>8} {fmt(r['middle_cpu_pct'], '.0f'):>5} "
                f"{fmt(r['loadgen_cpu_pct'], '.0f'):>5} {fmt(r['csms_cpu_pct'], '.0f'):>5} "
                f"{fmt(r['other_cpu_pct'], '.0f'):>6}"
            )
    out.append("")
    out.append("+p50/+p99: added latency vs direct at the same N. us/frame: middle-process CPU "
               "(user+sys) per forwarded frame,")
    out.append("one call = 2 frames. KiB/stn: (RSS with N connected, idle - RSS before any "
               "station) / N; (loaded): same after the window.")
    out.append("mid%/lg%/csms%: CPU of middle process / load generator / CSMS during the window, "
               "% of one core;")
    out.append("other%: the rest of the machine (other processes, interrupts, steal) in the "
               "same window.")

    ratio_rows: list[str] = []
    for n in stations:
        node = by.get(("node", n))
        if node is None:
            continue
        pairs = [(node, "node", other) for other in ("relay", "nginx", "direct")]
        pairs += [(by[(kind, n)], kind, "node") for kind in SECONDARY_SCENARIOS
                  if (kind, n) in by]
        for top, top_name, other in pairs:
            ref = node if other == "node" else by.get((other, n))
            if ref is None:
                continue
            ratio_rows.append(
                f"{top_name + '/' + other:<18} {n:>5} "
                f"{fmt(ratio(top['calls_per_s'], ref['calls_per_s']), '.2f'):>8} "
                f"{fmt(ratio(top['p50_ms'], ref['p50_ms']), '.2f'):>7} "
                f"{fmt(ratio(top['p99_ms'], ref['p99_ms']), '.2f'):>7} "
                f"{fmt(ratio(top['us_per_frame'], ref['us_per_frame']), '.2f'):>8} "
                f"{fmt(ratio(top['kib_per_station'], ref['kib_per_station']), '.2f'):>7}"
            )
    if ratio_rows:
        out.append("")
        rhead = (f"{'ratio':<18} {'N':>5} {'calls/s':>8} {'p50':>7} {'p99':>7} "
                 f"{'us/frame':>8} {'KiB/stn':>7}")
        out.append(rhead)
        out.append("-" * len(rhead))
        out.extend(ratio_rows)

    versus = [(n, by[("node", n)], by[("nginx", n)]) for n in stations
              if ("node", n) in by and ("nginx", n) in by]
    if versus:
        out.append("")
        out.append("node against nginx (same N, same machine):")
        for n, node, ngx in versus:
            direct = by.get(("direct", n))
            cpu = ratio(node["us_per_frame"], ngx["us_per_frame"])
            rate = ratio(node["calls_per_s"], ngx["calls_per_s"])
            vs_direct = ratio(node["calls_per_s"], direct["calls_per_s"]) if direct else None
            out.append(f"  N={n:<4} node/nginx CPU per frame: {fmt(cpu, '.1f')}x   "
                       f"node/nginx throughput: {fmt(rate, '.2f')}x   "
                       f"node/direct throughput: {fmt(vs_direct, '.2f')}x")
            split = _cpu_split(node, ngx)
            if split:
                out.append(f"         {split}")

    nodes = [by[("node", n)] for n in stations if ("node", n) in by]
    aim_kib = AIM_KIB_PER_STATION_DEFLATE if mode == "deflate" else AIM_KIB_PER_STATION
    if nodes:
        out.append("")
        out.append(f"node against the aims (<= {AIM_US_PER_FRAME:.0f} us CPU per forwarded frame, "
                   f"<= {aim_kib:.0f} KiB RSS per connected station"
                   f"{' with deflate on both hops' if mode == 'deflate' else ''}):")
        for r in nodes:
            cpu_ok = r["us_per_frame"] is not None and r["us_per_frame"] <= AIM_US_PER_FRAME
            mem = r["kib_per_station"]
            mem_ok = mem is not None and mem <= aim_kib
            out.append(
                f"  N={r['stations']:<4} CPU {fmt(r['us_per_frame'])} us/frame "
                f"[{'ok' if cpu_ok else 'MISSED'}]   RSS {fmt(r['kib_per_station'])} KiB/station "
                f"[{'ok' if mem_ok else 'MISSED'}] (after load: "
                f"{fmt(r['kib_per_station_loaded'])})"
            )
        if len(nodes) >= 2:
            lo, hi = nodes[0], nodes[-1]
            slope = (hi["rss_connected_kib"] - lo["rss_connected_kib"]) / (
                hi["stations"] - lo["stations"])
            out.append(f"  marginal RSS between N={lo['stations']} and N={hi['stations']}: "
                       f"{slope:.1f} KiB/station (excludes one-off allocations)")

    notes: list[str] = []
    for r in results:
        tag = f"{r['scenario']} N={r['stations']}"
        if r["loadgen_cpu_pct"] >= LOADGEN_SATURATED * 100:
            if r["scenario"] == "direct":
                notes.append(f"{tag}: load generator used {r['loadgen_cpu_pct']:.0f}% of a core "
                             "(expected: direct is the load side's own ceiling)")
            else:
                notes.append(f"{tag}: load generator used {r['loadgen_cpu_pct']:.0f}% of a core; "
                             "throughput/latency are bounded by the generator, not the middle")
        total = sum(x for x in (r["middle_cpu_pct"], r["loadgen_cpu_pct"], r["csms_cpu_pct"])
                    if x is not None)
        if r["scenario"] != "direct" and total >= 0.9 * 100 * (os.cpu_count() or 1):
            notes.append(f"{tag}: all cores busy ({total:.0f}% total); latency includes "
                         "run-queue waiting")
        if r["other_cpu_pct"] >= OTHER_BUSY * 100:
            notes.append(f"{tag}: {r['other_cpu_pct']:.0f}% of a core went to other work on "
                         "the machine; figures are noisier than usual")
        errs = {k: v for k, v in r["errors"].items() if v}
        if errs:
            notes.append(f"{tag}: errors {errs}")
        checks = r["middle_checks"]
        bad = {k: checks[k] for k in ("station_rejected", "backend_failed", "frame_error",
                                       "frame_dropped", "call_timeout") if checks.get(k)}
        if bad:
            notes.append(f"{tag}: node logged {bad}")
        if "station_connected" in checks and checks["station_connected"] < r["stations"]:
            notes.append(f"{tag}: node logged only {checks['station_connected']} "
                         f"station_connected events for {r['stations']} stations")
        if checks.get("alive") is False:
            notes.append(f"{tag}: the middle process had exited before the end of the run")
        if r["compression"] == "deflate" and not r["extensions"]:
            notes.append(f"{tag}: permessage-deflate was asked for but not negotiated; "
                         "the stations' hop ran uncompressed")
    if notes:
        out.append("")
        ladder = [line for n in stations if (line := _ladder(by, n)) is not None]
        if ladder:
            out.append("")
            out.append("CPU per frame, nginx up to the node (us, user + kernel; bench/floor.py):")
            out.extend(ladder)
        out.append("notes:")
        out.extend(f"  - {note}" for note in notes)
    return out


def wire_report(results: list[dict[str, Any]], stations: list[int],
                modes: list[str]) -> list[str]:
    """Bytes on the wire per CALL+answer, one column per compression mode."""
    by = {(r["scenario"], r["stations"], r["compression"]): r for r in results}
    rows: list[str] = []
    for n in stations:
        for kind in ALL_SCENARIOS:
            cells: list[str] = []
            totals: dict[str, float] = {}
            for mode in modes:
                r = by.get((kind, n, mode))
                up = r["wire_up_per_call"] if r else None
                down = r["wire_down_per_call"] if r else None
                if up is None or down is None:
                    cells.append(f"{'-':>16}")
                    continue
                totals[mode] = up + down
                cells.append(f"{f'{up + down:.0f} ({up:.0f}+{down:.0f})':>16}")
            if not totals:
                continue
            saved = ""
            if len(modes) > 1:
                saved = f"{'-':>6}"
                if "none" in totals and "deflate" in totals:
                    saved = f"{fmt((1 - totals['deflate'] / totals['none']) * 100, '.0f'):>5}%"
            deflated = by.get((kind, n, "deflate"))
            agreed = (", ".join(deflated["extensions"]) or "not negotiated") if deflated else ""
            rows.append(f"{kind:<11} {n:>5} {' '.join(cells)} {saved} {agreed}".rstrip())
    if not rows:
        return []
    head = f"{'scenario':<11} {'N':>5} " + " ".join(f"{mode:>16}" for mode in modes)
    if len(modes) > 1:
        head += f" {'saved':>6}"
    if "deflate" in modes:
        head += " negotiated (station/peer)"
    return [
        "bytes on the wire per CALL+answer: total (station->middle + middle->station), TCP "
        "payload of the",
        "load generator's sockets during the window (frame headers, masks and compressed "
        "payloads included):",
        head,
        "-" * len(head),
        *rows,
        *(["negotiated: permessage-deflate context takeover of the station / its peer and "
           "their window bits;",
           "every CALL here is the same MeterValues frame, so context takeover compresses it "
           "to a few bytes",
           "(see bench/wire_bytes.py for a realistic OCPP 2.0.1 mix)."]
          if "deflate" in modes else []),
    ]


def rounds_report(results: list[dict[str, Any]], stations: list[int],
                  modes: list[str]) -> list[str]:
    """CPU per frame against nginx in every round, and the median: one run's ratio moves
    by 10% or more with the machine's hour, so the rounds are interleaved."""
    rounds = max(r["round"] for r in results)
    lines = [f"CPU per frame against nginx over {rounds} interleaved rounds "
             "(us per frame in each round; the ratio's median):",
             f"{'compression':<12}{'N':>5}  {'scenario':<11}{'us per frame':<28}"
             f"{'x nginx':<22}{'median':>7}",
             "-" * 87]

    def runs(kind: str, n: int, mode: str) -> dict[int, float]:
        return {r["round"]: r["us_per_frame"] for r in results
                if r["scenario"] == kind and r["stations"] == n
                and r["compression"] == mode and r["us_per_frame"] is not None}

    for mode in modes:
        for n in stations:
            ngx = runs("nginx", n, mode)
            for kind in ALL_SCENARIOS:
                mine = runs(kind, n, mode)
                if not mine:
                    continue
                us = "/".join(f"{mine[k]:.1f}" for k in sorted(mine))
                ratios = [mine[k] / ngx[k] for k in sorted(mine) if k in ngx and kind != "nginx"]
                shown = "/".join(f"{x:.2f}" for x in ratios) if ratios else "-"
                median = f"{statistics.median(ratios):.2f}x" if ratios else "-"
                lines.append(f"{mode:<12}{n:>5}  {kind:<11}{us:<28}{shown:<22}{median:>7}")
    return lines


def wait_until_quiet(max_wait: float) -> float | None:
    """Wait (up to ``max_wait`` s) until the machine idles for a second; returns its busy %.

    Busy = all CPU time not idle, in % of one core. None when it never got quiet.
    """
    deadline = time.monotonic() + max_wait
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = (machine_busy_seconds() - before) * 100
        if busy < QUIET_BUSY * 100:
            return busy
        if time.monotonic() >= deadline:
            return None


def node_available() -> bool:
    return (REPO_ROOT / "router" / "__main__.py").exists()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", default=None, help="comma-separated N values (50,500)")
    parser.add_argument("--seconds", type=float, default=None, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured load first")
    parser.add_argument("--settle", type=float, default=1.0, help="idle wait before RSS sample")
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rate", type=float, default=0.0,
                        help="paced total calls/s instead of closed loop (0 = closed loop)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the middle process to the last CPU, load side to the others")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds for an idle machine")
    parser.add_argument("--compression", default=None, metavar="MODES",
                        help="none, deflate or none,deflate: permessage-deflate on every hop "
                             "(default none; when given, the node config states it)")
    parser.add_argument("--rounds", type=int, default=1, metavar="K",
                        help="run the whole plan K times, interleaved; the report shows each "
                             "round's CPU per frame against nginx and the median")
    parser.add_argument("--json", default=None, help="results file (default bench/results/...)")
    parser.add_argument("--no-json", action="store_true")
    opts = parser.parse_args()
    if opts.rounds < 1:
        parser.error("--rounds must be at least 1")

    if opts.quick:
        opts.seconds = 1.5 if opts.seconds is None else opts.seconds
        opts.warmup = 0.5 if opts.warmup is None else opts.warmup
        opts.settle = min(opts.settle, 0.3)
    opts.seconds = 15.0 if opts.seconds is None else opts.seconds
    opts.warmup = 2.0 if opts.warmup is None else opts.warmup
    stations = [int(x) for x in (opts.stations or "50,500").split(",") if x.strip()]
    kinds = [k.strip() for k in opts.scenarios.split(",") if k.strip()]
    for k in kinds:
        if k not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {k!r}")
    opts.compression_explicit = opts.compression is not None
    modes: list[str] = []
    for mode in (opts.compression or "none").split(","):
        mode = mode.strip()
        if mode not in COMPRESSIONS:
            parser.error(f"unknown compression {mode!r} (choose from {', '.join(COMPRESSIONS)})")
        if mode not in modes:
            modes.append(mode)
    if "node" in kinds and not node_available():
        print("router/__main__.py not found: skipping the node scenario", file=sys.stderr)
        kinds.remove("node")
    opts.nginx_binary = None
    if "nginx" in kinds:
        opts.nginx_binary, why = find_nginx()
        if opts.nginx_binary is None:
            print(f"nginx not available: {why}; skipping the nginx scenario", file=sys.stderr)
            kinds.remove("nginx")
    plain_only = [k for k in kinds if k == "relay" or k in FLOOR_SCENARIOS]
    if plain_only and "deflate" in modes:
        print(f"{', '.join(plain_only)}: no permessage-deflate (trio-websocket has none, the "
              "floor relays leave it out); skipped with --compression deflate", file=sys.stderr)
    plan = [(n, mode, kind) for n in stations for mode in modes for kind in kinds
            if not (kind in plain_only and mode == "deflate")]

    cpus = sorted(psutil.Process().cpu_affinity() or [])
    opts.pin_plan = None
    if opts.pin:
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        opts.pin_plan = {"middle": cpus[-1:], "load": cpus[:-1]}

    nofile = raise_nofile_limit()
    if nofile < 4 * max(stations) + 100:
        print(f"warning: RLIMIT_NOFILE is {nofile}; N={max(stations)} may fail", file=sys.stderr)

    started = time.monotonic()
    results: list[dict[str, Any]] = []
    for round_no, (n, mode, kind) in (
            (r, step) for r in range(1, opts.rounds + 1) for step in plan):
        if opts.quiet_wait > 0 and wait_until_quiet(opts.quiet_wait) is None:
            print(f"machine still busy after {opts.quiet_wait:g} s; running anyway",
                  file=sys.stderr)
        t0 = time.monotonic()
        label = f"{kind:<6} N={n:<4}" + (f" {mode:<7}" if modes != ["none"] else "")
        if opts.rounds > 1:
            label = f"round {round_no}/{opts.rounds} {label}"
        print(f"running {label} ...", end=" ", file=sys.stderr, flush=True)
        try:
            result = run_one(kind, n, mode, opts)
        except (BenchError, TimeoutError, OSError, psutil.Error) as exc:
            print(f"FAILED\n{exc}", file=sys.stderr)
            continue
        result["round"] = round_no
        results.append(result)
        print(f"{result['calls_per_s']:.0f} calls/s ({time.monotonic() - t0:.1f} s)",
              file=sys.stderr, flush=True)

    print()
    print(f"OCPP-J forwarding benchmark: {os.cpu_count()} CPUs, "
          f"{'paced ' + str(opts.rate) + ' calls/s' if opts.rate else 'closed loop'}, "
          f"window {opts.seconds:g} s after {opts.warmup:g} s warm-up, "
          f"frame {results[0]['frame_bytes'] if results else '?'} B, "
          f"pinning {'on' if opts.pin_plan else 'off'}"
          f"{', compression ' + ','.join(modes) if opts.compression_explicit else ''}")
    last = [r for r in results if r["round"] == opts.rounds]
    for mode in modes:
        print()
        if modes != ["none"]:
            print(f"compression {mode}:")
        if opts.rounds > 1:
            print(f"(round {opts.rounds} of {opts.rounds}; every round below)")
        for line in report([r for r in last if r["compression"] == mode], stations, mode):
            print(line)
    if opts.rounds > 1 and results:
        print()
        for line in rounds_report(results, stations, modes):
            print(line)
    wire = wire_report(results, stations, modes)
    if wire:
        print()
        for line in wire:
            print(line)
    print()
    print(f"total {time.monotonic() - started:.0f} s")

    if not opts.no_json and results:
        path = Path(opts.json) if opts.json else (
            BENCH_DIR / "results" / time.strftime("forwarding-%Y%m%d-%H%M%S.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "argv": sys.argv[1:],
            "cpus": os.cpu_count(),
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "rate": opts.rate,
            "compression": modes,
            "rounds": opts.rounds,
            "pinning": opts.pin_plan,
            "results": results,
        }, indent=2))
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        print(f"results written to {shown}")
    return 0 if len(results) == len(plan) * opts.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
