"""WebSocket opening handshakes over trio streams, with websockets' sans-IO protocol.

``read_upgrade`` reads a client's HTTP upgrade and hands it back unanswered, so the node
can authenticate and dial the backend before choosing between ``accept`` and
``reject``. ``dial`` opens the client side toward a backend. HTTP parsing and header
validation are websockets'; timeouts are the caller's.
"""

from __future__ import annotations

import logging
import socket
import ssl
from urllib.parse import urlsplit

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidHeader, InvalidStatus
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from router.config import DialSettings
from router.net.compression import client_extensions, server_extensions
from router.net.dns import address_family
from router.net.framing import at_frame_start
from router.net.keepalive import Keepalive
from router.net.tls import tls_failure
from router.net.wslink import RECEIVE_BYTES, WsLink, break_cycles

# the loggers websockets looks up for every protocol it makes when given none
_SERVER_LOG = logging.getLogger("websockets.server")
_CLIENT_LOG = logging.getLogger("websockets.client")


class HandshakeFailed(Exception):
    """The opening handshake did not complete; ``status`` is the HTTP status, if any."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class DialFailed(Exception):
    """A station's backend link could not be opened; ``status`` is the HTTP status the
    station is told (502 unreachable, 504 too slow, or the backend's own refusal)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


async def _send(stream: trio.abc.Stream, proto: ServerProtocol | ClientProtocol) -> None:
    for chunk in proto.data_to_send():
        if chunk:
            await stream.send_all(chunk)


class Upgrade:
    """A station's upgrade request, read and parsed but not yet answered."""

    def __init__(self, stream: trio.abc.Stream, proto: ServerProtocol, request: Request) -> None:
        self.stream = stream
        self.path = request.path
        self._request: Request | None = request  # dropped once answered: it is only needed
        self._proto = proto                      # until then, and a session lives for days
        self._chosen: str | None = None

    @property
    def request(self) -> Request:
        if self._request is None:
            raise RuntimeError("the upgrade has been answered; its request is gone")
        return self._request

    def allow_messages_up_to(self, max_bytes: int) -> None:
        """Raise the message size limit before accepting (overlay links carry route syncs)."""
        self._proto.max_message_size = max_bytes

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name)

    def _forget_request(self) -> None:
        # websockets' parser generator keeps the request object for the connection's
        # life; emptying its headers saves a few KiB per station
        if self._request is not None:
            self._request.headers.clear()
            self._request = None

    def offered_subprotocols(self) -> list[str]:
        """The subprotocols the client offered, in its order; HandshakeFailed(400) if garbled."""
        try:
            return [
                str(p)
                for value in self.request.headers.get_all("Sec-WebSocket-Protocol")
                for p in parse_subprotocol(value)
            ]
        except InvalidHeader as exc:
            raise HandshakeFailed(f"bad Sec-WebSocket-Protocol header: {exc}", 400) from None

    def check(self) -> None:
        """Validate the upgrade headers now, before any backend is dialled."""
        try:
            self._proto.process_request(self.request)
        except InvalidHandshake as exc:
            raise HandshakeFailed(f"not a valid WebSocket upgrade: {exc}", 400) from None

    def _select(self, _proto: ServerProtocol, _offered: object) -> Subprotocol | None:
        return Subprotocol(self._chosen) if self._chosen is not None else None

    async def accept(self, subprotocol: str | None, headers: dict[str, str] | None = None,
                     keepalive: Keepalive | None = None) -> WsLink:
        """Answer 101 with this subprotocol (and extra headers); return the open link.

        permessage-deflate is agreed here when the client offered it and the listener
        allows it (``read_upgrade``'s ``compression``)."""
        self._chosen = subprotocol
        response = self._proto.accept(self.request)
        if response.status_code == 101:
            for name, value in (headers or {}).items():
                response.headers[name] = value
        self._proto.send_response(response)
        self._forget_request()
        await _send(self.stream, self._proto)
        if response.status_code != 101:
            raise HandshakeFailed(f"upgrade refused: {self._proto.handshake_exc}",
                                  response.status_code)
        return WsLink(self.stream, self._proto, keepalive)

    async def reject(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        """Answer with an HTTP error status and a one-line plain text body."""
        response = self._proto.reject(status, reason + "\n")
        for name, value in (headers or {}).items():
            response.headers[name] = value
        self._proto.send_response(response)
        self._forget_request()
        try:
            await _send(self.stream, self._proto)
        finally:
            break_cycles(self._proto)


async def _refuse(stream: trio.abc.Stream, proto: ServerProtocol, why: str) -> None:
    """Answer 400 with ``why``, and nothing websockets queued before it: a pong for a frame
    that came with the request, the end of stream of a parser that failed."""
    proto.data_to_send()
    await stream.send_all(proto.reject(400, why + "\n").serialize())


async def read_upgrade(stream: trio.abc.Stream, max_message_bytes: int,
                       compression: bool = False) -> Upgrade:
    """Read an HTTP upgrade request; a malformed one is answered 400 and raises.

    With ``compression`` the answer accepts permessage-deflate when the client offers it.
    """
    upgrade: Upgrade | None = None

    def select(proto: ServerProtocol, offered: object) -> Subprotocol | None:
        return upgrade._select(proto, offered) if upgrade is not None else None

    proto = ServerProtocol(select_subprotocol=select, max_size=max_message_bytes,
                           logger=_SERVER_LOG,
                           extensions=server_extensions(compression))
    try:
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise HandshakeFailed("connection closed before the upgrade request")
            proto.receive_data(data)
            events = proto.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Request):
                    if index + 1 < len(events) or not at_frame_start(proto):
                        # RFC 6455 §4.1: a client waits for the answer. websockets has
                        # read what came as frames (with no extension or limit agreed),
                        # and may have failed on them or queued a pong
                        await _refuse(stream, proto, "data sent before the upgrade response")
                        raise HandshakeFailed("data sent before the upgrade response", 400)
                    upgrade = Upgrade(stream, proto, event)
                    return upgrade
            if proto.handshake_exc is not None:
                await _refuse(stream, proto, "malformed HTTP request")
                raise HandshakeFailed(f"malformed upgrade request: {proto.handshake_exc}",
                                      400)
    except BaseException:
        break_cycles(proto)
        raise


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection; to an IP address straight, without trio's happy-eyeballs
    machinery (a nursery and a task per attempt), which only names need. The node's
    dials go to addresses its DNS cache resolved, so a connect storm saves that work on
    every backend dial: 420-520 against 640-800 us of CPU per loopback connect, both ends
    counted, in alternating runs of 2,000 (2026-11-28)."""
    family = address_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def dial(
    url: str,
    subprotocols: list[str],
    headers: dict[str, str],
    max_message_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
    keep_headers: tuple[str, ...] = (),
    connect_host: str | None = None,
    dialing: DialSettings | None = None,
) -> WsLink:
    """Open a client WebSocket; HandshakeFailed carries the HTTP status of a refusal.

    ``dialing`` (a backend's or peer's settings) says whether to offer permessage-deflate
    (used if the server agrees) and how to ping; without it, neither. ``ssl_context``
    verifies a wss:// server (default: the system's trust store); a ws:// URL ignores it.

    Response headers named in ``keep_headers`` are kept in the link's ``headers``.
    ``connect_host`` is the address to connect to when it was resolved elsewhere (an SRV
    target in a private zone); the URL's host still names the server (Host header, SNI).
    """
    uri = parse_uri(url)
    parts = urlsplit(url)
    tcp = await open_tcp(connect_host or uri.host, uri.port)
    stream: trio.abc.Stream = tcp
    proto: ClientProtocol | None = None
    try:
        if uri.secure:
            stream = trio.SSLStream(tcp, ssl_context or ssl.create_default_context(),
                                    server_hostname=parts.hostname, https_compatible=True)
        proto = ClientProtocol(uri, subprotocols=[Subprotocol(p) for p in subprotocols],
                               logger=_CLIENT_LOG,
                               max_size=max_message_bytes,
                               extensions=client_extensions(
                                   dialing is not None and dialing.compression == "deflate"))
        request = proto.connect()
        for name, value in headers.items():
            request.headers[name] = value
        proto.send_request(request)
        await _send(stream, proto)
        answered = False
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError as broken:
                if not uri.secure or answered or tls_failure(broken) is not None:
                    raise
                data = b""  # a reset instead of a close: the same refusal
            if not data:
                if uri.secure and not answered:
                    # TLS 1.3 lets a server check the client's certificate after our side
                    # of the handshake is done: a refusal is then a closed connection
                    raise HandshakeFailed(
                        "TLS: the server closed the connection without answering the upgrade; "
                        "a server that requires a client certificate does so when it gets "
                        "none (tls_cert) or one it does not trust")
                proto.receive_eof()
            else:
                answered = True
                proto.receive_data(data)
            events = proto.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Response):
                    exc = proto.handshake_exc
                    if isinstance(exc, InvalidStatus):
                        raise HandshakeFailed(str(exc), exc.response.status_code)
                    if exc is not None:
                        raise HandshakeFailed(f"bad upgrade response: {exc}")
                    link = WsLink(stream, proto,
                                  Keepalive.of(dialing) if dialing is not None else None)
                    for name in keep_headers:
                        kept = event.headers.get(name)
                        if kept is not None:
                            link.headers[name] = kept
                    event.headers.clear()  # kept alive by the parser; see Upgrade
                    # frames that came in the same read as the 101 belong to the link
                    link.take_frames(events[index + 1:])
                    return link
            if not data or proto.handshake_exc is not None:
                raise HandshakeFailed(f"no upgrade response: {proto.handshake_exc}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        if proto is not None:
            break_cycles(proto)
        raise
