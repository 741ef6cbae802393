"""Forwarding by destination: what a node does with each overlay frame a peer link read.

A frame for this node answers one of its requests; a frame for ``"CSMS"`` from a station
whose backend this node holds goes to that station's session; a frame for a station
attached here goes to its session at the edge; anything else goes on along the best
route. Before any of that, the path a neighbour claims must be possible through it
(:func:`plausible`), so a peer cannot speak for a node or station behind another link.
See docs/protocol.md.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Protocol

from router.config import BackendEntry
from router.logs import log_event
from router.net.wslink import LinkClosed
from router.overlay.peer_link import PeerLink
from router.overlay.state import OverlayState
from router.overlay.virtual import DISCONNECT
from router.wire.frames import CALL, CALLERROR, SEND
from router.wire.overlay_frames import ANYCAST_CSMS, OverlayFrame
from topology import RouteTable

log = logging.getLogger("router.mesh")

CONNECT = "OverlayStationConnect"


class AttachService(Protocol):
    """The station-attach RPC, as forwarding sees it (router/overlay/attach.py)."""

    def answered(self, frame: OverlayFrame) -> bool:
        """An answer to one of this node's attach requests: True if one was waiting."""
        ...

    def serve(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        """Start serving a station's attach request that came on ``link``."""
        ...


def plausible(node_id: str, table: RouteTable, link_peer: str, frame: OverlayFrame) -> bool:
    """Whether the path a neighbour claims could have reached us through it.

    A claimed path never contains this node (that would be a loop or a forgery), and
    the node it starts from must be reachable through this neighbour: the neighbour
    itself, or a node our routes reach via it. For frames to ``"CSMS"`` the station's
    own route may still be on its way, so the edge node (``path[1]``) is checked; the
    backend node further checks that the station is attached through this link.
    """
    path = frame.path  # already extended with link_peer
    if node_id in path:
        return False
    if len(path) < 2:
        return True
    claimed = path[1] if frame.dest == ANYCAST_CSMS or frame.action == CONNECT else path[0]
    if claimed == link_peer:
        return True
    return any(route.peer == link_peer for route in table.candidates(claimed))


class Forwarder:
    """Delivers or forwards the frames peer links read."""

    def __init__(self, state: OverlayState,
                 backend_for: Callable[[str], BackendEntry | None],
                 attach: AttachService) -> None:
        self.state = state
        self._backend_for = backend_for
        self._attach = attach
        # frames of binary channels for this node (router/channels/): True if one was
        self.channels: Callable[[OverlayFrame], bool] = lambda _frame: False

    async def route(self, link: PeerLink, frame: OverlayFrame) -> None:
        """Deliver or forward one frame that arrived on ``link`` (not a route message)."""
        state = self.state
        dest = frame.dest
        if not plausible(state.node_id, state.table, link.peer_id, frame):
            state.count("refused")
            log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                      station=frame.path[0], path=list(frame.path), dest=dest,
                      reason="claimed path is not possible through this peer")
            if frame.type == CALL:
                await self._answer_error(frame, "SecurityError",
                                         "claimed path is not possible through this link", link)
            return
        if dest == state.node_id:
            if not self.channels(frame) and not self._attach.answered(frame):
                state.count("dropped")
            return
        station = frame.path[0] if frame.path else ""
        if dest == ANYCAST_CSMS and self._backend_for(station) is not None:
            await self._for_backend(link, frame, station)
            return
        edge = state.edge.get(dest)
        if edge is not None:
            if edge.link is not link or not frame.path or frame.path[0] != edge.origin:
                # only the node holding the station's backend session may speak to it,
                # and only over the link the station attached through
                state.count("refused")
                log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                          station=dest, origin=frame.path[0] if frame.path else None,
                          reason="not from the node holding this station's backend session")
                if frame.type == CALL:
                    await self._answer_error(frame, "SecurityError",
                                             "not from this station's backend node", link)
                return
            if frame.action == DISCONNECT and frame.type == SEND:
                edge.end(int(frame.payload.get("code", 1001)), str(frame.payload.get("reason")))
            else:
                edge.deliver(frame)
            return
        await self.forward(frame)

    async def forward(self, frame: OverlayFrame) -> None:
        """Send a frame on along the best route to its destination."""
        state = self.state
        link = state.link_toward(frame.dest)
        if link is None or link.peer_id in frame.path:
            state.count("no_route")
            log_event(log, logging.INFO, "overlay_no_route", dest=frame.dest, id=frame.id)
            if frame.type == CALL and frame.path:
                await self._answer_error(frame, "InternalError", f"no route to {frame.dest}")
            return
        try:
            queued = link.send_nowait(frame)
        except LinkClosed:
            state.count("no_route")
            return
        if not queued:
            # the next hop is not keeping up: never wait for it here, where the reader of
            # another link would stall behind it
            state.count("congested")
            log_event(log, logging.WARNING, "overlay_congested", peer=link.peer_id,
                      dest=frame.dest, id=frame.id)
            if frame.type == CALL and frame.path:
                await self._answer_error(frame, "InternalError",
                                         f"the link toward {frame.dest} is congested")

    async def _answer_error(self, frame: OverlayFrame, code: str, description: str,
                            link: PeerLink | None = None) -> None:
        """Answer an overlay CALL with a CALLERROR.

        A refusal goes straight back on the link the CALL came by, addressed to its origin
        (never along the route to a station it claimed to come from); a node without a
        route answers toward the origin by the route table.
        """
        dest = frame.path[0]
        if frame.action == CONNECT and len(frame.path) > 1:
            dest = frame.path[1]  # the node that asked; the station is not routed yet
        if link is not None:
            dest = link.peer_id  # the neighbour that sent it, authenticated: not its claim
        error = OverlayFrame(CALLERROR, dest, (), frame.id, code=code,
                             description=description, details={})
        if link is not None:
            await self.state.reply(link, error)
        else:
            await self.forward(error)

    async def _for_backend(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        """A frame for the backend of ``station``, which this node holds."""
        state = self.state
        if frame.type == CALL and frame.action == CONNECT:
            if len(frame.path) < 2:
                state.count("refused")
                return
            self._attach.serve(link, frame, station)
            return
        held = state.held.get(station)
        if held is not None and (held.link is not link or frame.path[1:2] != (held.origin,)):
            # a peer may only speak for the stations attached through it
            state.count("refused")
            log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                      station=station, reason="station is not attached through this peer")
            if frame.type == CALL:
                await self._answer_error(frame, "SecurityError",
                                         "station is not attached through this link", link)
            return
        if frame.type == SEND and frame.action == DISCONNECT:
            if held is not None:
                held.end(int(frame.payload.get("code", 1001)), "station link closed")
            return
        if held is None:
            state.count("no_session")
            if frame.type == CALL:
                await self._answer_error(frame, "InternalError",
                                         "no session for this station here; reconnect")
            notice = OverlayFrame(SEND, station, (), uuid.uuid4().hex[:20], DISCONNECT,
                                  {"code": 1001, "reason": "no session"})
            await self.forward(notice)
            return
        held.deliver(frame)
