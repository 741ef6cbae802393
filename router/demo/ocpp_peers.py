"""The demo's standard OCPP peers: a small CSMS (also playing the secondary) and stations.

Both speak plain OCPP-J over trio-websocket, as a real CSMS or station would, and know
nothing of the overlay: the nodes must stay invisible to them. What they see is reported
through an ``observe(event, fields)`` callback, so the demo narrates what happened at the
far ends and not what a script meant to happen.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from router.wire.frames import CALL, CALLERROR, CALLRESULT, encode_call, encode_result

Observe = Callable[[str, dict[str, Any]], None]
Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
VERSIONS = ("ocpp2.1", "ocpp2.0.1", "ocpp1.6")  # what the demo CSMS accepts, best first
SHORT = {"ocpp1.6": "1.6", "ocpp2.0.1": "2.0.1", "ocpp2.1": "2.1"}
_GONE = (ConnectionClosed, HandshakeError, OSError, trio.TooSlowError)  # a link that ended


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True, slots=True)
class Reply:
    """How a CALL ended: the far side's result payload, or its CALLERROR code and text."""

    result: dict[str, Any] | None
    error: str | None = None
    description: str = ""


class Rpc:
    """One OCPP-J endpoint on a WebSocket: makes CALLs and answers the far side's."""

    def __init__(self, ws: WebSocketConnection, handler: Handler, prefix: str = "") -> None:
        self.ws = ws
        self.handler = handler
        self._ids = (f"{prefix}{n}" for n in itertools.count(1))
        self._waiting: dict[str, trio.MemorySendChannel[Reply]] = {}

    async def call(self, action: str, payload: dict[str, Any], timeout_s: float = 15) -> Reply:
        """Send a CALL and wait for its answer (``trio.TooSlowError`` after ``timeout_s``)."""
        message_id = next(self._ids)
        send, receive = trio.open_memory_channel[Reply](1)
        self._waiting[message_id] = send
        try:
            await self.ws.send_message(encode_call(message_id, action, payload))
            with trio.fail_after(timeout_s):
                return await receive.receive()
        finally:
            self._waiting.pop(message_id, None)

    async def serve(self) -> None:
        """Answer CALLs and hand answers to waiting callers until the link closes."""
        while True:
            message = await self.ws.get_message()
            frame = json.loads(message)
            if frame[0] == CALL:
                answer = self.handler(frame[2], frame[3])
                await self.ws.send_message(encode_result(frame[1], answer))
                continue
            waiter = self._waiting.get(frame[1])
            if waiter is None:
                continue  # late: its caller gave up
            if frame[0] == CALLRESULT:
                waiter.send_nowait(Reply(frame[2]))
            elif frame[0] == CALLERROR:
                waiter.send_nowait(Reply(None, str(frame[2]), str(frame[3])))


# --- the CSMS ----------------------------------------------------------------------------


