"""Failover benchmark: how long from killing the active CSMS to the first answered CALL on the
next SRV target, and what became of every CALL meanwhile.

Each trial starts fresh processes: two bench CSMS (``bench/csms.py``, each its own process)
published as SRV targets at priority 1 and 2 by a loopback DNS server (``tests/dns_server.py``,
TTL 1 s), and the node (``python -m router run``) with ``srv = ...`` for its primary backend.
A few stations (raw OCPP-J 1.6 over websockets, in this process) send Heartbeat CALLs back
to back, one outstanding CALL per station as OCPP-J requires. Once every station has been
answered a few times, the priority-1 CSMS gets SIGKILL.

Measured per trial:

* **failover**: from the SIGKILL to the first CALLRESULT of a CALL sent after it (that
  answer can only come from the priority-2 CSMS); **all**: until every station had one.
* **answered / callerror / unanswered**: every CALL of the trial by how it ended. A CALL is
  unanswered when no answer came within ``--call-timeout`` or its station link closed
  first; the aim is zero.
* **drops**: station links the node closed (the aim is none: the node moves the backend
  link within ``failover_grace_s`` and keeps the station link).

    .venv/bin/python bench/failover.py --trials 10
    .venv/bin/python bench/failover.py --trials 3 --stations 50 --pause-ms 0   # closed loop

Aims (issue 6): median failover <= 1 s, p99 <= 3 s, zero CALLs without an answer. Prints a
table and writes JSON to ``bench/results/`` (``--no-json`` to skip). Exit code 1 if a trial
could not run or an aim was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT))

from benchutil import percentile, raise_nofile_limit, stop_process  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

from tests.dns_server import DnsServer, Srv  # noqa: E402
from tests.nodeproc import NodeProcess, start_node  # noqa: E402

SRV_NAME = "_ocpp._tcp.bench-csms.test"
AIM_MEDIAN_S, AIM_P99_S = 1.0, 3.0

NODE_CONFIG = """\
[node]
id = "bench-failover"
call_timeout_s = 30
failover_grace_s = {grace}

[listen]
host = "127.0.0.1"
port = 0
path = "/ocpp"
subprotocols = ["ocpp1.6"]
security_profile = 0

[[stations]]
match = "*"

[[backends]]
name = "main"
role = "primary"
srv = "{srv}"
scheme = "ws"
path = "/ocpp"
auth = "passthrough"

