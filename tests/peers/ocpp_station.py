"""Real charging stations for end-to-end tests: ``ocpp`` ChargePoints over ``websockets``.

Stations are asyncio objects; run them from sync tests with ``asyncio.run``::

    async def scenario() -> None:
        async with open_station(node.url("CP1"), version="1.6") as cp:
            boot = await cp.boot()
            assert boot.status == "Accepted"

    asyncio.run(scenario())

:class:`Station16` and :class:`Station201` answer the CSMS commands RemoteStartTransaction /
RequestStartTransaction and Reset with a configurable status and record what they got in
``commands``. Both offer the same helpers (``boot``, ``heartbeat``, ``status``, ``meter``,
``authorize``), which send the version's CALL and return the ``ocpp`` ``call_result``
dataclass of the answer (a CALLERROR raises the matching ``OCPPError``).

:func:`open_raw` gives a bare ``websockets`` client for frame-level tests, and
:func:`handshake_status` reports how the server answered an opening handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl as ssl_module
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

__all__ = [
    "ReceivedCommand",
    "Station",
    "Station16",
    "Station201",
    "basic_auth",
    "handshake_status",
    "open_raw",
    "open_station",
]

VERSION_SUBPROTOCOL = {"1.6": "ocpp1.6", "2.0.1": "ocpp2.0.1"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def basic_auth(identity: str, password: str) -> str:
    """``Authorization`` header value for HTTP Basic with username = identity."""
    token = base64.b64encode(f"{identity}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


@dataclass(frozen=True)
class ReceivedCommand:
    """A CSMS command a station handled: action and the (snake_case) payload fields."""

    action: str
    fields: dict[str, Any]


class _StationMixin:
    """State and behaviour common to both station versions."""

    id: str
    ws: ClientConnection
    commands: list[ReceivedCommand]
    command_arrived: asyncio.Event
    reset_status: str
    start_status: str

    def _setup(self, ws: ClientConnection, reset_status: str, start_status: str) -> None:
        self.ws = ws
        self.commands = []
        self.command_arrived = asyncio.Event()
        self.reset_status = reset_status
        self.start_status = start_status

    def _record(self, action: str, fields: dict[str, Any]) -> None:
        self.commands.append(ReceivedCommand(action, fields))
        self.command_arrived.set()

    async def wait_for_command(self, action: str, timeout: float = 10.0) -> ReceivedCommand:
        """Wait until a command ``action`` was handled; return the first one."""
        async with asyncio.timeout(timeout):
            while True:
                for command in self.commands:
                    if command.action == action:
                        return command
                self.command_arrived.clear()
                await self.command_arrived.wait()

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Wait until the WebSocket is closed; return the close code received (1006: none)."""
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()
        return self.ws.close_code

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol


class Station16(_StationMixin, ChargePoint16):
    """An OCPP 1.6 charge point."""

    version = "1.6"

    def __init__(
        self,
        identity: str,
        ws: ClientConnection,
        response_timeout: float = 10.0,
        *,
        reset_status: str = "Accepted",
        start_status: str = "Accepted",
    ) -> None:
        super().__init__(identity, ws, response_timeout=response_timeout)
        self._setup(ws, reset_status, start_status)

    @on("RemoteStartTransaction")
    def on_remote_start_transaction(self, **fields: Any) -> result16.RemoteStartTransaction:
        self._record("RemoteStartTransaction", fields)
        return result16.RemoteStartTransaction(status=self.start_status)

    @on("Reset")
    def on_reset_16(self, **fields: Any) -> result16.Reset:
        self._record("Reset", fields)
        return result16.Reset(status=self.reset_status)

    async def boot(self, vendor: str = "TestVendor", model: str = "TestModel") -> Any:
        return await self.call(
            call16.BootNotification(charge_point_model=model, charge_point_vendor=vendor),
            suppress=False,
        )

    async def heartbeat(self) -> Any:
        return await self.call(call16.Heartbeat(), suppress=False)

    async def status(self, connector_id: int = 1, status: str = "Available") -> Any:
        return await self.call(
            call16.StatusNotification(
                connector_id=connector_id, error_code="NoError", status=status, timestamp=_now()
            ),
            suppress=False,
        )

    async def meter(self, wh: int, connector_id: int = 1) -> Any:
        sample = {
            "timestamp": _now(),
            "sampled_value": [
                {
                    "value": str(wh),
                    "measurand": "Energy.Active.Import.Register",
                    "unit": "Wh",
                }
            ],
        }
        return await self.call(
            call16.MeterValues(connector_id=connector_id, meter_value=[sample]), suppress=False
        )

    async def authorize(self, token: str) -> Any:
        return await self.call(call16.Authorize(id_tag=token), suppress=False)


