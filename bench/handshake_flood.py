"""Handshake flood: do stations already connected stay answered while others attack?

A node (security profile 1, Basic auth, ``python -m router run``) in front of the bench
CSMS holds ``--stations`` connected stations, each sending a Heartbeat every
``--interval`` seconds and timing its answer. A second process then floods the node's
listener from loopback, in three windows of ``--seconds`` each:

* ``half-open``: ``--half-open`` TCP connections that never send an upgrade request
  (they hold handshake slots until ``handshake_timeout_s``; past ``max_handshakes`` the
  node answers 503 at once);
* ``wrong-password``: ``--wrong-per-s`` upgrade attempts a second with a wrong password
  for known identities (past ``max_auth_failures`` a minute the address gets 429 and no
  more scrypt checks);
* ``both`` at once.

It prints the connected stations' latency in a quiet window and in each flood window,
what the flood got back, and the node's own counters. The aim (issue 12): every
connected station's CALL answered within 1 s during the flood.

    .venv/bin/python bench/handshake_flood.py            # ~1 minute
    .venv/bin/python bench/handshake_flood.py --seconds 5 --half-open 500 --wrong-per-s 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from benchutil import percentile, raise_nofile_limit
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from router.passwords import hash_password  # noqa: E402
from tests.nodeproc import NodeProcess, start_node  # noqa: E402
from tests.peers import node_env  # noqa: E402

PASSWORD = "bench-station-password"
AIM_S = 1.0


def _auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --- the flood (its own process) ----------------------------------------------------------


async def _half_open(host: str, port: int, count: int, seconds: float,
                     outcomes: Counter[str]) -> None:
    writers = []
    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            outcomes["half-open: connect failed"] += 1
            continue
        writers.append((reader, writer))
    outcomes["half-open: connected"] += len(writers)

    async def watch(reader: asyncio.StreamReader) -> None:
        data = await reader.read(64)
        outcomes["half-open: answered " + (data.split(b" ")[1].decode() if b" " in data
                                            else "nothing (closed)")] += 1

    watchers = [asyncio.create_task(watch(reader)) for reader, _ in writers]
    await asyncio.sleep(seconds)
    for task in watchers:
        task.cancel()
    for _, writer in writers:
        writer.close()


async def _wrong_passwords(url: str, per_s: float, seconds: float,
                           outcomes: Counter[str]) -> None:
    async def attempt(i: int) -> None:
        identity = f"FLOOD-{i % 50:03d}"
        try:
            async with connect(url + identity, subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                               additional_headers=_auth(identity, f"guess-{i}"),
                               open_timeout=10, ping_interval=None):
                outcomes["wrong-password: 101 (!)"] += 1
        except InvalidStatus as exc:
            outcomes[f"wrong-password: {exc.response.status_code}"] += 1
        except (OSError, TimeoutError) as exc:
            outcomes[f"wrong-password: {type(exc).__name__}"] += 1
        except Exception as exc:  # the flood goes on whatever one attempt meets
            outcomes[f"wrong-password: {type(exc).__name__}"] += 1

    tasks = []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        tasks.append(asyncio.create_task(attempt(i)))
        i += 1
        await asyncio.sleep(max(0.0, started + i / per_s - time.perf_counter()))
    await asyncio.wait(tasks, timeout=15)


async def flood(args: argparse.Namespace) -> None:
    outcomes: Counter[str] = Counter()
    jobs = []
    if args.kind in ("half-open", "both"):
        jobs.append(_half_open("127.0.0.1", args.port, args.half_open, args.seconds, outcomes))
    if args.kind in ("wrong-password", "both"):
        jobs.append(_wrong_passwords(f"ws://127.0.0.1:{args.port}/ocpp/", args.wrong_per_s,
                                     args.seconds, outcomes))
    await asyncio.gather(*jobs)
    print(json.dumps(dict(outcomes)), flush=True)


# --- the connected stations and the orchestration -----------------------------------------


async def stations(url: str, count: int, interval: float, windows: list[tuple[str, float]],
                   start_flood: Any) -> dict[str, list[float]]:
    """Connect ``count`` stations, then run each window, timing every Heartbeat."""
    links = []
    for i in range(count):
        identity = f"BENCH-{i:03d}"
        links.append(await connect(url + identity, subprotocols=["ocpp1.6"],  # type: ignore[list-item]
                                   additional_headers=_auth(identity, PASSWORD),
                                   ping_interval=None, open_timeout=20))
    latencies: dict[str, list[float]] = {}
    failures: Counter[str] = Counter()

    async def beat(ws: Any, name: str, until: float, sink: list[float], offset: float) -> None:
        await asyncio.sleep(offset)
        n = 0
        while time.perf_counter() < until:
            n += 1
            sent = time.perf_counter()
            try:
                await ws.send(f'[2,"{name}.{n}","Heartbeat",{{}}]')
                await asyncio.wait_for(ws.recv(), 10)
            except Exception as exc:
                failures[type(exc).__name__] += 1
                return
            sink.append(time.perf_counter() - sent)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - sent)))

    for window, seconds in windows:
        flood_proc = start_flood(window) if window != "quiet" else None
        sink: list[float] = []
        until = time.perf_counter() + seconds
        await asyncio.gather(*(beat(ws, f"w{i}", until, sink, interval * i / count)
                               for i, ws in enumerate(links)))
        latencies[window] = sink
        if flood_proc is not None:
            out, _ = await asyncio.to_thread(flood_proc.communicate)
            latencies[window + ":flood"] = [0.0]
            print(f"  flood {window}: {out.strip()}")
    for ws in links:
        await ws.close()
    if failures:
        print(f"  station failures: {dict(failures)}")
    return latencies


def scrape(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ("ocpp_router_handshakes_shed_total", "ocpp_router_auth_limited_total",
              "ocpp_router_stations_rejected_total")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.split(" ")[0] in wanted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stations", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.2, help="s between a station's CALLs")
    parser.add_argument("--half-open", type=int, default=2000)
    parser.add_argument("--wrong-per-s", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--role", default="orchestrate", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="both", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_nofile_limit()
    if args.role == "flood":
        asyncio.run(flood(args))
        return 0

    csms = subprocess.Popen([sys.executable, str(BENCH_DIR / "csms.py")],
                            stdout=subprocess.PIPE, text=True)
    node: NodeProcess | None = None
    try:
        csms_port = json.loads(csms.stdout.readline())["port"]  # type: ignore[union-attr]
        config = f"""
