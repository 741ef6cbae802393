"""OCPP-J load generator: N stations, each sending CALLs one after another.

Runs in its own process (asyncio + websockets, raw text frames, no ``ocpp``
package) and is driven by the orchestrator over stdin/stdout, one line each:

* it connects all stations, then prints ``{"event": "connected", ...}``;
* ``start``  : every station begins its CALL loop (warm-up, not measured);
* ``mark``   : the measured window opens (answers ``{"event": "marked"}``);
* ``end``    : the window closes; stations finish their CALL in flight, the
  summary is printed as ``{"event": "summary", ...}``, links are closed and the
  process exits.

A call is timed from just before ``send`` to just after its answer arrives. A call
counts towards throughput when its answer arrives inside the window, and towards
latency when it was both sent and answered inside the window. With ``--rate R``
stations are paced so the offered total is R calls/s (each station still waits
for its answer); without it they run closed-loop, as fast as answers come back.

``--compression deflate`` offers websockets' default permessage-deflate (what the
peer accepts decides). The summary carries the bytes the stations' sockets sent and
received during the window, read from the kernel (``TCP_INFO`` bytes_acked and
bytes_received, Linux only): TCP payload, i.e. WebSocket frames with their headers,
masks and compressed payloads, exactly as on the wire.

    .venv/bin/python bench/loadgen.py --url ws://127.0.0.1:9100/ocpp/ --stations 50
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field

from benchutil import GcPauses, emit, percentile, raise_nofile_limit
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.typing import Subprotocol

# A MeterValues.req (OCPP 1.6) as a meter would send it every few seconds. The
# frame is '[2,"<id>",' + this tail; with an id like "BENCH0042.17" it is ~300 bytes.
FRAME_TAIL = (
    '"MeterValues",{"connectorId":1,"transactionId":424242,"meterValue":[{'
    '"timestamp":"2025-11-22T10:15:00Z","sampledValue":['
    '{"value":"18342.7","context":"Sample.Periodic",'
    '"measurand":"Energy.Active.Import.Register","unit":"Wh"},'
    '{"value":"31.4","measurand":"Current.Import","phase":"L1","unit":"A"}]}]}]'
)


def make_frame(message_id: str) -> str:
    return f'[2,"{message_id}",{FRAME_TAIL}'


HEARTBEAT_TAIL = '"Heartbeat",{}]'
STATUS_TAIL = '"StatusNotification",{"connectorId":1,"errorCode":"NoError","status":"Charging"}]'


class FleetSchedule:
    """``--mix fleet``: a Heartbeat every ``interval`` seconds, and a StatusNotification and a
    MeterValues each every 10 to 60 s (uniform), as a charging station in use sends them."""

    def __init__(self, interval: float, now: float, rng: random.Random) -> None:
        self.rng = rng
        self.interval = interval
        self.due = {HEARTBEAT_TAIL: now + rng.uniform(0.0, interval),
                    STATUS_TAIL: now + rng.uniform(0.0, 60.0),
                    FRAME_TAIL: now + rng.uniform(0.0, 60.0)}

    def next(self) -> tuple[float, str]:
        """When the next CALL is due, and its frame tail; books the one after it."""
        tail = min(self.due, key=self.due.__getitem__)
        at = self.due[tail]
        gap = self.interval if tail is HEARTBEAT_TAIL else self.rng.uniform(10.0, 60.0)
        self.due[tail] = at + gap
        return at, tail


# struct tcp_info (linux/tcp.h): __u64 tcpi_bytes_acked at offset 120, then
# tcpi_bytes_received at 128 (both since Linux 4.1).
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_OFFSET = 120
_TCP_INFO_LEN = _TCP_INFO_OFFSET + _TCP_INFO_BYTES.size


def describe(ext: Extension) -> str:
    """A negotiated extension in short: context takeover and window bits, station/peer."""
    if not isinstance(ext, PerMessageDeflate):
        return str(ext.name)
    station = "no-ctx" if ext.local_no_context_takeover else "ctx"
    peer = "no-ctx" if ext.remote_no_context_takeover else "ctx"
    return f"{station}/{peer} w{ext.local_max_window_bits}/{ext.remote_max_window_bits}"


def wire_bytes(links: list[tuple[str, ClientConnection]]) -> tuple[int, int] | None:
    """Bytes sent (and acknowledged) and received by all stations' TCP sockets so far.

    None where the kernel does not report them (not Linux, or too old).
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None:
        return None
    sent = received = 0
    for _, ws in links:
        sock = ws.transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(info) < _TCP_INFO_LEN:
            return None
        acked, got = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_OFFSET)
        sent += acked
        received += got
    return sent, received


