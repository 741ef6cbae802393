"""One station's link carried over a peer link, standing in for a WebSocket in a session.

At the edge (the station is connected here, its backend is elsewhere) it stands in for
the backend link and addresses frames to ``"CSMS"``; at the node holding the backend it
stands in for the station's link and addresses frames to the station. Frames arrive
decoded (the peer link decoded them once) and leave as frames: nothing is parsed twice.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import trio

from router.net.wslink import LinkClosed, LinkInfo
from router.wire.frames import SEND, Frame
from router.wire.overlay_frames import OverlayFrame

DISCONNECT = "OverlayStationDisconnect"
_INBOX = 64  # frames queued for one station; a well-behaved peer has one CALL per direction


class Carrier(Protocol):
    """What a virtual link needs from the peer link under it."""

    peer_id: str
    bound: set[Any]  # the virtual links riding on it

    async def send(self, frame: OverlayFrame) -> None: ...

    def send_nowait(self, frame: OverlayFrame) -> bool: ...


class VirtualLink:
    """One station's side of a session carried over a peer link (see StationSession)."""

    def __init__(self, link: Carrier, station: str, dest: str, path: tuple[str, ...],
                 subprotocol: str, origin: str | None = None,
                 on_flood: Callable[[], None] | None = None) -> None:
        # at the edge: the node holding the backend session; frames for the station must
        # start there (path[0]), so no other node can speak to the station as its CSMS
        self.origin = origin
        self.link = link
        self.station = station
        self.dest = dest
        self.path = path
        self.subprotocol: str | None = subprotocol
        self._on_flood = on_flood
        self._send, self._recv = trio.open_memory_channel[Frame](_INBOX)
        self._closed: int | None = None
        self._reason = ""

    @property
    def closed(self) -> int | None:
        return self._closed

    def info(self) -> LinkInfo:
        return LinkInfo("open" if self._closed is None else "closing",
                        via_peer=self.link.peer_id)

    def deliver(self, frame: OverlayFrame) -> None:
        """A frame for this session arrived over the overlay."""
        if self._closed is not None:
            return
        try:
            self._send.send_nowait(Frame(frame.type, frame.id, frame.action, frame.payload,
                                         frame.code, frame.description, frame.details))
        except trio.WouldBlock:
            # a well-behaved peer has one CALL in flight per direction: this is a flood
            if self._on_flood is not None:
                self._on_flood()
            self.end(1008, "too many frames queued for this station")

    def end(self, code: int, reason: str) -> None:
        """The other end went away (or the peer link did): the session sees a close."""
        if self._closed is None:
            self._closed, self._reason = code, reason
            self._send.close()

    async def get_message(self) -> Frame:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LinkClosed(self._closed or 1001, self._reason) from None

    async def send_frame(self, frame: Frame, text: str | None) -> None:
        if self._closed is not None:
            raise LinkClosed(self._closed, self._reason)
        overlay = OverlayFrame(frame.type, self.dest, self.path, frame.id, frame.action,
                               frame.payload, frame.code, frame.description, frame.details)
        if not self.link.send_nowait(overlay):  # no checkpoint when there is room: batches
            await self.link.send(overlay)

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        if self._closed is not None:
            return
        self.end(code, reason)
        # tell the other end (best effort: the peer link may be gone already)
        notice = OverlayFrame(SEND, self.dest, self.path, uuid.uuid4().hex[:20], DISCONNECT,
                              {"code": code, "reason": reason[:120]})
        with trio.move_on_after(wait_s), contextlib.suppress(LinkClosed):
            await self.link.send(notice)
