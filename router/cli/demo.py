"""``ocpp-router demo``: a node on loopback between a small CSMS and simulated stations.

Everything runs in one process on 127.0.0.1 with ports the kernel picks: a demo CSMS
(answers the station messages, sends each station a command after it boots), a real
node (security profile 1, so the stations authenticate with Basic auth), and stations
alternating between OCPP 1.6 and 2.0.1 that boot, report status and send meter values.
A one-line summary per second shows what the node forwarded and what it cost.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from router import logs
from router.config import (
    BackendAuth,
    BackendEntry,
    Config,
    ListenSection,
    NodeSection,
    StationEntry,
)
from router.node import Node
from router.passwords import hash_password
from router.stats import Histogram
from router.wire.frames import CALL, CALLRESULT, encode_call, encode_result

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
_PASSWORD = "demo-password"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Rpc:
    """Minimal OCPP-J endpoint: makes CALLs and answers the other side's with ``handler``."""

    def __init__(self, ws: WebSocketConnection, handler: Handler) -> None:
        self.ws = ws
        self.handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[str, trio.MemorySendChannel[Any]] = {}

    async def call(self, action: str, payload: dict[str, Any]) -> Any:
        message_id = str(next(self._ids))
        send, receive = trio.open_memory_channel[Any](1)
        self._waiting[message_id] = send
        await self.ws.send_message(encode_call(message_id, action, payload))
        with trio.fail_after(30):
            return await receive.receive()

    async def serve(self) -> None:
        while True:
            frame = json.loads(await self.ws.get_message())
            if frame[0] == CALL:
                answer = self.handler(frame[2], frame[3])
                await self.ws.send_message(encode_result(frame[1], answer))
            elif frame[1] in self._waiting:
                result = frame[2] if frame[0] == CALLRESULT else None
                self._waiting.pop(frame[1]).send_nowait(result)


class DemoCsms:
    """A CSMS that accepts every station, answers its messages and sends it one command."""

    def __init__(self) -> None:
        self.commands_answered = 0

    def answer(self, version: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        if action == "BootNotification":
            return {"currentTime": _now(), "interval": 10, "status": "Accepted"}
        if action == "Heartbeat":
            return {"currentTime": _now()}
        if action == "Authorize":
            key = "idTagInfo" if version == "ocpp1.6" else "idTokenInfo"
            return {key: {"status": "Accepted"}}
        return {}

    async def handle(self, request: WebSocketRequest) -> None:
        offered = request.proposed_subprotocols
        version = next((p for p in ("ocpp2.0.1", "ocpp1.6") if p in offered), None)
        if version is None:
            await request.reject(400)
            return
        ws = await request.accept(subprotocol=version)
        rpc = Rpc(ws, lambda action, payload: self.answer(version, action, payload))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rpc.serve)
                await trio.sleep(2)
                if version == "ocpp1.6":
                    command = ("RemoteStartTransaction", {"idTag": "DEMO-TAG", "connectorId": 1})
                else:
                    command = ("RequestStartTransaction", {
                        "idToken": {"idToken": "DEMO-TAG", "type": "Central"},
                        "remoteStartId": 1, "evseId": 1})
                if await rpc.call(*command) is not None:
                    self.commands_answered += 1
        except* (ConnectionClosed, trio.TooSlowError):
            pass  # the station left


async def _station(url: str, identity: str, version: str, commands: list[str]) -> None:
    try:
        await _station_life(url, identity, version, commands)
    except* ConnectionClosed:
        pass  # the node closed the link (shutdown): a real station would reconnect


async def _station_life(url: str, identity: str, version: str, commands: list[str]) -> None:
    token = base64.b64encode(f"{identity}:{_PASSWORD}".encode()).decode()

    def on_command(action: str, payload: dict[str, Any]) -> dict[str, Any]:
        commands.append(action)
        return {"status": "Accepted"}

    async with open_websocket_url(
        f"{url}/{identity}", subprotocols=[version],
        extra_headers=[(b"Authorization", f"Basic {token}".encode())],
    ) as ws:
        rpc = Rpc(ws, on_command)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rpc.serve)
            if version == "ocpp1.6":
                await rpc.call("BootNotification", {"chargePointVendor": "Demo",
                                                    "chargePointModel": "Sim-16"})
                await rpc.call("StatusNotification", {"connectorId": 1, "errorCode": "NoError",
                                                      "status": "Available"})
                await rpc.call("Authorize", {"idTag": "DEMO-TAG"})
            else:
                await rpc.call("BootNotification", {
                    "reason": "PowerUp",
                    "chargingStation": {"model": "Sim-201", "vendorName": "Demo"}})
                await rpc.call("StatusNotification", {
                    "timestamp": _now(), "connectorStatus": "Available", "evseId": 1,
                    "connectorId": 1})
                await rpc.call("Authorize", {"idToken": {"idToken": "DEMO-TAG",
                                                         "type": "ISO14443"}})
            energy = 0.0
            for tick in itertools.count():
                energy += 11.0 / 3600 * 1000  # Wh per second at 11 kW
                if version == "ocpp1.6":
                    await rpc.call("MeterValues", {"connectorId": 1, "meterValue": [{
                        "timestamp": _now(),
                        "sampledValue": [{"value": f"{energy:.1f}",
                                          "measurand": "Energy.Active.Import.Register"}]}]})
                else:
                    await rpc.call("MeterValues", {"evseId": 1, "meterValue": [{
                        "timestamp": _now(), "sampledValue": [{"value": round(energy, 1)}]}]})
                if tick % 5 == 4:
                    await rpc.call("Heartbeat", {})
                await trio.sleep(1)


