"""A real CSMS for end-to-end tests, built on the ``ocpp`` package and ``websockets``.

The server listens on 127.0.0.1 (port 0 by default, so the kernel picks one) and runs its
asyncio loop in a background thread. Every method of :class:`Csms` is thread-safe and can
be called from sync tests; from asyncio code running in another loop use the ``a``-prefixed
coroutines (``acall``), from trio wrap blocking calls in ``trio.to_thread.run_sync``.

Typical use::

    with Csms() as csms:                      # starts the server
        node = start_node(edge_config(csms.url), tmp_path, env=node_env())
        ...                                   # stations talk to the node
        boot = csms.wait_for_call("CP1", "BootNotification")
        result = csms.reset("CP1")            # CSMS -> station command, returns its answer

Stations connect (directly or through the node) at ``<csms.url>/<identity>``. The CSMS accepts
the subprotocols ``ocpp1.6``, ``ocpp2.0.1`` and ``ocpp2.1`` (choosing the first the client
offers that it supports) and answers BootNotification, Heartbeat, StatusNotification,
MeterValues and Authorize. Its answers carry values derived from the station identity (and
the idTag / idToken), see :func:`identity_time`, :func:`identity_interval`,
:func:`parent_id_tag` and :func:`group_id_token`, so a station can check that an answer
was meant for it.

Everything that reaches the CSMS is recorded: each connection (:class:`ConnectionRecord`:
path, offered and chosen subprotocol, ``Authorization`` header, close code), each CALL
(:class:`ReceivedCall`) and each raw text frame (:meth:`Csms.frames`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote

from ocpp.routing import on
from ocpp.v16 import ChargePoint as ChargePoint16
from ocpp.v16 import call as call16
from ocpp.v16 import call_result as result16
from ocpp.v21 import ChargePoint as ChargePoint21
from ocpp.v21 import call_result as result21
from ocpp.v201 import ChargePoint as ChargePoint201
from ocpp.v201 import call as call201
from ocpp.v201 import call_result as result201
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

__all__ = [
    "SUPPORTED_SUBPROTOCOLS",
    "ConnectionRecord",
    "Csms",
    "ReceivedCall",
    "group_id_token",
    "identity_interval",
    "identity_time",
    "parent_id_tag",
]

SUPPORTED_SUBPROTOCOLS: tuple[str, ...] = ("ocpp1.6", "ocpp2.0.1", "ocpp2.1")

T = TypeVar("T")

_EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


# --- values the CSMS derives from what a station sends ------------------------------------


def identity_time(identity: str) -> str:
    """The ``currentTime`` the CSMS answers this station with (BootNotification, Heartbeat)
    and the expiry it puts in Authorize answers: a fixed instant derived from the identity."""
    seconds = zlib.crc32(identity.encode("utf-8")) % (10 * 365 * 86400)
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity_interval(identity: str) -> int:
    """The heartbeat ``interval`` the CSMS gives this station in BootNotification answers."""
    return 60 + zlib.crc32(identity.encode("utf-8")) % 3600


def parent_id_tag(id_tag: str) -> str:
    """``idTagInfo.parentIdTag`` of the CSMS's answer to a 1.6 Authorize for ``id_tag``."""
    return ("P" + id_tag)[:20]


def group_id_token(id_token: str) -> str:
    """``idTokenInfo.groupIdToken.idToken`` of the answer to a 2.x Authorize for ``id_token``."""
    return ("G" + id_token)[:36]


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedCall:
    """A CALL frame that reached the CSMS."""

    identity: str
    subprotocol: str | None
    message_id: str
    action: str
    payload: dict[str, Any]


@dataclass
class ConnectionRecord:
    """One WebSocket connection that reached the CSMS (after a successful upgrade)."""

    identity: str
    path: str
    subprotocol: str | None
    offered_subprotocols: tuple[str, ...]
    authorization: str | None
    headers: dict[str, str]
    extensions: str | None = None  # the CSMS's Sec-WebSocket-Extensions answer (agreed)
    client_cn: str | None = None  # CN of the TLS client certificate, when one was shown
    closed: bool = False
    close_code: int | None = None  # code received from the peer (1006 if none)
    close_reason: str | None = None


