"""One WebSocket over a trio stream, driven by the sans-IO protocol of ``websockets``.

The node's links read in the task that forwards, with no reader task and no channel in
between: ``get_message`` parses what the socket delivered and returns the next whole
message, ``send_message`` frames and writes. websockets does the RFC 6455 work (HTTP
upgrade parsing, framing, masking with its C helper, ping/pong, the close handshake,
message-size limits), but for whole data frames, which the link's framing reads and
writes itself (router/net/framing.py); this module adds fragment reassembly, UTF-8 checks
on text messages and the trio I/O. Measured in ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from router.net.compression import Carried, CompressedText, passing_bits
from router.net.framing import Framing
from router.net.keepalive import Keepalive, Spawner, watch
from router.wire.frames import Frame, encode_frame

Buffer = bytes | bytearray | memoryview
RECEIVE_BYTES = 65536
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
_NOT_SINCE_PING = -math.inf  # a link's last read time while its ping waits for an answer


class LinkClosed(Exception):
    """The WebSocket is closed; ``code`` is the peer's close code, or ours if we failed it."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """What the operator sees of a link; made when asked, never on the forwarding path."""

    state: str  # open | closing | failing_over (a backend link moving to another target)
    remote: str | None = None  # host:port of the far end of a real WebSocket
    via_peer: str | None = None  # a link carried over the overlay: the peer link it rides
    srv_backend: str | None = None  # a backend link that follows an SRV name: its backend
    priority: int | None = None  # ... and the SRV priority of the target in use
    compressed: bool | None = None  # a real WebSocket: permessage-deflate agreed on it


class Link(Protocol):
    """What a station session needs from a link: a real WebSocket or one that stands in
    for it (a virtual link over the overlay, a backend link that fails over)."""

    subprotocol: str | None

    @property
    def closed(self) -> int | None: ...

    async def get_message(self) -> str | bytes | Frame:
        """The next message: text or binary as received, or a frame decoded already."""
        ...

    async def send_frame(self, frame: Frame, text: str | None) -> None:
        """Send an OCPP-J frame; ``text`` is its encoding when the caller has it."""
        ...

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None: ...

    def info(self) -> LinkInfo: ...


