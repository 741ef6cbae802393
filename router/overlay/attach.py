"""The station-attach RPC: a station connects to a node without its backend.

The edge sends ``OverlayStationConnect`` up its best ``"CSMS"`` route with the station's
offered subprotocols (and its Authorization header, for ``auth = "passthrough"``). The
node holding the backend dials the CSMS as the station and answers with the subprotocol
chosen, or with a CALLERROR carrying the HTTP status for the station. Then both ends run
an ordinary :class:`~router.relay.session.StationSession`, with a virtual link standing
in for the far side. See docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from router.config import BackendEntry, NodeSection, unwraps_signed
from router.logs import log_event
from router.net.handshake import DialFailed, Upgrade
from router.net.keepalive import Keepalive
from router.net.wslink import LinkClosed, WsLink
from router.overlay.forwarding import CONNECT
from router.overlay.peer_link import PeerLink
from router.overlay.state import OverlayState
from router.overlay.virtual import VirtualLink
from router.relay.failover import FailoverLink
from router.relay.forwarding import SessionDeps
from router.relay.registry import SessionRegistry
from router.relay.session import StationSession
from router.wire.frames import CALL, CALLERROR, CALLRESULT, Version
from router.wire.overlay_frames import ANYCAST_CSMS, OverlayFrame

log = logging.getLogger("router.mesh")

DialBackend = Callable[[str, BackendEntry, list[str], str | None, int | None],
                       Awaitable[tuple[WsLink, int]]]
"""Opens a station's backend link: (station, backend, offered subprotocols,
Authorization header, a priority the target must be better than or None) -> (link,
priority); raises DialFailed."""


@dataclass(frozen=True, slots=True)
class AttachContext:
    """What attaching needs from the node, all of it live (a reload may change it)."""

    settings: Callable[[], NodeSection]
    subprotocols: Callable[[], tuple[str, ...]]  # those the listener accepts
    backend_for: Callable[[str], BackendEntry | None]  # a station's primary here, if any
    dial_backend: DialBackend
    sessions: SessionRegistry
    session_deps: SessionDeps
    station_keepalive: Callable[[], Keepalive | None] = lambda: None  # [listen] ping_*


_Answer = tuple[OverlayFrame, "VirtualLink | None"]
"""An attach answer, and the station's virtual link when it accepts the station."""


@dataclass(frozen=True, slots=True)
class _Pending:
    """An attach request waiting for its answer."""

    channel: trio.MemorySendChannel[_Answer]
    link: PeerLink  # the peer link it went out on
    identity: str
    offered: list[str]


