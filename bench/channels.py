"""Channels benchmark: tunnel throughput and Modbus latency against direct TCP, and what
a stalled channel does to the OCPP frames that share its peer link (issue 16).

Real processes: a core node (the bench CSMS as its backend, tunnels listening) and an
edge node that dialled it (a msgpack link), with targets served by this process: a TCP
sink that reads everything, a TCP server that accepts and never reads (a stalled far
end) and a pymodbus meter. In one run:

* **throughput**: ``--mib`` MiB written to the sink directly, then through the tunnel
  (core -> edge -> sink): MB/s until the sink has counted every byte;
* **Modbus**: ``--requests`` holding-register reads, one at a time, directly and through
  the tunnel: p50/p99 and the added latency;
* **isolation**: ``--stations`` stations on the edge each send a Heartbeat every
  ``--interval`` s for ``--seconds``, alternately with no channel and with a channel whose
  far end stopped reading and whose client keeps writing (``--rounds`` of each, which
  one goes first alternating): p50/p99 of the CALLs' round trips, pooled and per round,
  and their ratio (issue 16's aim: p99 within 1.1x of no channel).

    .venv/bin/python bench/channels.py                 # about a minute
    .venv/bin/python bench/channels.py --quick

No aim is asserted: the figures are printed and written to bench/results/channels-*.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchutil import percentile, write_results  # noqa: E402
from forwarding import LineProcess, csms_argv  # noqa: E402
from pymodbus.client import ModbusTcpClient  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from tests.nodeproc import NodeProcess, start_node  # noqa: E402
from tests.overlay_support import PeerLink, overlay_config, routes_to, wait_log  # noqa: E402
from tests.peers import node_env  # noqa: E402
from tests.peers.modbus_meter import modbus_meter  # noqa: E402

CORE, EDGE = "core-1", "edge-1"
AIM_P99_RATIO = 1.1


class Sink:
    """A TCP server that reads and counts everything sent to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 20):
                with self.cond:
                    self.received += len(data)
                    self.cond.notify_all()

    def wait_for(self, total: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= total, timeout):
                raise RuntimeError(f"sink got {self.received} of {total} bytes")


class Stalled:
    """A TCP server that accepts and never reads: a device that stopped reading."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.held.append(conn)


def throughput(port: int, sink: Sink, mib: int) -> float:
    """MB/s of ``mib`` MiB written to ``port`` until the sink counted them."""
    block = bytes(range(256)) * 4096  # 1 MiB
    start_count = sink.received
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        for _ in range(mib):
            client.sendall(block)
        sink.wait_for(start_count + mib * len(block), 300)
    return mib * len(block) / 1e6 / (time.perf_counter() - started)


def modbus_latency(port: int, requests: int) -> list[float]:
    """Round trips (ms) of ``requests`` holding-register reads, one at a time."""
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=10, retries=0)
    if not client.connect():
        raise RuntimeError(f"cannot connect to the Modbus target on port {port}")
    rtts = []
    try:
        for i in range(requests):
            started = time.perf_counter()
            answer = client.read_holding_registers(i % 90, count=4, device_id=1)
            rtts.append((time.perf_counter() - started) * 1000)
            if answer.isError():
                raise RuntimeError(f"Modbus error: {answer}")
    finally:
        client.close()
    return rtts


def stations_rtts(edge: NodeProcess, stations: int, interval: float, seconds: float,
                  tag: str) -> list[float]:
    """Heartbeat round trips (ms) of ``stations`` stations on the edge."""
    rtts: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def station(index: int) -> None:
        mine = []
        try:
            with connect(edge.url(f"CH-{tag}-{index}"), subprotocols=["ocpp2.0.1"],  # type: ignore[list-item]
                         open_timeout=20) as ws:
                deadline = time.monotonic() + seconds
                next_at = time.monotonic() + interval * index / stations
                n = 0
                while time.monotonic() < deadline:
                    time.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += interval
                    n += 1
                    started = time.perf_counter()
                    ws.send(json.dumps([2, f"h{n}", "Heartbeat", {}]))
                    answer = json.loads(ws.recv(timeout=30))
                    mine.append((time.perf_counter() - started) * 1000)
                    if answer[0] != 3:
                        errors.append(str(answer)[:200])
        except Exception as exc:  # reported below
            errors.append(repr(exc))
        with lock:
            rtts.extend(mine)

    threads = [threading.Thread(target=station, args=(i,)) for i in range(stations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"stations failed: {errors[:3]}")
    return rtts


def stalled_writer(port: int, stop: threading.Event) -> int:
    """Write into a tunnel whose far end never reads, until ``stop``; bytes accepted."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(0.2)
        block = b"\x55" * 65536
        while not stop.is_set():
            try:
                sent += client.send(block)
            except TimeoutError:
                continue
            except OSError:
                break
    return sent


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(percentile(ordered, 50), 3),
            "p99": round(percentile(ordered, 99), 3),
            "mean": round(statistics.fmean(ordered), 3)}