[dns]
nameservers = ["{nameserver}"]
ttl_floor_s = 1
ttl_ceiling_s = 60
timeout_s = 1
"""


class BenchError(Exception):
    """A trial could not be set up or run."""


# --- CSMS processes -----------------------------------------------------------------------


@dataclass
class CsmsProcess:
    proc: subprocess.Popen[str]
    port: int

    @classmethod
    def spawn(cls, workdir: Path, name: str) -> CsmsProcess:
        errors = (workdir / f"{name}.stderr").open("w")
        proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "csms.py"), "--port", "0"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errors, text=True, bufsize=1)
        errors.close()
        assert proc.stdout is not None
        line = proc.stdout.readline()  # {"event": "listening", ...} once it listens
        try:
            port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            proc.kill()
            raise BenchError(f"{name}: no listening line (got {line!r})") from None
        return cls(proc, port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)


# --- stations -----------------------------------------------------------------------------


@dataclass
class Call:
    sent: float
    answered: float | None = None
    kind: str = "pending"  # result | callerror | unanswered


@dataclass
class Station:
    """A station sending Heartbeat CALLs back to back; redials (like a real one) if its link
    is closed."""

    url: str
    identity: str
    calls: list[Call] = field(default_factory=list)
    drops: int = 0
    _waiting: dict[str, tuple[Call, asyncio.Future[str]]] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event, pause_s: float, call_timeout_s: float) -> None:
        n = 0
        while not stop.is_set():
            try:
                ws = await connect(self.url, subprotocols=[Subprotocol("ocpp1.6")],
                                   open_timeout=10, close_timeout=1, ping_interval=None,
                                   compression=None, max_size=None)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            reader = asyncio.create_task(self._read(ws))
            try:
                while not stop.is_set():
                    n += 1
                    message_id = f"{self.identity}.{n}"
                    call = Call(time.monotonic())
                    self.calls.append(call)
                    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
                    self._waiting[message_id] = (call, answer)
                    try:
                        await ws.send(f'[2,"{message_id}","Heartbeat",{{}}]')
                        call.kind = await asyncio.wait_for(answer, call_timeout_s)
                        call.answered = time.monotonic()
                    except (TimeoutError, ConnectionClosed):
                        call.kind = "unanswered"
                        if ws.close_code is not None:
                            break
                    finally:
                        self._waiting.pop(message_id, None)
                    await asyncio.sleep(pause_s)
            finally:
                if not stop.is_set():
                    self.drops += 1
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                with contextlib.suppress(Exception):
                    await ws.close()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                try:
                    frame = json.loads(message)
                except ValueError:
                    continue
                if not isinstance(frame, list) or len(frame) < 3:
                    continue
                waiting = self._waiting.get(str(frame[1]))
                if waiting is not None and not waiting[1].done():
                    kind = {3: "result", 4: "callerror"}.get(frame[0])
                    if kind is not None:
                        waiting[1].set_result(kind)
        # the link is gone: nothing in flight will be answered on it
        for _, answer in list(self._waiting.values()):
            if not answer.done():
                answer.set_exception(ConnectionClosed(None, None))

    def answered_since(self, moment: float) -> float | None:
        """When the first CALL sent at or after ``moment`` got a CALLRESULT, if one did."""
        for call in self.calls:
            if call.sent >= moment and call.kind == "result" and call.answered is not None:
                return call.answered
        return None

    def results(self) -> int:
        return sum(1 for c in self.calls if c.kind == "result")


# --- one trial ----------------------------------------------------------------------------


@dataclass
class Trial:
    index: int
    failover_s: float = math.nan  # kill -> first CALLRESULT of a CALL sent after the kill
    all_s: float = math.nan  # kill -> every station has had one
    answered: int = 0
    callerror: int = 0
    unanswered: int = 0
    drops: int = 0
    node_events: dict[str, int] = field(default_factory=dict)
    error: str = ""


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _drive(node: NodeProcess, victim: CsmsProcess, opts: argparse.Namespace,
                 trial: Trial) -> list[Station]:
    stations = [Station(node.url(f"FO{trial.index}-{i}"), f"FO{trial.index}-{i}")
                for i in range(opts.stations)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop, opts.pause_ms / 1000, opts.call_timeout))
             for s in stations]
    try:
        await _until(lambda: all(s.results() >= 5 for s in stations), 20, "warm-up answers")
        killed = time.monotonic()
        victim.kill()
        try:
            await _until(lambda: all(s.answered_since(killed) for s in stations),
                         opts.call_timeout + 10, "an answer to every station after the kill")
        except BenchError as exc:
            trial.error = str(exc)
        firsts = [t for s in stations if (t := s.answered_since(killed)) is not None]
        if firsts:
            trial.failover_s = min(firsts) - killed
        if len(firsts) == len(stations):
            trial.all_s = max(firsts) - killed
        await asyncio.sleep(opts.tail)  # keep the load on the new target for a while
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return stations


def run_trial(index: int, opts: argparse.Namespace, dns_server: DnsServer,
              workdir: Path) -> Trial:
    trial = Trial(index)
    directory = workdir / f"trial-{index}"
    directory.mkdir()
    csms1 = CsmsProcess.spawn(directory, "csms1")
    csms2 = CsmsProcess.spawn(directory, "csms2")
    name = f"_ocpp._tcp.trial{index}.bench.test"
    dns_server.set_srv(name, [Srv(1, 10, csms1.port, f"csms1.trial{index}.test."),
                              Srv(2, 10, csms2.port, f"csms2.trial{index}.test.")], ttl=1)
    node: NodeProcess | None = None
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    try:
        node = start_node(NODE_CONFIG.format(grace=opts.grace, srv=name,
                                             nameserver=dns_server.nameserver),
                          directory, env={"PYTHONPATH": pythonpath})
        stations = asyncio.run(_drive(node, csms1, opts, trial))
        calls = [c for s in stations for c in s.calls]
        trial.answered = sum(1 for c in calls if c.kind == "result")
        trial.callerror = sum(1 for c in calls if c.kind == "callerror")
        trial.unanswered = sum(1 for c in calls if c.kind not in ("result", "callerror"))
        trial.drops = sum(s.drops for s in stations)
        trial.node_events = {event: len(node.events(event)) for event in (
            "backend_failover", "backend_failover_failed", "backend_failed", "srv_failed")}
        if not node.alive():
            trial.error = trial.error or "the node died"
    except BenchError as exc:
        trial.error = str(exc)
    finally:
        if node is not None:
            node.stop()
            if trial.error:
                sys.stderr.write(f"trial {index}: node log tail:\n"
                                 + "".join(node.raw_stderr[-15:]))
        csms1.kill()
        csms2.stop()
    return trial


# --- report -------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def report(trials: list[Trial]) -> tuple[list[str], bool]:
    lines = [f"{'trial':>5} {'failover ms':>11} {'all ms':>7} {'answered':>8} "
             f"{'callerror':>9} {'unanswered':>10} {'drops':>5}  notes"]
    for t in trials:
        notes = t.error or ", ".join(f"{k}={v}" for k, v in t.node_events.items() if v)
        lines.append(f"{t.index:>5} {_ms(t.failover_s):>11} {_ms(t.all_s):>7} "
                     f"{t.answered:>8} {t.callerror:>9} {t.unanswered:>10} {t.drops:>5}  "
                     f"{notes}")
    firsts = sorted(t.failover_s for t in trials if not math.isnan(t.failover_s))
    alls = sorted(t.all_s for t in trials if not math.isnan(t.all_s))
    failed = [t.index for t in trials if math.isnan(t.failover_s)]
    median = statistics.median(firsts) if firsts else math.nan
    p99 = percentile(firsts, 99)
    worst = firsts[-1] if firsts else math.nan
    all_median = statistics.median(alls) if alls else math.nan
    unanswered = sum(t.unanswered for t in trials)
    lines += [
        "",
        f"failover (kill -> first answered CALL on the next target), {len(firsts)} trials: "
        f"median {_ms(median)} ms, p99 {_ms(p99)} ms, max {_ms(worst)} ms"
        + (f"; no failover in trials {failed}" if failed else ""),
        f"every station answered again: median {_ms(all_median)} ms, "
        f"p99 {_ms(percentile(alls, 99))} ms",
        f"CALLs: {sum(t.answered for t in trials)} answered, "
        f"{sum(t.callerror for t in trials)} CALLERROR, {unanswered} without an answer; "
        f"station links dropped: {sum(t.drops for t in trials)}",
    ]
    aims = [
        (f"median failover <= {AIM_MEDIAN_S * 1000:.0f} ms", median <= AIM_MEDIAN_S),
        (f"p99 failover <= {AIM_P99_S * 1000:.0f} ms", p99 <= AIM_P99_S and not failed),
        ("zero CALLs without an answer", unanswered == 0),
    ]
    lines.append("aims: " + "; ".join(f"{what}: {'met' if ok else 'MISSED'}"
                                      for what, ok in aims))
    return lines, all(ok for _, ok in aims) and not any(t.error for t in trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--stations", type=int, default=5)
    parser.add_argument("--pause-ms", type=float, default=5.0,
                        help="pause between one station's CALLs (default 5)")
    parser.add_argument("--grace", type=float, default=5.0, help="node failover_grace_s")
    parser.add_argument("--call-timeout", type=float, default=10.0,
                        help="a CALL with no answer after this long is unanswered")
    parser.add_argument("--tail", type=float, default=0.5,
                        help="seconds of load after every station was answered again")
    parser.add_argument("--json", default=None, help="results file (default bench/results/...)")
    parser.add_argument("--no-json", action="store_true")
    opts = parser.parse_args()
    raise_nofile_limit()

    trials: list[Trial] = []
    with DnsServer() as dns_server, tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        for index in range(1, opts.trials + 1):
            trial = run_trial(index, opts, dns_server, Path(tmp))
            trials.append(trial)
            print(f"trial {index}: failover {_ms(trial.failover_s)} ms, all {_ms(trial.all_s)} "
                  f"ms, {trial.answered} answered, {trial.callerror} CALLERROR, "
                  f"{trial.unanswered} unanswered, {trial.drops} drops"
                  + (f" [{trial.error}]" if trial.error else ""), flush=True)
    lines, ok = report(trials)
    print(f"\nfailover benchmark: {opts.trials} trials, {opts.stations} stations, "
          f"{opts.pause_ms:g} ms between CALLs, failover_grace_s {opts.grace:g}, SIGKILL of "
          f"the priority-1 CSMS process")
    for line in lines:
        print(line)
    if not opts.no_json:
        path = Path(opts.json) if opts.json else (
            BENCH_DIR / "results" / time.strftime("failover-%Y%m%d-%H%M%S.json"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"options": vars(opts),
                                    "trials": [asdict(t) for t in trials],
                                    "summary": lines}, indent=1, default=str))
        print(f"results: {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