@dataclass
class _Link:
    record: ConnectionRecord
    ws: ServerConnection
    cp: Any  # an ocpp ChargePoint subclass instance, or None in raw mode
    frames: list[str | bytes] = field(default_factory=list)


# --- ocpp handlers ------------------------------------------------------------------------


class _Csms16(ChargePoint16):
    """OCPP 1.6 side of the CSMS for one station (``self.id`` is the identity)."""

    @on("BootNotification")
    def on_boot_notification_16(self, **_: Any) -> result16.BootNotification:
        return result16.BootNotification(
            current_time=identity_time(self.id),
            interval=identity_interval(self.id),
            status="Accepted",
        )

    @on("Heartbeat")
    def on_heartbeat_16(self, **_: Any) -> result16.Heartbeat:
        return result16.Heartbeat(current_time=identity_time(self.id))

    @on("StatusNotification")
    def on_status_notification_16(self, **_: Any) -> result16.StatusNotification:
        return result16.StatusNotification()

    @on("MeterValues")
    def on_meter_values_16(self, **_: Any) -> result16.MeterValues:
        return result16.MeterValues()

    @on("Authorize")
    def on_authorize_16(self, id_tag: str, **_: Any) -> result16.Authorize:
        return result16.Authorize(
            id_tag_info={
                "status": "Accepted",
                "expiry_date": identity_time(self.id),
                "parent_id_tag": parent_id_tag(id_tag),
            }
        )


class _Handlers2x:
    """Handlers shared by OCPP 2.0.1 and 2.1 (same payload shapes for these actions)."""

    id: str
    _result: Any  # the call_result module of the version

    @on("BootNotification")
    def on_boot_notification_2x(self, **_: Any) -> Any:
        return self._result.BootNotification(
            current_time=identity_time(self.id),
            interval=identity_interval(self.id),
            status="Accepted",
        )

    @on("Heartbeat")
    def on_heartbeat_2x(self, **_: Any) -> Any:
        return self._result.Heartbeat(current_time=identity_time(self.id))

    @on("StatusNotification")
    def on_status_notification_2x(self, **_: Any) -> Any:
        return self._result.StatusNotification()

    @on("MeterValues")
    def on_meter_values_2x(self, **_: Any) -> Any:
        return self._result.MeterValues()

    @on("Authorize")
    def on_authorize_2x(self, id_token: dict[str, Any], **_: Any) -> Any:
        return self._result.Authorize(
            id_token_info={
                "status": "Accepted",
                "cache_expiry_date_time": identity_time(self.id),
                "group_id_token": {
                    "id_token": group_id_token(str(id_token.get("id_token", ""))),
                    "type": "Central",
                },
            }
        )


class _Csms201(_Handlers2x, ChargePoint201):
    _result = result201


class _Csms21(_Handlers2x, ChargePoint21):
    _result = result21


_CP_CLASSES: dict[str, type[Any]] = {
    "ocpp1.6": _Csms16,
    "ocpp2.0.1": _Csms201,
    "ocpp2.1": _Csms21,
}


class _LinkAdapter:
    """What an ocpp ChargePoint needs from a connection (it only ever calls ``send``)."""

    def __init__(self, ws: ServerConnection, on_send: Callable[[str], None]) -> None:
        self._ws = ws
        self._on_send = on_send

    async def send(self, message: str) -> None:
        self._on_send(message)
        await self._ws.send(message)

    async def recv(self) -> str:  # unused: the CSMS feeds frames to route_message itself
        raise RuntimeError("frames are routed by the Csms receive loop")


# --- the server ---------------------------------------------------------------------------