def metric(admin_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stations", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=4,
                        help="isolation rounds, each without then with the stalled channel")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.mib, args.requests, args.seconds = 8, 300, 3.0

    results: dict[str, Any] = {"args": vars(args)}
    sink, stalled = Sink(), Stalled()
    work = Path(tempfile.mkdtemp(prefix="bench-channels-"))
    nodes: list[NodeProcess] = []
    csms = LineProcess.spawn("csms", csms_argv("none"), work)
    try:
        csms_port = csms.wait_for("listening", 20)["port"]
        with modbus_meter() as meter:
            targets = [f"127.0.0.1:{sink.port}", f"127.0.0.1:{stalled.port}", meter.target]
            tunnels = "".join(
                f'\n[[tunnels]]\nname = "{name}"\nlisten = "127.0.0.1:0"\nnode = "{EDGE}"\n'
                f'target = "{target}"\n'
                for name, target in zip(("sink", "stalled", "meter"), targets, strict=True))
            (work / "core").mkdir()
            (work / "edge").mkdir()
            core = start_node(overlay_config(CORE, backend_url=f"ws://127.0.0.1:{csms_port}",
                                             accept=[EDGE])
                              + '\n[admin]\nhost = "127.0.0.1"\nport = 0\n' + tunnels,
                              work / "core", env={**node_env(), "OCPP_ROUTER_LOG_BUFFER": "1"})
            nodes.append(core)
            allow = ", ".join(f'"{t}"' for t in targets)
            edge = start_node(overlay_config(EDGE, peers=[PeerLink.to(core, CORE, "msgpack")])
                              + f"\n[channels]\nallow_targets = [{allow}]\n",
                              work / "edge", env={**node_env(), "OCPP_ROUTER_LOG_BUFFER": "1"})
            nodes.append(edge)
            wait_log(core, "routes_changed", routes_to(EDGE), timeout=20)
            wait_log(edge, "routes_changed", routes_to("CSMS"), timeout=20)
            ports = {line["tunnel"]: line["port"] for line in core.events("tunnel_listening")}
            admin_port = core.wait_for_event("admin_listening")["port"]

            direct_mbs = throughput(sink.port, sink, args.mib)
            tunnel_mbs = throughput(ports["sink"], sink, args.mib)
            results["throughput_mb_s"] = {"direct": round(direct_mbs, 1),
                                          "tunnel": round(tunnel_mbs, 1)}
            direct_rtt = summary(modbus_latency(meter.port, args.requests))
            tunnel_rtt = summary(modbus_latency(ports["meter"], args.requests))
            results["modbus_ms"] = {"direct": direct_rtt, "tunnel": tunnel_rtt,
                                    "added_p50": round(tunnel_rtt["p50"] - direct_rtt["p50"], 3),
                                    "added_p99": round(tunnel_rtt["p99"] - direct_rtt["p99"], 3)}

            calm: list[float] = []
            loaded: list[float] = []
            ratios: list[float] = []
            writer_sent: list[int] = []
            stalls_before = metric(admin_port, "ocpp_router_channels_stalls_total")
            for round_ in range(args.rounds):
                # alternate which goes first, so an order effect cancels out
                order = ("calm", "stalled") if round_ % 2 == 0 else ("stalled", "calm")
                rounds: dict[str, list[float]] = {}
                for phase in order:
                    if phase == "calm":
                        rounds[phase] = stations_rtts(edge, args.stations, args.interval,
                                                      args.seconds, f"c{round_}")
                        continue
                    stop = threading.Event()
                    writer = threading.Thread(target=lambda s=stop: writer_sent.append(
                        stalled_writer(ports["stalled"], s)))
                    stalls_then = metric(admin_port, "ocpp_router_channels_stalls_total")
                    writer.start()
                    # measured once the channel has used up its credit and its sender waits
                    deadline = time.monotonic() + 30
                    while (metric(admin_port, "ocpp_router_channels_stalls_total")
                           <= stalls_then and time.monotonic() < deadline):
                        time.sleep(0.05)
                    rounds[phase] = stations_rtts(edge, args.stations, args.interval,
                                                  args.seconds, f"s{round_}")
                    stop.set()
                    writer.join()
                calm += rounds["calm"]
                loaded += rounds["stalled"]
                ratios.append(round(summary(rounds["stalled"])["p99"]
                                    / summary(rounds["calm"])["p99"], 3))
            stalls = metric(admin_port, "ocpp_router_channels_stalls_total") - stalls_before
            calm_s, loaded_s = summary(calm), summary(loaded)
            results["isolation_ms"] = {
                "no_channel": calm_s, "stalled_channel": loaded_s,
                "p99_ratio": round(loaded_s["p99"] / calm_s["p99"], 3),
                "p50_ratio": round(loaded_s["p50"] / calm_s["p50"], 3),
                "p99_ratio_by_round": ratios,
                "p99_ratio_median": statistics.median(ratios),
                "stalls": stalls, "stalled_writer_bytes": writer_sent[-1] if writer_sent else 0}
    finally:
        for node in reversed(nodes):
            node.stop()
        csms.proc.terminate()
        csms.proc.wait(10)

    t, m, i = results["throughput_mb_s"], results["modbus_ms"], results["isolation_ms"]
    print(f"channels benchmark: {args.mib} MiB, {args.requests} Modbus reads, "
          f"{args.stations} stations x {1 / args.interval:g} CALLs/s, "
          f"{args.rounds} x {args.seconds:g} s each")
    print(f"throughput MB/s   direct {t['direct']:8.1f}   tunnel {t['tunnel']:8.1f}   "
          f"ratio {t['tunnel'] / t['direct']:.3f}")
    print(f"Modbus read ms    direct p50 {m['direct']['p50']:.3f} p99 {m['direct']['p99']:.3f}   "
          f"tunnel p50 {m['tunnel']['p50']:.3f} p99 {m['tunnel']['p99']:.3f}   "
          f"added p50 {m['added_p50']:.3f}")
    print(f"station CALL ms   no channel p50 {i['no_channel']['p50']:.3f} "
          f"p99 {i['no_channel']['p99']:.3f}   stalled channel p50 "
          f"{i['stalled_channel']['p50']:.3f} p99 {i['stalled_channel']['p99']:.3f}   "
          f"p99 ratio {i['p99_ratio']:.3f} (aim <= {AIM_P99_RATIO}; by round "
          f"{i['p99_ratio_by_round']}, median {i['p99_ratio_median']:.3f})   "
          f"sender stalls {i['stalls']:g}")
    write_results(results, "channels", args.json)  # says where
    return 0


if __name__ == "__main__":
    sys.exit(main())
