"""The station-attach RPC: a station connects to a node without its backend.

The edge sends ``OverlayStationConnect`` up its best ``"CSMS"`` route with the station's
offered subprotocols (and its Authorization header, for ``auth = "passthrough"``). The
node holding the backend dials the CSMS as the station and answers with the subprotocol
chosen, or with a CALLERROR carrying the HTTP status for the station. Then both ends run
an ordinary :class:`~router.relay.session.StationSession`, with a virtual link standing
in for the far side. See docs/protocol.md.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from router.config import BackendEntry, NodeSection
from router.logs import log_event
from router.net.handshake import DialFailed, Upgrade
from router.net.wslink import LinkClosed, WsLink
from router.overlay.forwarding import CONNECT
from router.overlay.peer_link import PeerLink
from router.overlay.state import OverlayState
from router.overlay.virtual import VirtualLink
from router.relay.registry import SessionRegistry
from router.relay.session import SessionDeps, StationSession
from router.wire.frames import CALL, CALLERROR, CALLRESULT, Version
from router.wire.overlay_frames import ANYCAST_CSMS, OverlayFrame

log = logging.getLogger("router.mesh")

DialBackend = Callable[[str, BackendEntry, list[str], str | None],
                       Awaitable[tuple[WsLink, int]]]
"""Opens a station's backend link: (station, backend, offered subprotocols,
Authorization header) -> (link, priority); raises DialFailed."""


@dataclass(frozen=True, slots=True)
class AttachContext:
    """What attaching needs from the node, all of it live (a reload may change it)."""

    settings: Callable[[], NodeSection]
    subprotocols: Callable[[], tuple[str, ...]]  # those the listener accepts
    backend_for: Callable[[str], BackendEntry | None]  # a station's primary here, if any
    dial_backend: DialBackend
    sessions: SessionRegistry
    session_deps: SessionDeps


class Attacher:
    """Both ends of the attach RPC for one node."""

    def __init__(self, state: OverlayState, context: AttachContext) -> None:
        self.state = state
        self.context = context
        self._pending: dict[str, trio.MemorySendChannel[OverlayFrame]] = {}
        self._nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Serve attach requests in tasks of ``nursery`` (the node's)."""
        self._nursery = nursery

    def flooded(self) -> None:
        self.state.count("flooded")

    # --- the edge -----------------------------------------------------------------------

    async def attach(self, upgrade: Upgrade, identity: str,
                     offered: list[str]) -> tuple[WsLink, VirtualLink]:
        """Ask the node holding the backend for a link; accept the station with its choice.

        Raises DialFailed with the HTTP status for the station when no backend takes it.
        """
        state = self.state
        link = state.link_toward(ANYCAST_CSMS)
        if link is None:
            raise DialFailed(502, "no route to a backend")
        message_id = uuid.uuid4().hex[:20]
        payload: dict[str, Any] = {"subprotocols": offered}
        authorization = upgrade.header("Authorization")
        if authorization is not None:
            payload["authorization"] = authorization
        answer_send, answer_recv = trio.open_memory_channel[OverlayFrame](1)
        self._pending[message_id] = answer_send
        try:
            with trio.fail_after(self.context.settings().connect_timeout_s + 2):
                await link.send(OverlayFrame(CALL, ANYCAST_CSMS, (identity,), message_id,
                                             CONNECT, payload))
                answer = await answer_recv.receive()
        except (trio.TooSlowError, trio.EndOfChannel, LinkClosed):
            raise DialFailed(504, "the backend node did not answer") from None
        finally:
            self._pending.pop(message_id, None)
        chosen = answer.payload.get("subprotocol") if answer.type == CALLRESULT else None
        if chosen not in offered:
            status = (answer.details or {}).get("status", 502) if answer.details else 502
            raise DialFailed(int(status) if isinstance(status, int) else 502,
                             answer.description or "backend refused the station")
        station_ws = await upgrade.accept(chosen)
        origin = answer.path[0] if answer.path else link.peer_id
        virtual = VirtualLink(link, identity, ANYCAST_CSMS, (identity,), chosen, origin,
                              self.flooded)
        link.bound.add(virtual)
        state.edge[identity] = virtual
        state.table.originate(identity)
        state.wake()
        log_event(log, logging.INFO, "overlay_attach", station=identity, via=link.peer_id,
                  subprotocol=chosen)
        return station_ws, virtual

    def detach(self, identity: str, virtual: VirtualLink) -> None:
        """The station's session at the edge ended."""
        virtual.link.bound.discard(virtual)
        state = self.state
        if state.edge.get(identity) is virtual:
            del state.edge[identity]
            state.table.withdraw_local(identity)
            state.wake()

    def answered(self, frame: OverlayFrame) -> bool:
        """An answer addressed to this node: the attach request it answers, if waiting."""
        pending = self._pending.pop(frame.id, None)
        if pending is None:
            return False
        pending.send_nowait(frame)
        return True

    def link_gone(self) -> None:
        """A peer link closed: attach requests waiting on an answer fail now."""
        for channel in list(self._pending.values()):
            channel.close()

    # --- the node with the backend ------------------------------------------------------

    def serve(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        """Serve one attach request in a task of its own."""
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, link, frame, station)

    async def _serve(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        try:
            await self._serve_inner(link, frame, station)
        except Exception:
            log.exception("overlay attach failed", extra={"fields": {"station": station}})

    async def _serve_inner(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        context, state = self.context, self.state
        requester = frame.path[1]
        backend = context.backend_for(station)
        assert backend is not None
        offered = [p for p in frame.payload.get("subprotocols", []) if isinstance(p, str)
                   and p in context.subprotocols()]
        authorization = frame.payload.get("authorization")
        settings = context.settings()
        await context.sessions.stop(station, "replaced by a new attach",
                                    settings.shutdown_timeout_s + 1, held=True)
        try:
            if not offered:
                raise DialFailed(400, "no supported OCPP subprotocol offered")
            backend_ws, _ = await context.dial_backend(
                station, backend, offered,
                authorization if isinstance(authorization, str) else None)
        except DialFailed as refused:
            await state.reply(link, OverlayFrame(
                CALLERROR, requester, (), frame.id, code="GenericError",
                description=refused.reason, details={"status": refused.status}))
            return
        chosen = backend_ws.subprotocol or ""
        try:
            await state.reply(link, OverlayFrame(CALLRESULT, requester, (), frame.id,
                                                 payload={"subprotocol": chosen}))
            virtual = VirtualLink(link, station, station, (), chosen, on_flood=self.flooded)
            link.bound.add(virtual)
            session = StationSession(context.session_deps, station,
                                     Version.from_subprotocol(chosen), virtual, backend_ws,
                                     backend.name,
                                     backend_keeps_signatures=backend.keep_signatures,
                                     station_keeps_signatures=True)
            state.held[station] = virtual
            log_event(log, logging.INFO, "overlay_station", station=station,
                      via=link.peer_id, backend=backend.name, subprotocol=chosen)
            context.sessions.add(session, held=True)
            try:
                await session.run()
            finally:
                context.sessions.ended(session, held=True)
                link.bound.discard(virtual)
                if state.held.get(station) is virtual:
                    del state.held[station]
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(backend_ws.stream)