class Station201(_StationMixin, ChargePoint201):
    """An OCPP 2.0.1 charging station."""

    version = "2.0.1"

    def __init__(
        self,
        identity: str,
        ws: ClientConnection,
        response_timeout: float = 10.0,
        *,
        reset_status: str = "Accepted",
        start_status: str = "Accepted",
    ) -> None:
        super().__init__(identity, ws, response_timeout=response_timeout)
        self._setup(ws, reset_status, start_status)

    @on("RequestStartTransaction")
    def on_request_start_transaction(self, **fields: Any) -> result201.RequestStartTransaction:
        self._record("RequestStartTransaction", fields)
        return result201.RequestStartTransaction(status=self.start_status)

    @on("Reset")
    def on_reset_201(self, **fields: Any) -> result201.Reset:
        self._record("Reset", fields)
        return result201.Reset(status=self.reset_status)

    async def boot(self, vendor: str = "TestVendor", model: str = "TestModel") -> Any:
        return await self.call(
            call201.BootNotification(
                charging_station={"model": model, "vendor_name": vendor}, reason="PowerUp"
            ),
            suppress=False,
        )

    async def heartbeat(self) -> Any:
        return await self.call(call201.Heartbeat(), suppress=False)

    async def status(self, connector_id: int = 1, status: str = "Available") -> Any:
        return await self.call(
            call201.StatusNotification(
                timestamp=_now(), connector_status=status, evse_id=1, connector_id=connector_id
            ),
            suppress=False,
        )

    async def meter(self, wh: int, connector_id: int = 1) -> Any:
        sample = {
            "timestamp": _now(),
            "sampled_value": [
                {"value": float(wh), "measurand": "Energy.Active.Import.Register"}
            ],
        }
        return await self.call(
            call201.MeterValues(evse_id=connector_id, meter_value=[sample]), suppress=False
        )

    async def authorize(self, token: str) -> Any:
        return await self.call(
            call201.Authorize(id_token={"id_token": token, "type": "ISO14443"}), suppress=False
        )


Station = Station16 | Station201

_CLASSES: dict[str, type[Station16] | type[Station201]] = {
    "1.6": Station16,
    "2.0.1": Station201,
}


def _identity_from_url(url: str) -> str:
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def _headers(identity: str, password: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    out = dict(headers or {})
    if password is not None:
        out["Authorization"] = basic_auth(identity, password)
    return out


@contextlib.asynccontextmanager
async def open_raw(
    url: str,
    subprotocols: Sequence[str] = ("ocpp2.1",),
    *,
    identity: str | None = None,
    password: str | None = None,
    headers: dict[str, str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float = 10.0,
    compression: str | None = "deflate",
) -> AsyncIterator[ClientConnection]:
    """A bare WebSocket client (no OCPP logic) connected to ``url``; it offers
    permessage-deflate unless ``compression`` is None (websockets' default)."""
    ident = identity if identity is not None else _identity_from_url(url)
    async with connect(
        url,
        subprotocols=[Subprotocol(p) for p in subprotocols],
        additional_headers=_headers(ident, password, headers),
        ssl=ssl,
        open_timeout=open_timeout,
        close_timeout=5.0,
        max_size=None,
        compression=compression,
    ) as ws:
        yield ws


@contextlib.asynccontextmanager
async def open_station(
    url: str,
    version: str = "1.6",
    *,
    identity: str | None = None,
    subprotocols: Sequence[str] | None = None,
    password: str | None = None,
    headers: dict[str, str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    response_timeout: float = 10.0,
    open_timeout: float = 10.0,
    reset_status: str = "Accepted",
    start_status: str = "Accepted",
    compression: str | None = "deflate",
) -> AsyncIterator[Any]:
    """Connect an OCPP station of ``version`` ("1.6" or "2.0.1") to ``url`` and serve it.

    ``identity`` defaults to the last URL segment; ``subprotocols`` default to the version's
    one; ``password`` adds HTTP Basic auth (username = identity). Yields a
    :class:`Station16` or :class:`Station201`; the link is closed on exit.
    """
    ident = identity if identity is not None else _identity_from_url(url)
    offered = list(subprotocols) if subprotocols is not None else [VERSION_SUBPROTOCOL[version]]
    async with open_raw(
        url,
        offered,
        identity=ident,
        password=password,
        headers=headers,
        ssl=ssl,
        open_timeout=open_timeout,
        compression=compression,
    ) as ws:
        station = _CLASSES[version](
            ident,
            ws,
            response_timeout,
            reset_status=reset_status,
            start_status=start_status,
        )

        async def serve() -> None:
            with contextlib.suppress(ConnectionClosed):
                await station.start()

        task = asyncio.create_task(serve(), name=f"station-{ident}")
        try:
            yield station
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def handshake_status(
    url: str,
    subprotocols: Sequence[str] = ("ocpp1.6",),
    *,
    identity: str | None = None,
    password: str | None = None,
    headers: dict[str, str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float = 10.0,
) -> tuple[int, dict[str, str]]:
    """Attempt an opening handshake; return (HTTP status, response headers).

    101 means the upgrade succeeded (the link is then closed at once). TLS or connection
    failures propagate as exceptions.
    """
    try:
        async with open_raw(
            url,
            subprotocols,
            identity=identity,
            password=password,
            headers=headers,
            ssl=ssl,
            open_timeout=open_timeout,
        ) as ws:
            response = ws.response
            assert response is not None
            return 101, {k: v for k, v in response.headers.raw_items()}
    except InvalidStatus as exc:
        return exc.response.status_code, {k: v for k, v in exc.response.headers.raw_items()}