def csms_answer(version: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the demo CSMS answers to a station's CALL (accepting everything)."""
    if action == "BootNotification":
        return {"currentTime": _now(), "interval": 60, "status": "Accepted"}
    if action == "Heartbeat":
        return {"currentTime": _now()}
    if action == "Authorize":
        key = "idTagInfo" if version == "ocpp1.6" else "idTokenInfo"
        return {key: {"status": "Accepted"}}
    return {}


class DemoCsms:
    """A CSMS on 127.0.0.1 that can be stopped and started again on the same port.

    It accepts every station at ``/ocpp/<identity>`` with 2.1, 2.0.1 or 1.6, answers its
    CALLs, counts them by action and can send a station a command (:meth:`command`).
    """

    def __init__(self, name: str, observe: Observe) -> None:
        self.name = name
        self.port = 0  # the kernel's choice the first time; kept for a restart
        self.observe = observe
        self.calls: Counter[str] = Counter()  # action -> CALLs received
        self.stations: dict[str, tuple[str, Rpc]] = {}  # identity -> (subprotocol, endpoint)
        self.booted: set[str] = set()  # stations whose BootNotification it accepted
        self._scope: trio.CancelScope | None = None

    @property
    def running(self) -> bool:
        return self._scope is not None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Listen and serve until :meth:`stop` (or cancellation); ``nursery.start`` returns
        the port once bound."""
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                server = await self._bind(nursery)
                self.port = server.port
                self._scope = scope
                self.observe("csms_listening", {"csms": self.name, "port": self.port})
                task_status.started(self.port)
        self._scope = None
        self.stations.clear()

    async def _bind(self, nursery: trio.Nursery) -> Any:
        # Back on its old port: a client socket may hold it as its ephemeral source port,
        # so retry for a while, then take a new port (its owner republishes DNS).
        deadline = trio.current_time() + 3
        while True:
            try:
                return await nursery.start(serve_websocket, self._handle, "127.0.0.1",
                                           self.port, None)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if trio.current_time() > deadline:
                    self.port = 0
                await trio.sleep(0.1)

    def stop(self) -> None:
        """Close the listener and every station's link, as a crashed CSMS would."""
        if self._scope is not None:
            self._scope.cancel()
            self.observe("csms_stopping", {"csms": self.name, "port": self.port})

    async def command(self, identity: str, action: str, payload: dict[str, Any]) -> Reply:
        """Send a CALL to a connected station; a link that is gone or silent is a Reply
        with the error ``NoAnswer``."""
        if identity not in self.stations:
            return Reply(None, "NoAnswer", "the station is not connected")
        _version, rpc = self.stations[identity]
        try:
            return await rpc.call(action, payload)
        except (ConnectionClosed, trio.TooSlowError) as exc:
            return Reply(None, "NoAnswer", type(exc).__name__)

    async def _handle(self, request: WebSocketRequest) -> None:
        offered = request.proposed_subprotocols
        version = next((v for v in VERSIONS if v in offered), None)
        if version is None:
            await request.reject(400)
            return
        identity = unquote(request.path.rstrip("/").rsplit("/", 1)[-1])
        ws = await request.accept(subprotocol=version)

        def answer(action: str, payload: dict[str, Any]) -> dict[str, Any]:
            self.calls[action] += 1
            if action == "BootNotification":
                self.booted.add(identity)
            self.observe("csms_call", {"csms": self.name, "station": identity,
                                       "action": action})
            return csms_answer(version, action, payload)

        rpc = Rpc(ws, answer, prefix=f"{self.name}-")
        self.stations[identity] = (version, rpc)
        try:
            await rpc.serve()
        except ConnectionClosed:
            pass  # the node closed this station's link (failback, shutdown)
        finally:
            if self.stations.get(identity, (None, None))[1] is rpc:
                del self.stations[identity]


# --- stations ----------------------------------------------------------------------------


def boot_payload(version: str) -> dict[str, Any]:
    if version == "ocpp1.6":
        return {"chargePointVendor": "Demo", "chargePointModel": "Sim-16"}
    return {"reason": "PowerUp",
            "chargingStation": {"model": f"Sim-{SHORT[version]}", "vendorName": "Demo"}}


def status_payload(version: str, busy: bool) -> dict[str, Any]:
    if version == "ocpp1.6":
        return {"connectorId": 1, "errorCode": "NoError",
                "status": "Charging" if busy else "Available"}
    return {"timestamp": _now(), "connectorStatus": "Occupied" if busy else "Available",
            "evseId": 1, "connectorId": 1}


def meter_payload(version: str, wh: float) -> dict[str, Any]:
    if version == "ocpp1.6":
        return {"connectorId": 1, "meterValue": [{"timestamp": _now(), "sampledValue": [{
            "value": f"{wh:.1f}", "measurand": "Energy.Active.Import.Register", "unit": "Wh"}]}]}
    return {"evseId": 1, "meterValue": [{"timestamp": _now(), "sampledValue": [{
        "value": round(wh, 1), "measurand": "Energy.Active.Import.Register"}]}]}


class Station:
    """A simulated station: boots, reports status, sends meter values every second and a
    heartbeat every fifth; answers commands ``Accepted``; reconnects when its link ends."""

    def __init__(self, identity: str, version: str, url: str, password: str,
                 observe: Observe) -> None:
        self.identity = identity
        self.version = version
        self.url = f"{url.rstrip('/')}/{identity}"
        token = base64.b64encode(f"{identity}:{password}".encode()).decode()
        self._headers = [(b"Authorization", f"Basic {token}".encode())]
        self.observe = observe
        self.connected = False
        self.links = 0  # links opened so far
        self.commands: Counter[str] = Counter()  # actions the CSMS sent it
        self._wh = 0.0

    async def run(self) -> None:
        """Live until cancelled, dialling again with a growing pause when a link ends."""
        pause = 0.5
        while True:
            try:
                await self._one_link()
            except* _GONE:
                pass
            if self.connected:
                pause = 0.5  # it had a working link: start the back-off over
            self.connected = False
            await trio.sleep(pause)
            pause = min(pause * 2, 4.0)

    def _on_command(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.commands[action] += 1
        self.observe("station_command", {"station": self.identity, "action": action})
        return {"status": "Accepted"}

    async def _one_link(self) -> None:
        async with open_websocket_url(self.url, subprotocols=[self.version],
                                      extra_headers=self._headers, connect_timeout=10,
                                      disconnect_timeout=2) as ws:
            rpc = Rpc(ws, self._on_command, prefix=f"{self.identity}-")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rpc.serve)
                self.connected = True
                self.links += 1
                await self._talk(rpc)

    async def _talk(self, rpc: Rpc) -> None:
        version = self.version
        while (await rpc.call("BootNotification", boot_payload(version))).result is None:
            await trio.sleep(1)  # refused while the backend moves: ask again
        busy = False
        await rpc.call("StatusNotification", status_payload(version, busy))
        for tick in itertools.count(1):
            await trio.sleep(1)
            if busy:
                self._wh += 11000 / 3600  # 11 kW for one second
            await rpc.call("MeterValues", meter_payload(version, self._wh))
            if tick % 5 == 0:
                await rpc.call("Heartbeat", {})
            if tick % 10 == 0:
                busy = not busy
                await rpc.call("StatusNotification", status_payload(version, busy))


__all__ = ["SHORT", "DemoCsms", "Reply", "Rpc", "Station", "csms_answer"]