@dataclass
class Churn:
    """``--churn S``: each station leaves after a lifetime drawn from an exponential
    distribution of mean S seconds (never with a CALL in flight) and dials again at once,
    as stations do over a day of carrier hiccups and reboots."""

    mean_s: float
    dial: Dial
    rng: random.Random
    links: dict[str, ClientConnection]  # each station's current link

    def lifetime(self) -> float:
        return self.rng.expovariate(1.0 / self.mean_s)


@dataclass
class Run:
    running: bool = True
    window_start: float = float("inf")
    window_end: float = float("inf")
    window_calls: int = 0
    latencies: list[float] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # each latency's send time (--trace)
    total_calls: int = 0
    call_errors: int = 0
    bad_answers: int = 0
    disconnects: int = 0
    timeouts: int = 0  # CALLs without an answer within --call-timeout
    departures: int = 0  # links a station closed itself (--churn)
    rejoin_failures: int = 0


async def station_loop(ws: ClientConnection, name: str, run: Run, interval: float,
                       fleet: FleetSchedule | None = None, tail: str = FRAME_TAIL,
                       churn: Churn | None = None, call_timeout: float = 60.0) -> None:
    seq = 0
    next_at = time.perf_counter() + random.uniform(0.0, interval)
    leave_at = time.perf_counter() + churn.lifetime() if churn is not None else float("inf")
    try:
        while run.running:
            if churn is not None and time.perf_counter() >= leave_at:
                await ws.close()
                run.departures += 1
                again = await open_station(churn.dial, name)
                if isinstance(again, str):
                    run.rejoin_failures += 1
                    return
                ws = churn.links[name] = again
                leave_at = time.perf_counter() + churn.lifetime()
            if fleet is not None:
                next_at, tail = fleet.next()
                delay = next_at - time.perf_counter()
                if delay > 0.0:
                    await asyncio.sleep(delay)
                    if not run.running:
                        break
            elif interval > 0.0:
                delay = next_at - time.perf_counter()
                if delay > 0.0:
                    await asyncio.sleep(delay)
                    if not run.running:
                        break
                # if behind, start now and do not try to catch up with a burst
                next_at = max(next_at + interval, time.perf_counter())
            seq += 1
            message_id = f"{name}.{seq}"
            sent = time.perf_counter()
            await ws.send(f'[2,"{message_id}",{tail}')
            try:
                reply = await asyncio.wait_for(ws.recv(), call_timeout)
            except TimeoutError:
                run.timeouts += 1
                return
            done = time.perf_counter()
            run.total_calls += 1
            if not isinstance(reply, str) or not reply.startswith(f'[3,"{message_id}"'):
                if isinstance(reply, str) and reply.startswith("[4,"):
                    run.call_errors += 1
                else:
                    run.bad_answers += 1
            if run.window_start <= done <= run.window_end:
                run.window_calls += 1
                if sent >= run.window_start:
                    run.latencies.append(done - sent)
                    run.sent_at.append(sent)
    except ConnectionClosed:
        run.disconnects += 1


@dataclass(frozen=True)
class Dial:
    """How every station dials: the URL prefix (the identity is appended), and for
    security profile 2 the CA to trust and the password sent with Basic auth (user name:
    the identity)."""

    url: str
    limit: asyncio.Semaphore
    compression: str | None
    tls: ssl.SSLContext | None = None
    password: str | None = None