def _demo_config(csms_port: int) -> Config:
    return Config(
        node=NodeSection(id="demo-node", state_dir=Path("state")),
        listen=ListenSection(host="127.0.0.1", port=0, security_profile=1),
        stations=(StationEntry(match="DEMO-*", password_hash=hash_password(_PASSWORD)),),
        backends=(BackendEntry(name="demo-csms", role="primary",
                               url=f"ws://127.0.0.1:{csms_port}/ocpp",
                               auth=BackendAuth("none")),),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


async def _demo(stations: int, duration: float | None, out: Any) -> None:
    csms = DemoCsms()
    commands: list[str] = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, csms.handle, "127.0.0.1", 0, None)
        node = Node(_demo_config(server.port))
        await nursery.start(node.run)
        url = f"ws://127.0.0.1:{node.port}/ocpp"
        print(f"demo: CSMS on 127.0.0.1:{server.port}, node on {url}/<identity>, "
              f"{stations} stations (1.6 and 2.0.1, Basic auth). Ctrl-C stops.", file=out)
        station_scope = trio.CancelScope()

        async def run_stations() -> None:
            with station_scope:
                async with trio.open_nursery() as group:
                    for i in range(stations):
                        version = "ocpp1.6" if i % 2 == 0 else "ocpp2.0.1"
                        group.start_soon(_station, url, f"DEMO-{i + 1:03d}", version, commands)

        nursery.start_soon(run_stations)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            await _summaries(node, csms, commands, stations, duration, signals, out)
        print("demo: stopping: answering pending calls and closing links", file=out)
        await node.shutdown()
        station_scope.cancel()
        nursery.cancel_scope.cancel()
    s = node.stats
    print(f"demo: done. forwarded {s.frames_up + s.frames_down} frames, "
          f"{s.node_errors} node errors, {s.dropped} dropped.", file=out)


async def _summaries(
    node: Node, csms: DemoCsms, commands: list[str], stations: int, duration: float | None,
    signals: Any, out: Any,
) -> None:
    start = trio.current_time()
    with trio.move_on_after(duration if duration is not None else float("inf")):
        stop = trio.Event()

        async def watch_signals() -> None:
            async for _ in signals:
                stop.set()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            before = node.stats.residence.snapshot()
            last = 0
            while not stop.is_set():
                with trio.move_on_after(1):
                    await stop.wait()
                s = node.stats
                now = node.stats.residence.snapshot()
                window = [b - a for a, b in zip(before, now, strict=True)]
                before = now
                forwarded = s.frames_up + s.frames_down
                print(
                    f"[{trio.current_time() - start:5.0f}s] stations {s.stations_connected}/"
                    f"{stations} | forwarded {forwarded} (+{forwarded - last}/s) "
                    f"| answers {s.answers_forwarded} | commands {len(commands)} delivered, "
                    f"{csms.commands_answered} answered | node errors {s.node_errors} "
                    f"| added latency p50 {_ms(Histogram.percentile_of(window, 0.5))} "
                    f"p99 {_ms(Histogram.percentile_of(window, 0.99))}",
                    file=out, flush=True,
                )
                last = forwarded
            nursery.cancel_scope.cancel()


def run_demo(stations: int, duration: float | None, log_level: str) -> int:
    """Run the demo until Ctrl-C (or ``duration`` seconds); returns the exit code."""
    if stations < 1:
        print("ocpp-router: demo: --stations must be at least 1", file=sys.stderr)
        return 2
    logs.setup(log_level)
    trio.run(_demo, stations, duration, sys.stdout)
    return 0


__all__ = ["run_demo"]
