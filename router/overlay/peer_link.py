"""One WebSocket to a neighbour node: a reader, a writer that batches, route exchange.

The reader decodes each message once (:class:`~router.overlay.codec.PeerCodec`), extends
every frame's path with the id this link authenticated, never the id a frame claims, and
hands it to the owner's ``dispatch``. The writer drains a bounded queue, so a slow peer
holds back only what is sent to it. The exchange task runs the link's route-exchange
session (topology/) on the trio clock.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any, Protocol

import trio

from router.logs import log_event
from router.net.wslink import LinkClosed, WsLink
from router.overlay.codec import PeerCodec, WrongEncoding
from router.wire.frames import SEND, FrameError
from router.wire.overlay_frames import CHANNEL_DATA, OverlayFrame
from topology import ACTION, ExchangeSession

log = logging.getLogger("router.mesh")

_BATCH = 256  # frames per write: one msgpack message, or this many JSON messages
_QUEUE = 1024  # frames waiting for the writer before senders wait
_BULK_WAIT_S = 0.005  # a channel's data waits this long for room on a busy link


class LinkOwner(Protocol):
    """What a peer link needs from the overlay that owns it."""

    @property
    def changed(self) -> trio.Event:
        """Set when the route table changed: the exchange looks at what to send."""
        ...

    def count(self, what: str) -> None: ...

    async def dispatch(self, link: PeerLink, frame: OverlayFrame) -> None:
        """Deliver or forward one frame that arrived on ``link``."""
        ...

    def handle_events(self, link: PeerLink, events: list[Any]) -> bool:
        """Log exchange events; True when the peer's hold timer expired."""
        ...

    async def link_gone(self, link: PeerLink) -> None:
        """The link closed: its routes and the sessions riding on it go."""
        ...


class PeerLink:
    """One WebSocket to a neighbour node, for as long as it is open."""

    def __init__(self, owner: LinkOwner, peer_id: str, ws: WsLink, encoding: str,
                 exchange: ExchangeSession) -> None:
        self.owner = owner
        self.peer_id = peer_id
        self.ws = ws
        self.codec = PeerCodec(encoding)
        self.exchange = exchange
        self._out_send, self._out_recv = trio.open_memory_channel[OverlayFrame](_QUEUE)
        self.bound: set[Any] = set()  # virtual links of station sessions riding on this link
        self.closed = False
        # overlay frames read and written; the admin turns them into rates when it looks
        self.frames_in = 0
        self.frames_out = 0
        self.finished = trio.Event()  # set once run() has cleaned up
        self._scope = trio.CancelScope()
        self._why = "peer link closed"

    @property
    def encoding(self) -> str:
        return self.codec.encoding

    async def send(self, frame: OverlayFrame) -> None:
        """Queue one frame for the writer (waits while the queue is full: backpressure)."""
        if self.closed:
            raise LinkClosed(1001, "peer link closed")
        try:
            await self._out_send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed(1001, "peer link closed") from None

    def send_nowait(self, frame: OverlayFrame) -> bool:
        """Queue a frame if there is room now; False when the queue is full (for a
        channel's data: half full, see :meth:`has_room_for_bulk`)."""
        if self.closed:
            raise LinkClosed(1001, "peer link closed")
        if frame.type == CHANNEL_DATA and not self.has_room_for_bulk():
            return False
        try:
            self._out_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed(1001, "peer link closed") from None
        return True

    def has_room_for_bulk(self) -> bool:
        """Whether bulk frames (a channel's data) may be queued now: they may fill at most
        half the queue, so the other half always has room for OCPP frames."""
        return self._out_send.statistics().current_buffer_used < _QUEUE // 2

    async def send_bulk(self, frame: OverlayFrame) -> bool:
        """Queue a channel's data frame once the queue is less than half full; True if it
        had to wait for that (a stall)."""
        waited = False
        while not self.has_room_for_bulk() and not self.closed:
            waited = True
            await trio.sleep(_BULK_WAIT_S)
        await self.send(frame)
        return waited

    def stop(self, why: str) -> None:
        """End the link from another task (a new link replaces it): its own task stops
        reading and closes the WebSocket, so no two tasks ever use the socket at once."""
        self._why = why
        self._scope.cancel()

    async def run(self) -> None:
        """Read, write and exchange routes until the link closes; then clean up."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, nursery.cancel_scope)
                    nursery.start_soon(self._exchange, nursery.cancel_scope)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._out_send.close()
            with trio.CancelScope(shield=True):
                try:
                    await self.owner.link_gone(self)
                    with trio.move_on_after(2):
                        await self.ws.aclose(1001, self._why)
                finally:
                    self.finished.set()

    async def _reader(self) -> None:
        owner, codec = self.owner, self.codec
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            try:
                message = await self.ws.get_message()
            except LinkClosed:
                return
            try:
                frames = codec.decode(message)
            except WrongEncoding as exc:
                await self.ws.aclose(exc.close_code, str(exc))
                return
            except FrameError as err:
                owner.count("bad_frames")
                log_event(log, logging.WARNING, "overlay_frame_error", peer=self.peer_id,
                          reason=err.description)
                continue
            self.frames_in += len(frames)
            for frame in frames:
                if debug:
                    log_event(log, logging.DEBUG, "overlay_frame", peer=self.peer_id,
                              type=frame.type, dest=frame.dest, path=list(frame.path),
                              id=frame.id, action=frame.action)
                # the path is extended with whom we authenticated, never what was claimed
                await owner.dispatch(self, frame.passed(self.peer_id))

    async def _writer(self, scope: trio.CancelScope) -> None:
        codec, ws = self.codec, self.ws
        try:
            async for first in self._out_recv:
                frames = [first]
                while len(frames) < _BATCH:
                    try:
                        frames.append(self._out_recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                self.frames_out += len(frames)
                for message in codec.encode(frames):
                    if isinstance(message, str):
                        await ws.send_message(message)
                    else:
                        await ws.send_bytes(message)
        except LinkClosed:
            pass
        finally:
            scope.cancel()

    async def _exchange(self, scope: trio.CancelScope) -> None:
        exchange, owner = self.exchange, self.owner
        try:
            for payload in exchange.link_up(trio.current_time()):
                await self.send(self._topology_frame(payload))
            while True:
                deadline = exchange.next_deadline()
                changed = owner.changed
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await changed.wait()
                for payload in exchange.tick(trio.current_time()):
                    await self.send(self._topology_frame(payload))
                if owner.handle_events(self, exchange.take_events()):
                    return  # the hold timer expired
        except LinkClosed:
            pass
        finally:
            scope.cancel()

    def _topology_frame(self, payload: dict[str, Any]) -> OverlayFrame:
        return OverlayFrame(SEND, self.peer_id, (), uuid.uuid4().hex[:20], ACTION, payload)