async def open_station(dial: Dial, name: str) -> ClientConnection | str:
    url = dial.url + name
    if dial.password is not None:  # websockets sends Basic auth for credentials in the URL
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://{name}:{dial.password.format(name=name)}@{rest}"
    async with dial.limit:
        try:
            return await connect(
                url,
                ssl=dial.tls,
                subprotocols=[Subprotocol("ocpp1.6")],
                compression=dial.compression,
                proxy=None,
                ping_interval=None,
                open_timeout=60,
                close_timeout=5,
                max_size=65536,
            )
        except Exception as exc:  # reported, never fatal for the others
            return f"{type(exc).__name__}: {exc}"


async def read_command(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    if not line:
        raise SystemExit("control channel closed")
    return line.decode().strip()


async def expect(reader: asyncio.StreamReader, wanted: str) -> None:
    got = await read_command(reader)
    if got != wanted:
        raise SystemExit(f"expected {wanted!r} on stdin, got {got!r}")


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    limit = asyncio.Semaphore(args.connect_concurrency)
    names = [f"{args.prefix}{i:04d}" for i in range(args.stations)]
    began = time.perf_counter()
    compression = None if args.compression == "none" else args.compression
    tls = None
    if args.tls_ca:
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.tls_ca)
    dial = Dial(args.url, limit, compression, tls, args.password)
    opened = await asyncio.gather(*(open_station(dial, name) for name in names))
    links = [(name, ws) for name, ws in zip(names, opened, strict=True) if not isinstance(ws, str)]
    failures = [err for err in opened if isinstance(err, str)]
    extensions = sorted({describe(ext) for _, ws in links for ext in ws.protocol.extensions})
    emit(
        "connected",
        stations=len(links),
        failed=len(failures),
        first_error=failures[0] if failures else None,
        seconds=round(time.perf_counter() - began, 3),
        extensions=extensions,
    )

    await expect(reader, "start")
    gc.collect()
    gc.freeze()  # keep the collector from rescanning the long-lived connection objects
    run = Run()
    gc_pauses = GcPauses()
    interval = len(links) / args.rate if args.rate > 0 else 0.0
    rng = random.Random(args.seed)
    now = time.perf_counter()
    current = dict(links)
    churn = (Churn(args.churn, dial, random.Random(args.seed + 1), current)
             if args.churn > 0 else None)
    tasks = [asyncio.create_task(station_loop(
        ws, name, run, interval,
        FleetSchedule(interval, now, rng) if args.mix == "fleet" else None,
        HEARTBEAT_TAIL if args.mix == "heartbeat" else FRAME_TAIL, churn, args.call_timeout))
        for name, ws in links]
    emit("running")

    await expect(reader, "mark")
    wire_at_mark = wire_bytes(links) if not args.no_wire_bytes else None
    gc_pauses.take()
    if args.gc_off_in_window:
        gc.disable()
    run.window_start = time.perf_counter()
    emit("marked")
    await expect(reader, "end")
    run.window_end = time.perf_counter()
    window_gc_pauses = gc_pauses.take()
    if args.gc_off_in_window:
        gc.enable()
    wire_at_end = wire_bytes(links) if not args.no_wire_bytes else None
    run.running = False
    _, stuck = await asyncio.wait(tasks, timeout=15.0)
    for task in stuck:
        task.cancel()

    lat = sorted(run.latencies)
    window = run.window_end - run.window_start
    emit(
        "summary",
        stations=len(links),
        window_s=window,
        window_calls=run.window_calls,
        calls_per_s=run.window_calls / window if window > 0 else 0.0,
        latency_samples=len(lat),
        p50_ms=percentile(lat, 50) * 1e3,
        p90_ms=percentile(lat, 90) * 1e3,
        p99_ms=percentile(lat, 99) * 1e3,
        max_ms=(lat[-1] * 1e3) if lat else float("nan"),
        total_calls=run.total_calls,
        call_errors=run.call_errors,
        bad_answers=run.bad_answers,
        disconnects=run.disconnects,
        timeouts=run.timeouts,
        gc_pauses=window_gc_pauses,
        departures=run.departures,
        rejoin_failures=run.rejoin_failures,
        stuck_stations=len(stuck),
        frame_bytes=len(make_frame(f"{names[0]}.1")) if names else 0,
        wire_sent=wire_at_end[0] - wire_at_mark[0] if wire_at_mark and wire_at_end else None,
        wire_received=wire_at_end[1] - wire_at_mark[1] if wire_at_mark and wire_at_end else None,
    )
    if args.trace is not None:  # opened when the arguments were read: a bad path fails early
        with args.trace as out:
            json.dump([[round(at - run.window_start, 6), round(latency, 6)]
                       for at, latency in zip(run.sent_at, run.latencies, strict=True)], out)
    if current:
        await asyncio.wait([asyncio.create_task(ws.close()) for ws in current.values()],
                           timeout=10.0)
    emit("closed")
    if args.storm:
        # every station dials again at once, as after a node restart or a carrier outage
        await expect(reader, "storm")
        began = time.perf_counter()
        again = await asyncio.gather(
            *(open_station(dial, name) for name, _ in links))
        seconds = time.perf_counter() - began
        back = [ws for ws in again if not isinstance(ws, str)]
        errors = [err for err in again if isinstance(err, str)]
        emit("stormed", stations=len(back), failed=len(errors),
             first_error=errors[0] if errors else None, seconds=round(seconds, 3))
        if back:
            await asyncio.wait([asyncio.create_task(ws.close()) for ws in back], timeout=30.0)
        emit("storm_closed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="prefix; the station identity is appended")
    parser.add_argument("--stations", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="total calls/s; 0 = closed loop")
    parser.add_argument("--prefix", default="BENCH")
    parser.add_argument("--connect-concurrency", type=int, default=64)
    parser.add_argument("--mix", choices=("meter", "heartbeat", "fleet"), default="meter",
                        help="meter: MeterValues only; heartbeat: Heartbeats only; fleet: a "
                             "Heartbeat every N/rate s plus StatusNotification and MeterValues "
                             "every 10-60 s")
    parser.add_argument("--no-wire-bytes", action="store_true",
                        help="skip reading every socket's byte counts at the window's edges "
                             "(at N = 9,000 that holds all stations up for tens of ms just "
                             "as the window opens)")
    parser.add_argument("--gc-off-in-window", action="store_true",
                        help="no collector passes in this process during the measured window "
                             "(with thousands of stations a pass stalls them all for 40-170 "
                             "ms, and they then send what was due in one burst: a tail real "
                             "stations, each its own machine, do not have)")
    parser.add_argument("--trace", default=None, type=argparse.FileType("w"),
                        help="write every measured CALL as [send time in the window, "
                             "round trip] (seconds) to this JSON file, to see when slow ones "
                             "happened")
    parser.add_argument("--seed", type=int, default=1, help="random seed of --mix fleet")
    parser.add_argument("--churn", type=float, default=0.0,
                        help="mean seconds a station stays before it leaves and dials "
                             "again (0: stations stay)")
    parser.add_argument("--tls-ca", default=None,
                        help="wss: the CA (PEM) that signs the server's certificate")
    parser.add_argument("--password", default=None,
                        help="Basic auth password of every station (security profile 2); "
                             "{name} stands for the station's identity")
    parser.add_argument("--call-timeout", type=float, default=60.0,
                        help="seconds a CALL waits for its answer before it counts as "
                             "unanswered")
    parser.add_argument("--storm", action="store_true",
                        help="after 'closed', wait for 'storm' and reconnect every station")
    parser.add_argument("--compression", choices=("none", "deflate"), default="none",
                        help="deflate: offer websockets' default permessage-deflate")
    raise_nofile_limit()
    asyncio.run(main(parser.parse_args()))
