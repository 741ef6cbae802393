"""The overlay side of a node: peer links, route exchange, forwarding by destination.

A peer link carries overlay frames for many stations. Its reader dispatches each frame:
route announcements go to the link's exchange session (topology/), frames for this
node's stations or for its backends are handed to a :class:`VirtualLink`, and anything
else goes on along the best route. Station sessions run unchanged at both ends of the
overlay: at the edge the virtual link stands in for the backend WebSocket, at the node
with the backend it stands in for the station's. See docs/protocol.md.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from router.config import BackendEntry, PeerEntry, StationEntry
from router.logs import log_event
from router.net.dns import SrvUnavailable
from router.net.handshake import HandshakeFailed, Upgrade, dial
from router.net.wslink import LinkClosed, WsLink
from router.session import StationSession
from router.trust import load_trusted, route_signer, route_verifier
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    SEND,
    FrameError,
    Version,
    decode,
    encode_parts,
)
from router.wire.overlay_frames import (
    ANYCAST_CSMS,
    OverlayFrame,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)
from topology import (
    ACTION,
    AnnouncementRejected,
    CachedVerifier,
    ExchangeSession,
    PeerExpired,
    RouteTable,
)

if TYPE_CHECKING:
    from router.node import Node, Refused

log = logging.getLogger("router.mesh")

MODE_HEADER = "X-OCPP-NetworkingMode"
MODE_OVERLAY = "OverlayNetwork"
ENCODING_HEADER = "X-OCPP-Encoding"
NODE_ID_HEADER = "X-OCPP-NodeId"  # the acceptor's node id: an SRV name may lead to several
OVERLAY_SUBPROTOCOL = "ocpp2.1"
CONNECT = "OverlayStationConnect"
DISCONNECT = "OverlayStationDisconnect"
_BATCH = 256
_STATION_INBOX = 64
PEER_MAX_MESSAGE_BYTES = 16 * 2**20  # a full route sync travels in messages of 5,000 routes


def to_standard(frame: OverlayFrame) -> str:
    """The OCPP-J frame a standard peer sees for an overlay frame."""
    return encode_parts(frame.type, frame.id, action=frame.action, payload=frame.payload,
                        code=frame.code, description=frame.description, details=frame.details)


def from_standard(text: str, dest: str, path: tuple[str, ...]) -> OverlayFrame:
    """An overlay frame for a standard frame the session already checked."""
    f = decode(text, Version.V21)
    return OverlayFrame(f.type, dest, path, f.id, f.action, f.payload, f.code, f.description,
                        f.details)


class PeerLink:
    """One WebSocket to a neighbour node: a writer that batches, its exchange session."""

    def __init__(self, mesh: Mesh, peer_id: str, ws: WsLink, encoding: str) -> None:
        self.mesh = mesh
        self.peer_id = peer_id
        self.ws = ws
        self.encoding = encoding
        self._out_send, self._out_recv = trio.open_memory_channel[OverlayFrame](1024)
        self.bound: set[VirtualLink] = set()  # station sessions riding on this link
        self.exchange = ExchangeSession(
            mesh.node_id, peer_id, mesh.table, sign=mesh.sign, verify=mesh.verify,
            hold_time_s=mesh.hold_time_s, keepalive_s=mesh.keepalive_s,
        )
        self.closed = False

    async def send(self, frame: OverlayFrame) -> None:
        """Queue one frame for the writer (waits while the queue is full: backpressure)."""
        if self.closed:
            raise LinkClosed(1001, "peer link closed")
        try:
            await self._out_send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed(1001, "peer link closed") from None

    def send_nowait(self, frame: OverlayFrame) -> bool:
        """Queue a frame if there is room now; False when the queue is full."""
        if self.closed:
            raise LinkClosed(1001, "peer link closed")
        try:
            self._out_send.send_nowait(frame)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LinkClosed(1001, "peer link closed") from None
        return True

    async def run(self) -> None:
        """Read, write and exchange routes until the link closes; then clean up."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, nursery.cancel_scope)
                nursery.start_soon(self._exchange, nursery.cancel_scope)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self.closed = True
            self._out_send.close()
            with trio.CancelScope(shield=True):
                await self.mesh.link_gone(self)
                with trio.move_on_after(2):
                    await self.ws.aclose(1001, "peer link closed")

    async def _reader(self) -> None:
        mesh = self.mesh
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            try:
                message = await self.ws.get_message()
            except LinkClosed:
                return
            try:
                if isinstance(message, str):
                    frames = [decode_json(message)]
                elif self.encoding == "msgpack":
                    frames = decode_msgpack(message)
                else:
                    await self.ws.aclose(1003, "binary message on a JSON overlay link")
                    return
            except FrameError as err:
                mesh.count("bad_frames")
                log_event(log, logging.WARNING, "overlay_frame_error", peer=self.peer_id,
                          reason=err.description)
                continue
            for frame in frames:
                if debug:
                    log_event(log, logging.DEBUG, "overlay_frame", peer=self.peer_id,
                              type=frame.type, dest=frame.dest, path=list(frame.path),
                              id=frame.id, action=frame.action)
                # the path is extended with whom we authenticated, never what was claimed
                await mesh.dispatch(self, frame.passed(self.peer_id))

    async def _writer(self, scope: trio.CancelScope) -> None:
        try:
            async for first in self._out_recv:
                frames = [first]
                while len(frames) < _BATCH:
                    try:
                        frames.append(self._out_recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                if self.encoding == "msgpack":
                    await self.ws.send_bytes(encode_msgpack(frames))
                else:
                    for frame in frames:
                        await self.ws.send_message(encode_json(frame))
        except LinkClosed:
            pass
        finally:
            scope.cancel()

    async def _exchange(self, scope: trio.CancelScope) -> None:
        exchange, mesh = self.exchange, self.mesh
        try:
            for payload in exchange.link_up(trio.current_time()):
                await self.send(self._topology_frame(payload))
            while True:
                deadline = exchange.next_deadline()
                changed = mesh.changed
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await changed.wait()
                payloads = exchange.tick(trio.current_time())
                for payload in payloads:
                    await self.send(self._topology_frame(payload))
                if mesh.handle_events(self, exchange.take_events()):
                    return  # the hold timer expired
        except LinkClosed:
            pass
        finally:
            scope.cancel()

    def _topology_frame(self, payload: dict[str, Any]) -> OverlayFrame:
        return OverlayFrame(SEND, self.peer_id, (), uuid.uuid4().hex[:20], ACTION, payload)


class VirtualLink:
    """One station's side of a session carried over a peer link (see StationSession).

    At the edge it stands in for the backend WebSocket (frames go to ``"CSMS"``); at the
    node with the backend it stands in for the station's (frames go to the station id).
    """

    def __init__(self, mesh: Mesh, link: PeerLink, station: str, dest: str,
                 path: tuple[str, ...], subprotocol: str, origin: str | None = None) -> None:
        self.mesh = mesh
        # at the edge: the node holding the backend session; frames for the station must
        # start there (path[0]), so no other node can speak to the station as its CSMS
        self.origin = origin
        self.link = link
        self.station = station
        self.dest = dest
        self.path = path
        self.subprotocol: str | None = subprotocol
        self._send, self._recv = trio.open_memory_channel[str](_STATION_INBOX)
        self._closed: int | None = None
        self._reason = ""

    @property
    def closed(self) -> int | None:
        return self._closed

    def deliver(self, text: str) -> None:
        """A frame for this session arrived over the overlay."""
        if self._closed is not None:
            return
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            # a well-behaved peer has one CALL in flight per direction: this is a flood
            self.mesh.count("flooded")
            self.end(1008, "too many frames queued for this station")

    def end(self, code: int, reason: str) -> None:
        """The other end went away (or the peer link did): the session sees a close."""
        if self._closed is None:
            self._closed, self._reason = code, reason
            self._send.close()

    async def get_message(self) -> str:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LinkClosed(self._closed or 1001, self._reason) from None

    async def send_message(self, message: str) -> None:
        if self._closed is not None:
            raise LinkClosed(self._closed, self._reason)
        frame = from_standard(message, self.dest, self.path)
        if not self.link.send_nowait(frame):  # no checkpoint when there is room: batches form
            await self.link.send(frame)

    async def aclose(self, code: int = 1000, reason: str = "", wait_s: float = 2.0) -> None:
        if self._closed is not None:
            return
        self.end(code, reason)
        # tell the other end (best effort: the peer link may be gone already)
        notice = OverlayFrame(SEND, self.dest, self.path, uuid.uuid4().hex[:20], DISCONNECT,
                              {"code": code, "reason": reason[:120]})
        with trio.move_on_after(wait_s):
            with contextlib.suppress(LinkClosed):
                await self.link.send(notice)


class Mesh:
    """The node's overlay: its peer links, route table and virtual station links."""

    def __init__(self, node: Node) -> None:
        config = node.config
        self.node = node
        self.node_id = config.node.id
        self.table = RouteTable(self.node_id, rng=random.Random(),
                                first_sequence=int(time.time() * 1000))
        self.sign = route_signer(node.gate.node_key) if node.gate.node_key else None
        self.verify = (CachedVerifier(route_verifier(load_trusted(config.trust)))
                       if config.trust is not None else None)
        self.hold_time_s = 90.0
        self.keepalive_s = 30.0
        self.links: dict[str, PeerLink] = {}
        self.edge: dict[str, VirtualLink] = {}  # our stations' backend sides, by station
        self.remote: dict[str, tuple[VirtualLink, StationSession]] = {}  # by station
        self.counters: dict[str, int] = {}
        self._pending: dict[str, trio.MemorySendChannel[OverlayFrame]] = {}
        self.changed = trio.Event()
        self.table.originate(self.node_id)
        if any(b.role == "primary" for b in config.backends):
            self.table.originate(ANYCAST_CSMS)
        self._nursery: trio.Nursery | None = None

    @property
    def active(self) -> bool:
        """Whether this node takes part in an overlay at all."""
        return bool(self.node.config.peers) or bool(self.links)

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    def wake(self) -> None:
        """The table changed: every exchange session re-checks what to send."""
        self.changed.set()
        self.changed = trio.Event()

    # --- links --------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Dial every configured peer, for as long as the node runs."""
        self._nursery = nursery
        for entry in self.node.config.peers:
            nursery.start_soon(self._keep_dialling, entry)

    async def _keep_dialling(self, entry: PeerEntry) -> None:
        backoff = 0.5
        while True:
            headers = {MODE_HEADER: MODE_OVERLAY}
            if entry.encoding == "msgpack":
                headers[ENCODING_HEADER] = "msgpack"
            if entry.password is not None:
                token = base64.b64encode(f"{self.node_id}:{entry.password}".encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            ws = None
            for url in await self._peer_urls(entry):
                try:
                    with trio.fail_after(self.node.config.node.connect_timeout_s):
                        address = await self.node.address_of(urlsplit(url).hostname or "")
                        ws = await dial(url, [OVERLAY_SUBPROTOCOL], headers,
                                        PEER_MAX_MESSAGE_BYTES,
                                        keep_headers=(ENCODING_HEADER, NODE_ID_HEADER),
                                        connect_host=address)
                    break
                except (HandshakeFailed, OSError, trio.TooSlowError,
                        trio.BrokenResourceError) as exc:
                    log_event(log, logging.WARNING, "peer_dial_failed", peer=entry.id, url=url,
                              reason=repr(exc))
            if ws is not None:
                backoff = 0.5
                encoding = "msgpack" if ws.headers.get(ENCODING_HEADER) == "msgpack" else "json"
                # the node we reached says who it is (several nodes may stand behind one
                # SRV name); without the header, the configured id
                peer_id = ws.headers.get(NODE_ID_HEADER) or entry.id
                if peer_id == self.node_id or not 0 < len(peer_id) <= 48:
                    await ws.aclose(1008, "a peer cannot have this node's id")
                    peer_id = ""
                try:
                    if peer_id:
                        await self._serve_link(peer_id, ws, encoding, "out")
                except Exception:
                    # a bug must cost this link (it is redialled), never the node
                    log.exception("peer link failed", extra={"fields": {"peer": entry.id}})
            await trio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 30.0)

    async def _peer_urls(self, entry: PeerEntry) -> list[str]:
        """Where to dial a peer: its url, or its SRV targets in RFC 2782 order."""
        if entry.srv is None:
            return [f"{entry.url.rstrip('/')}/{self.node_id}"]
        try:
            targets = await self.node.srv.targets(entry.srv)
        except SrvUnavailable as exc:
            log_event(log, logging.WARNING, "peer_dial_failed", peer=entry.id, srv=entry.srv,
                      reason=exc.reason)
            return []
        return [f"{entry.scheme}://{t.host}:{t.port}{entry.path}/{self.node_id}"
                for t in targets]

    async def accept_peer(self, upgrade: Upgrade, peer_id: str) -> None:
        """A node authenticated as ``peer_id`` asked for an overlay link on our listener."""
        encoding = "msgpack" if upgrade.header(ENCODING_HEADER) == "msgpack" else "json"
        offered = upgrade.offered_subprotocols()
        upgrade.allow_messages_up_to(PEER_MAX_MESSAGE_BYTES)
        ws = await upgrade.accept(OVERLAY_SUBPROTOCOL if OVERLAY_SUBPROTOCOL in offered else None,
                                  {ENCODING_HEADER: encoding, NODE_ID_HEADER: self.node_id})
        await self._serve_link(peer_id, ws, encoding, "in")

    async def _serve_link(self, peer_id: str, ws: WsLink, encoding: str, direction: str) -> None:
        older = self.links.get(peer_id)
        if older is not None:
            await older.ws.aclose(1001, "replaced by a new link")
        link = PeerLink(self, peer_id, ws, encoding)
        self.links[peer_id] = link
        log_event(log, logging.INFO, "peer_connected", peer=peer_id, encoding=encoding,
                  direction=direction)
        try:
            await link.run()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws.stream)

    async def link_gone(self, link: PeerLink) -> None:
        """A peer link closed: withdraw its routes at once, end the sessions riding on it."""
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
        self.handle_events(link, link.exchange.link_down(trio.current_time()))
        link.exchange.close()
        for virtual in list(link.bound):
            virtual.end(1001, f"peer link to {link.peer_id} closed")
        for channel in list(self._pending.values()):
            channel.close()
        self.wake()
        log_event(log, logging.INFO, "peer_disconnected", peer=link.peer_id,
                  reason="link closed")

    def handle_events(self, link: PeerLink, events: list[Any]) -> bool:
        """Log and count exchange events; True when the peer's hold timer expired."""
        expired = False
        for event in events:
            if isinstance(event, AnnouncementRejected):
                self.count("announcements_rejected")
                log_event(log, logging.WARNING, "announcement_rejected", peer=event.peer,
                          reason=event.reason)
            elif isinstance(event, PeerExpired):
                expired = True
                log_event(log, logging.WARNING, "peer_expired", peer=event.peer)
            else:
                destinations = sorted(getattr(event, "destinations", ()))
                log_event(log, logging.INFO, "routes_changed", peer=link.peer_id,
                          count=len(destinations), destinations=destinations[:20])
        if events:
            self.wake()
        return expired

    # --- forwarding ---------------------------------------------------------------------

    async def dispatch(self, link: PeerLink, frame: OverlayFrame) -> None:
        """Deliver or forward one frame that arrived on ``link``."""
        dest = frame.dest
        if frame.type == SEND and frame.action == ACTION:
            if dest == self.node_id:
                self.handle_events(link, link.exchange.receive(frame.payload,
                                                               trio.current_time()))
            return
        if not self._plausible(link, frame):
            self.count("refused")
            log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                      station=frame.path[0], path=list(frame.path), dest=dest,
                      reason="claimed path is not possible through this peer")
            if frame.type == CALL:
                await self._answer_error(frame, "SecurityError",
                                         "claimed path is not possible through this link", link)
            return
        if dest == self.node_id:
            pending = self._pending.pop(frame.id, None)
            if pending is not None:
                pending.send_nowait(frame)
            else:
                self.count("dropped")
            return
        station = frame.path[0] if frame.path else ""
        if dest == ANYCAST_CSMS and self._serves(station):
            await self._for_backend(link, frame, station)
            return
        edge = self.edge.get(dest)
        if edge is not None:
            if edge.link is not link or not frame.path or frame.path[0] != edge.origin:
                # only the node holding the station's backend session may speak to it,
                # and only over the link the station attached through
                self.count("refused")
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
                edge.deliver(to_standard(frame))
            return
        await self.forward(frame)

    def _plausible(self, link: PeerLink, frame: OverlayFrame) -> bool:
        """Whether the path a neighbour claims could have reached us through it.

        A claimed path never contains this node (that would be a loop or a forgery), and
        the node it starts from must be reachable through this neighbour: the neighbour
        itself, or a node our routes reach via it. For frames to ``"CSMS"`` the station's
        own route may still be on its way, so the edge node (``path[1]``) is checked; the
        backend node further checks that the station is attached through this link.
        """
        path = frame.path  # already extended with link.peer_id
        if self.node_id in path:
            return False
        if len(path) < 2:
            return True
        claimed = path[1] if frame.dest == ANYCAST_CSMS or frame.action == CONNECT else path[0]
        if claimed == link.peer_id:
            return True
        return any(route.peer == link.peer_id for route in self.table.candidates(claimed))

    def _serves(self, station: str) -> bool:
        return self._backend_for(station) is not None

    def _backend_for(self, station: str) -> BackendEntry | None:
        config = self.node.config
        entry = config.station_entry(station) or StationEntry(match="*")
        return config.primary_for(station, entry)

    async def forward(self, frame: OverlayFrame) -> None:
        """Send a frame on along the best route to its destination."""
        route = self.table.best(frame.dest)
        link = self.links.get(route.peer) if route is not None and route.peer else None
        if link is None or link.peer_id in frame.path:
            self.count("no_route")
            log_event(log, logging.INFO, "overlay_no_route", dest=frame.dest, id=frame.id)
            if frame.type == CALL and frame.path:
                await self._answer_error(frame, "InternalError", f"no route to {frame.dest}")
            return
        try:
            if not link.send_nowait(frame):
                await link.send(frame)
        except LinkClosed:
            self.count("no_route")

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
            await self._reply(link, error)
        else:
            await self.forward(error)

    async def _for_backend(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        """A frame for the backend of ``station``, which this node holds."""
        if frame.type == CALL and frame.action == CONNECT:
            if len(frame.path) < 2:
                self.count("refused")
                return
            assert self._nursery is not None
            self._nursery.start_soon(self._serve_attach, link, frame, station)
            return
        held = self.remote.get(station)
        if held is not None and held[0].link is not link:
            # a peer may only speak for the stations attached through it
            self.count("refused")
            log_event(log, logging.WARNING, "overlay_refused", peer=link.peer_id,
                      station=station, reason="station is not attached through this peer")
            if frame.type == CALL:
                await self._answer_error(frame, "SecurityError",
                                         "station is not attached through this link", link)
            return
        if frame.type == SEND and frame.action == DISCONNECT:
            if held is not None:
                held[0].end(int(frame.payload.get("code", 1001)), "station link closed")
            return
        if held is None:
            self.count("no_session")
            if frame.type == CALL:
                await self._answer_error(frame, "InternalError",
                                         "no session for this station here; reconnect")
            notice = OverlayFrame(SEND, station, (), uuid.uuid4().hex[:20], DISCONNECT,
                                  {"code": 1001, "reason": "no session"})
            await self.forward(notice)
            return
        held[0].deliver(to_standard(frame))

    # --- station attach: the edge side --------------------------------------------------

    async def attach_station(
        self, upgrade: Upgrade, identity: str, offered: list[str],
        refuse: Callable[[Refused], Any],
    ) -> tuple[WsLink, VirtualLink] | None:
        """Ask the node holding the backend for a link; accept the station with its choice."""
        from router.node import Refused

        route = self.table.best(ANYCAST_CSMS)
        link = self.links.get(route.peer) if route is not None and route.peer else None
        if link is None:
            await refuse(Refused(502, "no route to a backend"))
            return None
        message_id = uuid.uuid4().hex[:20]
        payload: dict[str, Any] = {"subprotocols": offered}
        authorization = upgrade.header("Authorization")
        if authorization is not None:
            payload["authorization"] = authorization
        answer_send, answer_recv = trio.open_memory_channel[OverlayFrame](1)
        self._pending[message_id] = answer_send
        try:
            with trio.fail_after(self.node.config.node.connect_timeout_s + 2):
                await link.send(OverlayFrame(CALL, ANYCAST_CSMS, (identity,), message_id,
                                             CONNECT, payload))
                answer = await answer_recv.receive()
        except (trio.TooSlowError, trio.EndOfChannel, LinkClosed):
            await refuse(Refused(504, "the backend node did not answer"))
            return None
        finally:
            self._pending.pop(message_id, None)
        chosen = answer.payload.get("subprotocol") if answer.type == CALLRESULT else None
        if chosen not in offered:
            status = (answer.details or {}).get("status", 502) if answer.details else 502
            await refuse(Refused(int(status) if isinstance(status, int) else 502,
                                 answer.description or "backend refused the station"))
            return None
        station_ws = await upgrade.accept(chosen)
        origin = answer.path[0] if answer.path else link.peer_id
        virtual = VirtualLink(self, link, identity, ANYCAST_CSMS, (identity,), chosen, origin)
        link.bound.add(virtual)
        self.edge[identity] = virtual
        self.table.originate(identity)
        self.wake()
        log_event(log, logging.INFO, "overlay_attach", station=identity, via=link.peer_id,
                  subprotocol=chosen)
        return station_ws, virtual

    def detach_station(self, identity: str, virtual: VirtualLink) -> None:
        """The station's session at the edge ended."""
        virtual.link.bound.discard(virtual)
        if self.edge.get(identity) is virtual:
            del self.edge[identity]
            self.table.withdraw_local(identity)
            self.wake()

    # --- station attach: the backend side -----------------------------------------------

    async def _serve_attach(self, link: PeerLink, frame: OverlayFrame, station: str) -> None:
        try:
            await self._serve_attach_inner(link, frame, station)
        except Exception:
            log.exception("overlay attach failed", extra={"fields": {"station": station}})

    async def _serve_attach_inner(self, link: PeerLink, frame: OverlayFrame,
                                  station: str) -> None:
        from router.node import Refused

        requester = frame.path[1]
        backend = self._backend_for(station)
        assert backend is not None
        offered = [p for p in frame.payload.get("subprotocols", []) if isinstance(p, str)
                   and p in self.node.config.listen.subprotocols]
        authorization = frame.payload.get("authorization")
        older = self.remote.pop(station, None)
        if older is not None:
            older[1].stop("replaced by a new attach")
            with trio.move_on_after(self.node.config.node.shutdown_timeout_s + 1):
                await older[1].done.wait()
        try:
            if not offered:
                raise Refused(400, "no supported OCPP subprotocol offered")
            backend_ws, _ = await self.node.dial_backend(
                station, backend, offered,
                authorization if isinstance(authorization, str) else None)
        except Refused as refused:
            await self._reply(link, OverlayFrame(
                CALLERROR, requester, (), frame.id, code="GenericError",
                description=refused.reason, details={"status": refused.status}))
            return
        chosen = backend_ws.subprotocol or ""
        try:
            await self._reply(link, OverlayFrame(CALLRESULT, requester, (), frame.id,
                                                 payload={"subprotocol": chosen}))
            virtual = VirtualLink(self, link, station, station, (), chosen)
            link.bound.add(virtual)
            session = StationSession(self.node, station, Version.from_subprotocol(chosen),
                                     virtual, backend_ws, backend.name,
                                     backend_keeps_signatures=backend.keep_signatures,
                                     station_keeps_signatures=True)
            self.remote[station] = (virtual, session)
            log_event(log, logging.INFO, "overlay_station", station=station,
                      via=link.peer_id, backend=backend.name, subprotocol=chosen)
            try:
                await session.run()
            finally:
                link.bound.discard(virtual)
                if self.remote.get(station, (None, None))[1] is session:
                    del self.remote[station]
                session.done.set()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(backend_ws.stream)

    async def _reply(self, link: PeerLink, frame: OverlayFrame) -> None:
        """Answers to an attach go back on the link the request came by."""
        try:
            await link.send(frame)
        except LinkClosed:
            self.count("no_route")

    async def stop_all(self) -> None:
        """Shutdown: end the sessions this node holds for stations on other nodes."""
        for _, session in list(self.remote.values()):
            session.stop("node shutting down")
        with trio.move_on_after(self.node.config.node.shutdown_timeout_s + 1):
            for _, session in list(self.remote.values()):
                await session.done.wait()