class WsLink:
    """An open WebSocket: whole text (str) or binary (bytes) messages in, text out."""

    __slots__ = ("__weakref__", "_framing", "_inbox", "_keepalive", "_last_read", "_lock", "_lost",
                 "_next", "_opcode", "_out", "_parts", "_pass_bits", "_pinged_at", "_raw",
                 "_reading", "headers", "on_dead", "protocol", "stream", "subprotocol")

    def __init__(self, stream: trio.abc.Stream, protocol: ServerProtocol | ClientProtocol,
                 keepalive: Keepalive | None = None) -> None:
        self.stream = stream
        self.protocol = protocol
        self.subprotocol: str | None = protocol.subprotocol
        self._lock = trio.StrictFIFOLock()
        # whole messages parsed but not yet returned; a list and a read position are
        # much smaller than a deque, and a link holds this for its whole life
        self._inbox: list[str | bytes] = []
        self._next = 0
        self._parts: list[Buffer] = []
        self._opcode: Opcode | None = None
        self._raw = _raw_socket(stream)
        # a text that came compressed and is no longer than 2^_pass_bits bytes (this
        # link's announced window) goes out as it came (router/net/compression.py);
        # 0: every text is encoded here
        self._pass_bits = passing_bits(protocol.extensions)
        self.headers: dict[str, str] = {}  # handshake headers the caller asked to keep
        # reads whole data frames itself, the rest through websockets
        # (router/net/framing.py); None: websockets reads every byte
        self._framing = Framing.of(protocol)
        self._keepalive = keepalive
        self._lost = ""  # why the node gave the link up itself
        self._pinged_at: float | None = None
        self._last_read = 0.0
        self._reading = False  # the link's reader waits on the socket (keepalive only)
        # plain TCP: bytes written but not yet taken by the kernel, in order; whoever
        # writes next appends to them, and a flush sends them (see ``put``)
        self._out: bytearray | None = None
        # set while the forwarding loop reads the link (router/net/readloop.py): how the
        # keepalive watcher, or a write that finds the connection gone, tells it the link
        # is dead, as a reader would see end of stream
        self.on_dead: Callable[[], None] | None = None
        if keepalive is not None:
            self._last_read = trio.current_time()
            watch(self, self._last_read + keepalive.interval_s)

    @property
    def closed(self) -> int | None:
        """None while open, else the close code (as :meth:`get_message` would raise it)."""
        if self.protocol.state is State.OPEN:
            return None
        return self._close_code()

    def _close_code(self) -> int:
        proto = self.protocol
        if proto.close_rcvd is not None:
            return proto.close_rcvd.code
        if proto.close_sent is not None:
            return proto.close_sent.code
        return CLOSE_ABNORMAL

    def _close_reason(self) -> str:
        proto = self.protocol
        close = proto.close_rcvd or proto.close_sent
        return close.reason if close is not None else self._lost

    async def get_message(self) -> str | bytes:
        """The next whole message; raises LinkClosed once the WebSocket has closed."""
        inbox = self._inbox
        proto = self.protocol
        while self._next >= len(inbox):
            if self._next:
                inbox.clear()
                self._next = 0
            if proto.state is not State.OPEN:
                raise LinkClosed(self._close_code(), self._close_reason())
            if self._keepalive is None:
                data = await self._receive()
            else:
                self._reading = True
                data = await self._receive()
                self._reading = False
                self._last_read = trio.current_time()
            self._read(data)
            if proto.writes:
                # pongs, the reply to a close, or the close we send when failing
                await self._flush()
        message = inbox[self._next]
        self._next += 1
        return message

    def keepalive_due(self, now: float, nursery: Spawner) -> float | None:
        """The keepalive watcher's look (router.net.keepalive): ping a link quiet for the
        interval; drop one that sent nothing back within the timeout of the ping (a
        half-open TCP connection, a blackholed route). Its reader then sees LinkClosed
        1006 with the reason."""
        keepalive = self._keepalive
        if keepalive is None or self.protocol.state is not State.OPEN:
            return None
        if not self._reading:
            # the reader is busy elsewhere (forwarding into a slow station): an answer
            # could be waiting unread, so neither quiet nor dead can be told; look later
            self._pinged_at = None
            if self._last_read == _NOT_SINCE_PING:
                self._last_read = now
            return now + keepalive.interval_s
        pinged_at = self._pinged_at
        if pinged_at is not None and self._last_read == _NOT_SINCE_PING:
            if now < pinged_at + keepalive.timeout_s:
                return pinged_at + keepalive.timeout_s
            self._lost = f"no answer to a ping within {keepalive.timeout_s:g} s"
            self.protocol.state = State.CLOSED
            if self.on_dead is not None:
                self.on_dead()
            nursery.start_soon(close_stream, self.stream)
            return None
        self._pinged_at = None
        quiet_until = self._last_read + keepalive.interval_s
        if now < quiet_until:
            return quiet_until
        # any read from now on replaces the marker with its time: an answer
        self._pinged_at, self._last_read = now, _NOT_SINCE_PING
        nursery.start_soon(self._ping)
        return now + keepalive.timeout_s

    async def _ping(self) -> None:
        if self.protocol.state is State.OPEN:
            self.protocol.send_ping(b"")
            with contextlib.suppress(LinkClosed):
                await self._flush()

    async def _receive(self) -> bytes | bytearray:
        """Next bytes from the peer, b"" at end of stream. Always a checkpoint."""
        raw = self._raw
        if raw is None:
            try:
                return await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        # Plain TCP: wait for readability, then read once; one scheduler round trip where
        # trio's receive_some takes two (try, wait, read, checkpoint). No read is tried
        # before the wait: OCPP-J is call and answer, so after a frame is forwarded the
        # next one has almost never arrived yet, and the failed read (a syscall and an
        # exception) cost a fifth of the node's CPU per frame (bench/forwarding.py,
        # 2026-11-28: 133-136 against 105-107 us). Data already waiting costs one pass
        # through epoll, which reports it at once.
        while True:
            try:
                await trio.lowlevel.wait_readable(raw)
            except (trio.ClosedResourceError, trio.BusyResourceError):
                return b""
            try:
                return raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                return b""

    # --- the forwarding loop's side (router/net/readloop.py) -------------------------------

    @property
    def sock(self) -> socket.socket | None:
        """The plain TCP socket the link reads and writes (None for TLS and others)."""
        return self._raw

    def feed(self, data: bytes, now: float) -> list[str | bytes]:
        """What the forwarding loop read (b"" at end of stream), read at ``now``: the
        whole messages it completed. A pong or other reply goes out at once."""
        if self._keepalive is not None:
            self._last_read = now
        framing = self._framing
        if framing is not None and data:
            framing.feed(data, self)  # _read's first case, inline: this is every frame's path
        else:
            self._read(data)
        proto = self.protocol
        if proto.state is State.OPEN and proto.writes:
            with contextlib.suppress(LinkClosed):  # the next read sees the end
                self.put(b"".join(proto.data_to_send()))
        return self.take_messages()

    def _read(self, data: bytes | bytearray) -> None:
        """Parse bytes the far end sent (b"": its end of stream) into the inbox."""
        framing = self._framing
        if framing is not None:
            if data:
                framing.feed(data, self)
            else:
                framing.end()
        elif data:
            self.protocol.receive_data(data)
            self.take_events()
        else:
            self.protocol.receive_eof()

    def take_messages(self) -> list[str | bytes]:
        """The whole messages parsed and not yet taken (by the loop, not ``get_message``)."""
        inbox, start = self._inbox, self._next
        if not inbox:
            return inbox
        self._inbox, self._next = [], 0
        return inbox[start:] if start else inbox

    def ended(self) -> tuple[int, str] | None:
        """None while open, else the close code and reason as ``get_message`` raises them."""
        if self.protocol.state is State.OPEN:
            return None
        return self._close_code(), self._close_reason()

    def set_reading(self, reading: bool) -> None:
        """Whether a reader waits on the socket now, for the keepalive watcher."""
        self._reading = reading

    def take_frames(self, events: Sequence[object]) -> None:
        """Frames parsed before this link existed (in the read that completed the handshake)."""
        self.take_events(cast("list[WsFrame]", list(events)))

    def take_events(self, events: list[WsFrame] | None = None) -> None:
        # after the opening handshake, every event is a frame
        if events is None:
            events = cast("list[WsFrame]", self.protocol.events_received())
        for frame in events:
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self.deliver(opcode, frame.data)
                else:
                    self._opcode = opcode
                    self._parts = [frame.data]
            elif opcode is Opcode.CONT and self._opcode is not None:
                self._parts.append(frame.data)
                if frame.fin:
                    data = b"".join(self._parts)
                    opcode, self._opcode, self._parts = self._opcode, None, []
                    self.deliver(opcode, data)

    def deliver(self, opcode: Opcode, data: Buffer) -> None:
        proto = self.protocol
        if proto.state is not State.OPEN and (
                proto.close_rcvd is None or proto.close_rcvd_then_sent is not True):
            # the node gave the link up (a failed check, a dead keepalive): nothing after
            # counts. A peer's close does not void the messages it sent before it, in
            # the same read: a station's last answer before it leaves is forwarded.
            return
        if opcode is Opcode.TEXT:
            try:
                if type(data) is Carried:
                    self._inbox.append(data.text())
                else:
                    self._inbox.append(str(data, "utf-8"))
            except UnicodeDecodeError:
                self.protocol.fail(CLOSE_INVALID_DATA, "text message is not valid UTF-8")
        else:
            self._inbox.append(bytes(data))

    async def send_message(self, message: str) -> None:
        """Send one text message; raises LinkClosed if the WebSocket is no longer open."""
        proto = self.protocol
        if proto.state is not State.OPEN:
            raise LinkClosed(self._close_code(), self._close_reason())
        proto.send_text(message.encode("utf-8"))
        await self._flush()

    async def send_frame(self, frame: Frame, text: str | None) -> None:
        """Send an OCPP-J frame: the text it arrived as, or else its encoding."""
        # send_message's body, not a call to it: this is every forwarded frame's path
        proto = self.protocol
        if proto.state is not State.OPEN:
            raise LinkClosed(self._close_code(), self._close_reason())
        data = self._framed(self._payload(frame, text))
        if data:
            proto.writes.append(data)
        await self._flush()

    def info(self) -> LinkInfo:
        """State and far end, for the admin endpoint."""
        return LinkInfo("open" if self.closed is None else "closing", self.remote_address(),
                        compressed=self.compressed)

    @property
    def compressed(self) -> bool:
        """Whether permessage-deflate was agreed in the opening handshake."""
        return bool(self.protocol.extensions)

    def remote_address(self) -> str | None:
        """``host:port`` of the far end, or None once the socket is gone."""
        stream: Any = self.stream
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None)
        try:
            host, port = sock.getpeername()[:2] if sock is not None else (None, 0)
        except OSError:
            return None
        if host is None:
            return None
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message (overlay links with msgpack)."""
        proto = self.protocol
        if proto.state is not State.OPEN:
            raise LinkClosed(self._close_code(), self._close_reason())
        proto.send_binary(data)
        await self._flush()

    def put_frame(self, frame: Frame, text: str | None) -> None:
        """:meth:`send_frame` without waiting, for plain TCP links only (the forwarding
        loop's path): what the kernel does not take now waits in the link, in order, for
        the next flush; ``backlog`` says whether any does."""
        proto = self.protocol
        if proto.state is not State.OPEN:
            raise LinkClosed(self._close_code(), self._close_reason())
        data = self._framed(self._payload(frame, text))
        if proto.writes:  # websockets framed it, or bytes of its own wait before it
            if data:
                proto.writes.append(data)
            writes = proto.data_to_send()
            data = writes[0] if len(writes) == 1 else b"".join(writes)
        self.put(data)

    def _framed(self, payload: bytes) -> bytes:
        """A text message's frame, framed here (router/net/framing.py), or b"" when
        websockets framed it into its own queue of writes."""
        framing = self._framing
        data = framing.text_frame(payload) if framing is not None else None
        if data is None:
            self.protocol.send_text(payload)
            return b""
        return data

    def _payload(self, frame: Frame, text: str | None) -> bytes:
        """What to send for a frame: its text, encoded, or the compressed payload the text
        came as, when this link may send that unchanged (router/net/compression.py)."""
        if text is None:
            return encode_frame(frame).encode("utf-8")
        if type(text) is CompressedText and text.bits <= self._pass_bits:
            return text.wire
        return text.encode("utf-8")

    def put(self, data: bytes) -> None:
        """Write bytes on a plain TCP link without waiting: into the kernel's buffer while
        nothing waits before them, else behind what does. Raises LinkClosed when the
        connection is lost."""
        out = self._out
        if out is not None:
            out += data
            return
        raw = self._raw
        assert raw is not None, "put is for plain TCP links"
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._connection_lost()
            # the peer's close code if its close frame came first: what ``closed`` says
            raise LinkClosed(self._close_code(), "connection lost") from None
        if sent < len(data):
            self._out = bytearray(memoryview(data)[sent:])

    def _connection_lost(self) -> None:
        """A write found the connection gone: the link is closed, and the forwarding loop,
        if it reads the link, hears it now (no read may ever come to tell it)."""
        self.protocol.state = State.CLOSED
        if self.on_dead is not None:
            self.on_dead()

    @property
    def backlog(self) -> int:
        """Bytes written on a plain TCP link that the kernel has not taken yet."""
        out = self._out
        return 0 if out is None else len(out)

    async def flush(self) -> None:
        """Send what the protocol has to send and what waits in the link; return once the
        kernel has taken all of it."""
        await self._flush()

    async def _flush(self) -> None:
        writes = self.protocol.data_to_send()
        raw = self._raw
        if raw is None:
            if writes:
                await self._send_stream(writes)
            return
        eof = bool(writes) and not writes[-1]
        if writes:
            data = writes[0] if len(writes) == 1 else b"".join(writes)
            if data:
                # Fast path: the kernel's buffer right away, with no scheduler checkpoint:
                # one saved per forwarded frame
                self.put(data)
        if self._out is None and not eof:
            return
        # the lock keeps one task at a time waiting for the socket to take more
        async with self._lock:
            await self._drain(raw)
            if eof:  # websockets asks for a half-close after a final close frame
                await close_stream(self.stream)

    async def _drain(self, raw: socket.socket) -> None:
        """Wait until the kernel has taken every byte waiting in the link."""
        while (out := self._out) is not None:
            try:
                await trio.lowlevel.wait_writable(raw)
                sent = raw.send(out)
            except BlockingIOError:
                continue
            except (OSError, ValueError, trio.ClosedResourceError, trio.BusyResourceError):
                # ValueError: the socket was closed under the wait (fileno -1)
                self._connection_lost()
                raise LinkClosed(self._close_code(), "connection lost") from None
            # other writers only append meanwhile, so the front is what was sent
            del out[:sent]
            if not out:
                self._out = None

    async def _send_stream(self, writes: list[bytes]) -> None:
        """Write through the stream (TLS), in order with other writers."""
        data = writes[0] if len(writes) == 1 else b"".join(writes)
        eof = not writes[-1]
        async with self._lock:
            try:
                if data:
                    await self.stream.send_all(data)
                if eof:
                    await close_stream(self.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.protocol.state = State.CLOSED
                # the peer's close code if its close frame came first: what ``closed`` says
                raise LinkClosed(self._close_code(), "connection lost") from None

    async def close_now(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame if we can and drop the connection without waiting for the
        peer's (another task may be reading this link)."""
        proto = self.protocol
        if proto.state is State.OPEN:
            proto.send_close(code, reason)
            try:
                with trio.move_on_after(1):
                    await self._flush()
            except LinkClosed:
                pass
        await close_stream(self.stream)

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        """Close with a close frame, wait briefly for the peer's, then close the socket."""
        proto = self.protocol
        try:
            if proto.state is State.OPEN:
                proto.send_close(code, reason)
                await self._flush()
            with trio.move_on_after(wait_s):
                while proto.state is not State.CLOSED:
                    data = await self.stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        break
                    proto.receive_data(data)
                    proto.events_received()
                    await self._flush()
        except (LinkClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await close_stream(self.stream)
            break_cycles(proto)


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close a stream at once, without a goodbye. A plain TCP stream's socket is closed in
    place, which is all its ``aclose`` does before a checkpoint; ``trio.aclose_forcefully``
    adds a cancel scope and a Cancelled raised and caught, a fair part of what a session's
    wind-down cost when thousands of stations left at once (bench/fleet.py). Any other
    stream (TLS) is closed by ``trio.aclose_forcefully``."""
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def break_cycles(proto: ServerProtocol | ClientProtocol) -> None:
    """A protocol done with (a closed link, a refused or failed handshake) freed by
    reference counting, not by a collector sweep.

    websockets keeps its parser as a generator that holds the protocol, and a server's
    subprotocol choice as a method bound to it (the Upgrade's); left alone, each ended
    session leaves some twenty objects in reference cycles, which the node's frozen
    generations keep until a sweep (router/gcwatch.py). Nothing parses after ``aclose``:
    the state is no longer OPEN, so :meth:`WsLink.get_message` raises LinkClosed first;
    after a refused or failed handshake no link exists.
    """
    proto.parser.close()
    # a reader that was waiting on the socket when it closed still feeds its EOF (or last
    # bytes) in: a parser that takes them and holds nothing
    proto.parser = _parse_nothing()
    vars(proto).pop("select_subprotocol", None)


def _parse_nothing() -> Generator[None]:
    while True:
        yield


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The stdlib socket under a plain trio TCP stream (None for TLS and other streams)."""
    if isinstance(stream, trio.SocketStream):
        raw = getattr(stream.socket, "_sock", None)
        if isinstance(raw, socket.socket):
            return raw
    return None