class Csms:
    """A CSMS on 127.0.0.1 with its asyncio loop in a background thread.

    Args:
        subprotocols: what the CSMS accepts, in no particular order: it chooses the first
            subprotocol *the client* offers that is in this list. ``None`` makes the CSMS
            accept every connection without choosing a subprotocol (frames are then only
            recorded, not answered).
        path: URL path prefix; stations are served at ``<path>/<identity>``.
        port: port to bind (0: let the kernel choose; kept across :meth:`restart`).
        response_timeout: how long CSMS-initiated commands wait for the station's answer.
        accept_signatures: model a CSMS that understands end-to-end signatures: a CALL's
            ``signatures`` member is recorded (in :meth:`frames`) and then removed before
            the ocpp package validates the payload against the official schema.
        ssl: serve wss:// with this server context (e.g. one that requires client
            certificates, for security profile 3).
        compression: ``"deflate"`` (websockets' default: permessage-deflate when offered)
            or ``None``.
    """

    def __init__(
        self,
        *,
        subprotocols: Sequence[str] | None = SUPPORTED_SUBPROTOCOLS,
        path: str = "/ocpp",
        port: int = 0,
        response_timeout: float = 10.0,
        accept_signatures: bool = False,
        ssl: Any = None,
        compression: str | None = "deflate",
    ) -> None:
        self.accept_signatures = accept_signatures
        self.ssl = ssl
        self.compression = compression
        self.subprotocols = None if subprotocols is None else tuple(subprotocols)
        self.path = path.rstrip("/")
        self.port = port
        self.response_timeout = response_timeout
        self._cond = threading.Condition()
        self._connections: list[ConnectionRecord] = []
        self._calls: list[ReceivedCall] = []
        self._frames: dict[str, list[str | bytes]] = {}
        self._sent: dict[str, list[str | bytes]] = {}
        self._chosen: dict[str, tuple[str, ...] | None] = {}
        self._live: dict[str, _Link] = {}
        self._rejections: dict[str, int] = {}
        self._raw: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Server | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to configure as the node's backend (``<url>/<identity>`` is dialled)."""
        scheme = "wss" if self.ssl is not None else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{self.path}"

    def station_url(self, identity: str) -> str:
        """Where a station would connect directly (without the node)."""
        return f"{self.url}/{identity}"

    def start(self) -> Csms:
        """Start the loop thread (if needed) and the listener; returns ``self``."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="csms-loop", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        if self._server is None:
            self._server = self._run(self._start_server(), timeout=10.0)
        return self

    def stop(self) -> None:
        """Close the listener and every station link (close code 1001). Records are kept;
        :meth:`start` listens again on the same port."""
        if self._loop is not None and self._server is not None:
            self._run(self._stop_server(), timeout=15.0)
            self._server = None

    def restart(self) -> None:
        """:meth:`stop` then :meth:`start` on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and end the loop thread."""
        self.stop()
        if self._loop is not None:
            loop = self._loop
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10.0)
            loop.close()
            self._loop = None
            self._thread = None

    def __enter__(self) -> Csms:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # behaviour switches -------------------------------------------------------------------

    def reject(self, identity: str, status: int | None) -> None:
        """Answer the opening handshake for ``identity`` with HTTP ``status`` (``None``: accept
        again). A rejected attempt is not recorded as a connection."""
        with self._cond:
            if status is None:
                self._rejections.pop(identity, None)
            else:
                self._rejections[identity] = status

    def set_subprotocols(self, identity: str, subprotocols: Sequence[str] | None) -> None:
        """For ``identity`` only, accept these subprotocols instead of the CSMS-wide ones
        (``None``: accept the upgrade without choosing any subprotocol)."""
        with self._cond:
            self._chosen[identity] = None if subprotocols is None else tuple(subprotocols)

    def clear_subprotocols(self, identity: str) -> None:
        """Undo :meth:`set_subprotocols`."""
        with self._cond:
            self._chosen.pop(identity, None)

    def set_raw(self, identity: str, raw: bool = True) -> None:
        """In raw mode frames from ``identity`` are recorded but never answered; use
        :meth:`send_raw` to talk. Applies to links opened after the call."""
        with self._cond:
            if raw:
                self._raw.add(identity)
            else:
                self._raw.discard(identity)

    # what reached the CSMS ----------------------------------------------------------------

    def connections(self, identity: str | None = None) -> list[ConnectionRecord]:
        """Every connection accepted so far (optionally only this identity's), oldest first."""
        with self._cond:
            return [c for c in self._connections if identity is None or c.identity == identity]

    def calls(self, identity: str | None = None, action: str | None = None) -> list[ReceivedCall]:
        """Every CALL received so far, filtered by identity and/or action, in arrival order."""
        with self._cond:
            return [
                c
                for c in self._calls
                if (identity is None or c.identity == identity)
                and (action is None or c.action == action)
            ]

    def frames(self, identity: str) -> list[str | bytes]:
        """Every WebSocket message received from ``identity`` (all its links), in order."""
        with self._cond:
            return list(self._frames.get(identity, []))

    def sent_frames(self, identity: str) -> list[str | bytes]:
        """Every message the CSMS sent to ``identity`` (answers, commands, raw), in order."""
        with self._cond:
            return list(self._sent.get(identity, []))

    def is_connected(self, identity: str) -> bool:
        with self._cond:
            return identity in self._live

    def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = 10.0, what: str = ""
    ) -> T:
        """Block until ``predicate()`` (evaluated under the CSMS lock) is truthy; return it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"CSMS: timed out waiting for {what or predicate!r}")
                self._cond.wait(min(left, 0.5))

    def wait_for_connection(
        self, identity: str, timeout: float = 10.0, count: int = 1
    ) -> ConnectionRecord:
        """Wait until ``identity`` has connected ``count`` times; return the latest record."""

        def found() -> ConnectionRecord | None:
            mine = [c for c in self._connections if c.identity == identity]
            return mine[-1] if len(mine) >= count else None

        return self.wait_for(found, timeout, f"connection #{count} of {identity}")

    def wait_for_close(self, identity: str, timeout: float = 10.0) -> ConnectionRecord:
        """Wait until the latest connection of ``identity`` is closed; return its record."""

        def found() -> ConnectionRecord | None:
            mine = [c for c in self._connections if c.identity == identity]
            return mine[-1] if mine and mine[-1].closed else None

        return self.wait_for(found, timeout, f"close of {identity}")

    def wait_for_call(
        self,
        identity: str,
        action: str,
        timeout: float = 10.0,
        predicate: Callable[[ReceivedCall], bool] | None = None,
    ) -> ReceivedCall:
        """Wait for a CALL ``action`` from ``identity`` (matching ``predicate``); return the
        first such call."""

        def found() -> ReceivedCall | None:
            for c in self._calls:
                if (
                    c.identity == identity
                    and c.action == action
                    and (predicate is None or predicate(c))
                ):
                    return c
            return None

        return self.wait_for(found, timeout, f"{action} from {identity}")

    def wait_for_frame(self, identity: str, text: str, timeout: float = 10.0) -> str:
        """Wait until a text frame equal to ``text`` arrived from ``identity``."""
        return self.wait_for(
            lambda: text if text in self._frames.get(identity, []) else None,
            timeout,
            f"frame {text!r} from {identity}",
        )

    # talking to stations -------------------------------------------------------------------

    def call(self, identity: str, payload: Any, timeout: float | None = None) -> Any:
        """Send a CALL built from an ``ocpp`` ``call`` dataclass (of the version the station's
        link speaks) to the station's current link; return the ``call_result`` dataclass.

        A CALLERROR answer raises the matching ``ocpp.exceptions.OCPPError``; no answer within
        ``timeout`` raises ``TimeoutError``. Blocks: do not use from the loop of a station you
        are driving, use :meth:`acall` there.
        """
        wait = self.response_timeout if timeout is None else timeout
        return self._run(self._call(identity, payload, wait), timeout=wait + 5.0)

    async def acall(self, identity: str, payload: Any, timeout: float | None = None) -> Any:
        """:meth:`call` for asyncio code running in another event loop."""
        wait = self.response_timeout if timeout is None else timeout
        future = self._submit(self._call(identity, payload, wait))
        return await asyncio.wrap_future(future)

    def subprotocol_of(self, identity: str) -> str | None:
        """The subprotocol of the station's current link (KeyError if not connected)."""
        with self._cond:
            return self._live[identity].record.subprotocol

    def remote_start_transaction(
        self, identity: str, id_tag: str, connector_id: int = 1
    ) -> Any:
        """OCPP 1.6 RemoteStartTransaction; returns the station's answer."""
        return self.call(
            identity, call16.RemoteStartTransaction(id_tag=id_tag, connector_id=connector_id)
        )

    def request_start_transaction(
        self, identity: str, id_token: str, remote_start_id: int, evse_id: int = 1
    ) -> Any:
        """OCPP 2.0.1 RequestStartTransaction; returns the station's answer."""
        return self.call(
            identity,
            call201.RequestStartTransaction(
                id_token={"id_token": id_token, "type": "Central"},
                remote_start_id=remote_start_id,
                evse_id=evse_id,
            ),
        )

    def reset(self, identity: str, kind: str | None = None) -> Any:
        """Reset in the station's version: 1.6 ``type`` Hard/Soft (default Hard), 2.0.1
        ``type`` Immediate/OnIdle (default Immediate). Returns the station's answer."""
        if self.subprotocol_of(identity) == "ocpp1.6":
            return self.call(identity, call16.Reset(type=kind or "Hard"))
        return self.call(identity, call201.Reset(type=kind or "Immediate"))

    def wait_for_answer(self, identity: str, message_id: str, timeout: float = 10.0) -> list[Any]:
        """The CALLRESULT or CALLERROR the CSMS received for its CALL ``message_id``."""
        def find() -> list[Any] | None:
            for text in self.frames(identity):
                frame = json.loads(text)
                if frame[0] in (3, 4) and frame[1] == message_id:
                    return list(frame)
            return None
        return self.wait_for(find, timeout=timeout, what=f"answer to {message_id}")

    def send_raw(self, identity: str, text: str | bytes) -> None:
        """Send one message exactly as given on the station's current link."""
        self._run(self._send_raw(identity, text), timeout=10.0)

    def close_station(
        self, identity: str, code: int = 1000, reason: str = "", *, wait: bool = False
    ) -> None:
        """Close the station's current link from the CSMS side.

        Returns once the close frame is sent; with ``wait=True`` only when the connection
        is fully closed (closing handshake and TCP; the record then has ``closed`` set).
        """
        self._run(self._close_link(identity, code, reason, wait), timeout=15.0)

    # internals -----------------------------------------------------------------------------

    def _submit(self, coro: Any) -> Future[Any]:
        if self._loop is None:
            coro.close()
            raise RuntimeError("CSMS is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Any, timeout: float) -> Any:
        return self._submit(coro).result(timeout)

    def _identity(self, path: str) -> str | None:
        prefix = self.path + "/"
        raw = path.split("?", 1)[0]
        if not raw.startswith(prefix):
            return None
        return unquote(raw[len(prefix):])

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        accepted = self.subprotocols
        request = connection.request
        identity = self._identity(request.path) if request is not None else None
        with self._cond:
            if identity is not None and identity in self._chosen:
                accepted = self._chosen[identity]
        if accepted is None:
            return None
        for proto in offered:
            if proto in accepted:
                return proto
        raise NegotiationError("no common subprotocol")

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        identity = self._identity(request.path)
        if identity is None or identity == "" or "/" in identity:
            return connection.respond(404, "unknown path\n")
        with self._cond:
            status = self._rejections.get(identity)
        if status is not None:
            return connection.respond(status, "rejected by test CSMS\n")
        return None

    async def _start_server(self) -> Server:
        server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            select_subprotocol=self._select_subprotocol,
            process_request=self._process_request,
            max_size=None,
            ssl=self.ssl,
            compression=self.compression,
        )
        sockets = list(server.sockets)
        self.port = int(sockets[0].getsockname()[1])
        return server

    async def _stop_server(self) -> None:
        assert self._server is not None
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        identity = self._identity(request.path) or ""
        headers: Headers = request.headers
        offered: list[str] = []
        for value in headers.get_all("Sec-WebSocket-Protocol"):
            offered += [p.strip() for p in value.split(",") if p.strip()]
        record = ConnectionRecord(
            identity=identity,
            path=request.path,
            subprotocol=ws.subprotocol,
            offered_subprotocols=tuple(offered),
            authorization=headers.get("Authorization"),
            headers={k: v for k, v in headers.raw_items()},
            extensions=ws.response.headers.get("Sec-WebSocket-Extensions")
            if ws.response is not None else None,
            client_cn=_client_cn(ws),
        )
        with self._cond:
            raw = identity in self._raw
        cp_class = None if raw or ws.subprotocol is None else _CP_CLASSES.get(ws.subprotocol)
        cp = None
        if cp_class is not None:
            adapter = _LinkAdapter(ws, lambda text: self._record_sent(identity, text))
            cp = cp_class(identity, adapter, response_timeout=self.response_timeout)
        link = _Link(record=record, ws=ws, cp=cp)
        with self._cond:
            self._connections.append(record)
            self._live[identity] = link
            self._frames.setdefault(identity, [])
            self._cond.notify_all()
        try:
            async for message in ws:
                self._record_frame(link, message)
                if cp is not None and isinstance(message, str) and _ocpp_type(message) in (2, 3, 4):
                    if self.accept_signatures:
                        message = _without_signatures(message)
                    await cp.route_message(message)
        except ConnectionClosed:
            pass
        finally:
            await ws.wait_closed()
            with self._cond:
                record.closed = True
                record.close_code = ws.close_code
                record.close_reason = ws.close_reason
                if self._live.get(identity) is link:
                    del self._live[identity]
                self._cond.notify_all()

    def blackhole(self, identity: str) -> None:
        """Stop reading a station's connection, socket left open: no frames, no pongs, as
        when a route drops every packet."""
        link = self._link(identity)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(link.ws.transport.pause_reading)

    def _record_frame(self, link: _Link, message: str | bytes) -> None:
        identity = link.record.identity
        received: ReceivedCall | None = None
        if isinstance(message, str):
            try:
                frame = json.loads(message)
            except ValueError:
                frame = None
            if (
                isinstance(frame, list)
                and len(frame) == 4
                and frame[0] == 2
                and isinstance(frame[1], str)
                and isinstance(frame[2], str)
                and isinstance(frame[3], dict)
            ):
                received = ReceivedCall(
                    identity=identity,
                    subprotocol=link.record.subprotocol,
                    message_id=frame[1],
                    action=frame[2],
                    payload=frame[3],
                )
        with self._cond:
            self._frames.setdefault(identity, []).append(message)
            if received is not None:
                self._calls.append(received)
            self._cond.notify_all()

    def _record_sent(self, identity: str, message: str | bytes) -> None:
        with self._cond:
            self._sent.setdefault(identity, []).append(message)

    def _link(self, identity: str) -> _Link:
        with self._cond:
            link = self._live.get(identity)
        if link is None:
            raise KeyError(f"CSMS: station {identity!r} is not connected")
        return link

    async def _call(self, identity: str, payload: Any, timeout: float) -> Any:
        link = self._link(identity)
        if link.cp is None:
            raise RuntimeError(f"CSMS: link of {identity!r} is raw; use send_raw")
        closed = asyncio.ensure_future(link.ws.wait_closed())
        answer = asyncio.ensure_future(link.cp.call(payload, suppress=False))
        try:
            done, _ = await asyncio.wait(
                {closed, answer}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if answer in done:
                return answer.result()
            if closed in done:
                raise ConnectionError(f"CSMS: link of {identity!r} closed before the answer")
            raise TimeoutError(f"CSMS: no answer from {identity!r} within {timeout}s")
        finally:
            for task in (closed, answer):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _send_raw(self, identity: str, text: str | bytes) -> None:
        link = self._link(identity)
        self._record_sent(identity, text)
        await link.ws.send(text)

    async def _close_link(self, identity: str, code: int, reason: str, wait: bool) -> None:
        link = self._link(identity)
        closing = asyncio.ensure_future(link.ws.close(code, reason))
        self._background.add(closing)
        closing.add_done_callback(self._background.discard)
        if wait:
            await closing
            await link.ws.wait_closed()
            return
        # ``close`` sends the close frame first, which moves the state out of OPEN
        while link.ws.state is State.OPEN and not closing.done():
            await asyncio.sleep(0)


def _ocpp_type(text: str) -> int | None:
    try:
        frame = json.loads(text)
    except ValueError:
        return None
    if isinstance(frame, list) and frame and isinstance(frame[0], int):
        return int(frame[0])
    return None


def _without_signatures(message: str) -> str:
    """A CALL without its payload's ``signatures`` member (other frames unchanged)."""
    frame = json.loads(message)
    if frame[0] == 2 and isinstance(frame[3], dict) and "signatures" in frame[3]:
        frame[3] = {k: v for k, v in frame[3].items() if k != "signatures"}
        return json.dumps(frame)
    return message


def _client_cn(ws: ServerConnection) -> str | None:
    cert = ws.transport.get_extra_info("peercert")
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