[node]
id = "bench-flood"
[listen]
host = "127.0.0.1"
port = 0
security_profile = 1
[[stations]]
match = "*"
password_hash = "{hash_password(PASSWORD)}"
[[backends]]
name = "csms"
role = "primary"
url = "ws://127.0.0.1:{csms_port}/ocpp"
auth = "none"
[admin]
host = "127.0.0.1"
port = 0
"""
        node = start_node(config, Path(tempfile.mkdtemp(prefix="flood-")), env=node_env())
        admin = f"http://127.0.0.1:{int(node.wait_for_event('admin_listening')['port'])}"
        port = node.port

        def start_flood(kind: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [sys.executable, __file__, "--role", "flood", "--kind", kind, "--port", str(port),
                 "--half-open", str(args.half_open), "--wrong-per-s", str(args.wrong_per_s),
                 "--seconds", str(args.seconds)], stdout=subprocess.PIPE, text=True)

        windows = [("quiet", args.seconds), ("half-open", args.seconds),
                   ("wrong-password", args.seconds), ("both", args.seconds)]
        print(f"handshake flood: {args.stations} connected stations, a Heartbeat each every "
              f"{args.interval:g} s; floods of {args.half_open} half-open connections and "
              f"{args.wrong_per_s:g} wrong passwords/s, {args.seconds:g} s each")
        latencies = asyncio.run(stations(f"ws://127.0.0.1:{port}/ocpp/", args.stations,
                                         args.interval, windows, start_flood))
        print()
        print(f"{'window':16} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  aim <= 1 s")
        missed = False
        for window, _ in windows:
            values = sorted(latencies.get(window, []))
            worst = values[-1] if values else float("nan")
            ok = bool(values) and worst <= AIM_S
            missed |= window != "quiet" and not ok
            print(f"{window:16} {len(values):7} {percentile(values, 50) * 1e3:8.2f} "
                  f"{percentile(values, 99) * 1e3:8.2f} {worst * 1e3:8.2f}  "
                  f"{'ok' if ok else 'MISSED'}")
        print()
        for name, value in sorted(scrape(admin).items()):
            print(f"node: {name} {value:g}")
        return 1 if missed else 0
    finally:
        if node is not None:
            node.stop()
        csms.terminate()


if __name__ == "__main__":
    raise SystemExit(main())