class Attacher:
    """Both ends of the attach RPC for one node."""

    def __init__(self, state: OverlayState, context: AttachContext) -> None:
        self.state = state
        self.context = context
        # attach requests waiting for their answer, by message id
        self._pending: dict[str, _Pending] = {}
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
        answer_send, answer_recv = trio.open_memory_channel[_Answer](1)
        self._pending[message_id] = _Pending(answer_send, link, identity, offered)
        virtual: VirtualLink | None = None
        try:
            try:
                with trio.fail_after(self.context.settings().connect_timeout_s + 2):
                    await link.send(OverlayFrame(CALL, ANYCAST_CSMS, (identity,), message_id,
                                                 CONNECT, payload))
                    answer, virtual = await answer_recv.receive()
            except (trio.TooSlowError, trio.EndOfChannel, LinkClosed):
                raise DialFailed(504, "the backend node did not answer") from None
            finally:
                self._pending.pop(message_id, None)
            if virtual is None:
                raise DialFailed(_http_status(answer.details),
                                 (answer.description or "backend refused the station")[:200])
            station_ws = await upgrade.accept(virtual.subprotocol,
                                              keepalive=self.context.station_keepalive())
        except BaseException:
            if virtual is None:  # an answer that came as this gave up waiting
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    virtual = answer_recv.receive_nowait()[1]
            if virtual is not None:  # the far node has a session: it ends it too
                await self._forget(identity, virtual)
            raise
        state.table.originate(identity)
        state.wake()
        log_event(log, logging.INFO, "overlay_attach", station=identity, via=link.peer_id,
                  subprotocol=virtual.subprotocol)
        return station_ws, virtual

    async def _forget(self, identity: str, virtual: VirtualLink) -> None:
        """A station link that was answered for but never became a session here (no
        route was originated for it)."""
        self._unbind(identity, virtual)
        with trio.CancelScope(shield=True):
            await virtual.aclose(1001, "the station went away during its upgrade", wait_s=1.0)

    def detach(self, identity: str, virtual: VirtualLink) -> None:
        """The station's session at the edge ended."""
        if self._unbind(identity, virtual):
            self.state.table.withdraw_local(identity)
            self.state.wake()

    def _unbind(self, identity: str, virtual: VirtualLink) -> bool:
        """Frames for the station no longer reach ``virtual``; True if it was the
        station's link here (a newer attach may have replaced it)."""
        virtual.link.bound.discard(virtual)
        if self.state.edge.get(identity) is not virtual:
            return False
        del self.state.edge[identity]
        return True

    def answered(self, frame: OverlayFrame) -> bool:
        """An answer addressed to this node: the attach request it answers, if waiting.

        An answer that accepts the station registers its virtual link here and now, in the
        pass that read it: the far node started the session as it answered, and the
        backend's first CALL may be the next frame of the same read. It waits in the
        link's inbox until the station's session here starts reading."""
        pending = self._pending.pop(frame.id, None)
        if pending is None:
            return False
        virtual: VirtualLink | None = None
        chosen = frame.payload.get("subprotocol") if (
            frame.type == CALLRESULT and isinstance(frame.payload, dict)) else None
        if isinstance(chosen, str) and chosen in pending.offered:
            link, identity = pending.link, pending.identity
            origin = frame.path[0] if frame.path else link.peer_id
            virtual = VirtualLink(link, identity, ANYCAST_CSMS, (identity,), chosen, origin,
                                  self.flooded)
            link.bound.add(virtual)
            self.state.edge[identity] = virtual
        pending.channel.send_nowait((frame, virtual))
        return True

    def link_gone(self, link: PeerLink) -> None:
        """A peer link closed: the attach requests sent over it fail now (others wait on)."""
        for pending in list(self._pending.values()):
            if pending.link is link:
                pending.channel.close()

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

    def _refusal(self, station: str, requester: str, link: PeerLink) -> str | None:
        """Why ``requester`` (asking over ``link``) may not attach ``station``, or None.

        A peer can claim any station id, so a claim is believed only where it cannot
        take a station from someone else: the station is not connected here, no other
        link or node holds its session, and no route says it is at another node."""
        state = self.state
        if station in self.context.sessions.local:
            return "the station is connected to this node"
        held = state.held.get(station)
        if held is not None and (held.link is not link or held.origin != requester):
            return "the station is attached through another node"
        route = state.table.best(station)
        if route is not None and route.origin != requester:
            return "the station is connected at another node"
        return None

    async def _serve_inner(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        context, state = self.context, self.state
        requester = frame.path[1]
        backend = context.backend_for(station)
        assert backend is not None
        subprotocols = frame.payload.get("subprotocols")
        offered = [p for p in (subprotocols if isinstance(subprotocols, list) else [])
                   if isinstance(p, str) and p in context.subprotocols()]
        authorization = frame.payload.get("authorization")
        refusal = self._refusal(station, requester, link)
        try:
            if refusal is not None:
                state.count("refused")
                log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                          station=station, origin=requester, reason=refusal)
                raise DialFailed(409, refusal)
            if not offered:
                raise DialFailed(400, "no supported OCPP subprotocol offered")
            # an existing session is stopped only once its replacement is dialled
            authorization = authorization if isinstance(authorization, str) else None
            backend_ws, priority = await context.dial_backend(station, backend, offered,
                                                              authorization, None)
        except DialFailed as refused:
            await state.reply(link, OverlayFrame(
                CALLERROR, requester, (), frame.id, code="GenericError",
                description=refused.reason, details={"status": refused.status}))
            return
        await context.sessions.stop(station, "replaced by a new attach",
                                    context.settings().shutdown_timeout_s + 1, held=True)
        link_to_backend: WsLink | FailoverLink = backend_ws
        if backend.srv is not None:
            # an SRV backend: the station's link fails over and back like a local one's
            # (router/relay/failover.py), without the station at the far node noticing
            async def redial(better_than: int | None) -> tuple[WsLink, int]:
                return await context.dial_backend(station, backend, offered, authorization,
                                                  better_than)

            link_to_backend = FailoverLink(station, backend, backend_ws, priority, redial,
                                           lambda: context.settings().failover_grace_s)
        chosen = backend_ws.subprotocol or ""
        try:
            await state.reply(link, OverlayFrame(CALLRESULT, requester, (), frame.id,
                                                 payload={"subprotocol": chosen}))
            # origin: the node the station is connected to, the only one that may speak
            # for it (router/overlay/forwarding.py checks frames against it)
            virtual = VirtualLink(link, station, station, (), chosen, origin=requester,
                                  on_flood=self.flooded)
            link.bound.add(virtual)
            session = StationSession(context.session_deps, station,
                                     Version.from_subprotocol(chosen), virtual,
                                     link_to_backend, backend.name,
                                     backend_keeps_signatures=backend.keep_signatures,
                                     station_keeps_signatures=True,
                                     backend_unwraps_signed=unwraps_signed(
                                         backend.signed_messages, chosen))
            if isinstance(link_to_backend, FailoverLink):
                link_to_backend.on_lost = session.backend_lost
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
                if isinstance(link_to_backend, FailoverLink):
                    await link_to_backend.close_stream()  # whichever target it is on now
                else:
                    await trio.aclose_forcefully(backend_ws.stream)


def _http_status(details: Any) -> int:
    """The HTTP status a backend node gave for a refused attach, if it is one (else 502)."""
    status = details.get("status") if isinstance(details, dict) else None
    if type(status) is int and 400 <= status <= 599:
        return status
    return 502
