"""The overlay side of a node: its peer links, route exchange, forwarding, attach.

:class:`Overlay` dials the configured peers (by URL or SRV, with back-off), accepts peers
on the node's listener, runs one :class:`~router.overlay.peer_link.PeerLink` per open
link, and hands what the links read to the route exchange (``NotifyNetworkTopology``)
or to forwarding. Station sessions run unchanged at both ends of the overlay, with a
virtual link standing in for the far side (router/overlay/attach.py).
"""

from __future__ import annotations

import base64
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from policies import SigningKey
from router.config import PeerEntry, TrustSection
from router.logs import log_event
from router.net.dns import DnsCache, SrvUnavailable
from router.net.handshake import HandshakeFailed, Upgrade, dial
from router.net.keepalive import Keepalive
from router.net.tls import TlsFor, tls_failure
from router.net.wslink import WsLink
from router.overlay.attach import AttachContext, Attacher
from router.overlay.forwarding import Forwarder
from router.overlay.peer_link import PeerLink
from router.overlay.state import OverlayState
from router.overlay.trust import load_trusted, route_signer, route_verifier
from router.wire.frames import SEND
from router.wire.overlay_frames import ANYCAST_CSMS, OverlayFrame
from topology import (
    ACTION,
    AnnouncementRejected,
    CachedVerifier,
    ExchangeSession,
    PeerExpired,
    RouteTable,
)

log = logging.getLogger("router.mesh")

MODE_HEADER = "X-OCPP-NetworkingMode"
MODE_OVERLAY = "OverlayNetwork"
ENCODING_HEADER = "X-OCPP-Encoding"
NODE_ID_HEADER = "X-OCPP-NodeId"  # the acceptor's node id: an SRV name may lead to several
OVERLAY_SUBPROTOCOL = "ocpp2.1"
PEER_MAX_MESSAGE_BYTES = 16 * 2**20  # a full route sync travels in messages of 5,000 routes
HOLD_TIME_S = 90.0
KEEPALIVE_S = 30.0
REPLACE_WAIT_S = 3.0  # for an older link to the same peer to finish closing


@dataclass(frozen=True, slots=True)
class OverlayConfig:
    """What the overlay is given at start (a change to any of it needs a restart)."""

    node_id: str
    peers: tuple[PeerEntry, ...]
    originates_csms: bool  # this node has a primary backend
    node_key: SigningKey | None  # signs this node's route claims
    trust: TrustSection | None  # whose route claims are believed
    connect_timeout_s: Callable[[], float]
    tls: TlsFor  # the client TLS context of a peer entry's settings (rebuilt on reload)


class Overlay:
    """The node's overlay: peer links, route table, forwarding and station attach."""

    def __init__(self, config: OverlayConfig, dns: DnsCache, attach: AttachContext) -> None:
        self.config = config
        self.node_id = config.node_id
        self._dns = dns
        self.state = OverlayState(
            config.node_id,
            RouteTable(config.node_id, rng=random.Random(),
                       first_sequence=int(time.time() * 1000)))
        self._sign = route_signer(config.node_key) if config.node_key else None
        self._verify = (CachedVerifier(route_verifier(load_trusted(config.trust)))
                        if config.trust is not None else None)
        self.attacher = Attacher(self.state, attach)
        self.forwarder = Forwarder(self.state, attach.backend_for, self.attacher)
        self.state.table.originate(self.node_id)
        if config.originates_csms:
            self.state.table.originate(ANYCAST_CSMS)

    @staticmethod
    def check_trust(trust: TrustSection | None) -> None:
        """Raise TrustError if a ``[trust]`` key cannot be loaded."""
        if trust is not None:
            load_trusted(trust)

    def rekey(self, node_key: SigningKey | None, trust: TrustSection | None) -> None:
        """New route-signing key or trusted keys (a reload): every peer link starts over,
        so the routes held are checked, and ours signed, with the new ones. Dialled peers
        are dialled again at once; accepted ones dial us again. Raises what loading the
        trusted keys raises (the caller keeps the old keys then)."""
        verify = (CachedVerifier(route_verifier(load_trusted(trust)))
                  if trust is not None else None)
        self._sign = route_signer(node_key) if node_key else None
        self._verify = verify
        for link in list(self.state.links.values()):
            link.stop("route keys changed; link again")
        log_event(log, logging.WARNING, "peer_links_rekeyed", links=len(self.state.links),
                  trusted=len(trust.nodes) if trust is not None else 0,
                  signing=node_key is not None)

    @property
    def table(self) -> RouteTable:
        return self.state.table

    @property
    def links(self) -> dict[str, PeerLink]:
        return self.state.links

    @property
    def counters(self) -> dict[str, int]:
        return self.state.counters

    @property
    def changed(self) -> trio.Event:
        return self.state.changed

    @property
    def active(self) -> bool:
        """Whether this node takes part in an overlay at all."""
        return bool(self.config.peers) or bool(self.state.links)

    def count(self, what: str) -> None:
        self.state.count(what)

    # --- links --------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery) -> None:
        """Dial every configured peer, for as long as the node runs."""
        self.attacher.start(nursery)
        if self.config.peers and self.config.trust is None:
            # the documented default, said once: what unsigned mode does not protect
            log_event(log, logging.WARNING, "routes_unsigned",
                      reason="no [trust]: route claims cannot be checked against their "
                             "origin; only implausible ones are refused (docs/protocol.md)")
        for entry in self.config.peers:
            if entry.dialled:  # an accept-only entry waits for the peer to dial us
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
                    with trio.fail_after(self.config.connect_timeout_s()):
                        address = await self._dns.address(urlsplit(url).hostname or "")
                        dialing = entry.dialing
                        ws = await dial(url, [OVERLAY_SUBPROTOCOL], headers,
                                        PEER_MAX_MESSAGE_BYTES,
                                        ssl_context=self.config.tls(dialing),
                                        keep_headers=(ENCODING_HEADER, NODE_ID_HEADER),
                                        connect_host=address,
                                        dialing=dialing)
                    break
                except (HandshakeFailed, OSError, trio.TooSlowError,
                        trio.BrokenResourceError) as exc:
                    log_event(log, logging.WARNING, "peer_dial_failed", peer=entry.id, url=url,
                              reason=tls_failure(exc) or repr(exc))
            if ws is not None:
                backoff = 0.5
                encoding = "msgpack" if ws.headers.get(ENCODING_HEADER) == "msgpack" else "json"
                # the node we reached may say who it is (several nodes may stand behind
                # one SRV name), but only as one of the ids its entry allows
                peer_id = ws.headers.get(NODE_ID_HEADER) or entry.id
                if not entry.answers_as(peer_id):
                    log_event(log, logging.WARNING, "peer_dial_failed", peer=entry.id,
                              url=url, reason=f"the node there calls itself {peer_id[:60]!r}, "
                              "which this [[peers]] entry does not allow")
                    await ws.aclose(1008, "unexpected node id")
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
            targets = await self._dns.targets(entry.srv)
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
        entry = next((p for p in self.config.peers if p.id == peer_id), None)
        ws = await upgrade.accept(OVERLAY_SUBPROTOCOL if OVERLAY_SUBPROTOCOL in offered else None,
                                  {ENCODING_HEADER: encoding, NODE_ID_HEADER: self.node_id},
                                  keepalive=Keepalive.of(entry.dialing) if entry is not None
                                  else None)
        await self._serve_link(peer_id, ws, encoding, "in")

    async def _serve_link(self, peer_id: str, ws: WsLink, encoding: str, direction: str) -> None:
        older = self.state.links.get(peer_id)
        if older is not None:
            # the older link's own task closes it (its reader may be waiting on the
            # socket); a half-dead connection is given up after a short wait
            older.stop("replaced by a new link")
            with trio.move_on_after(REPLACE_WAIT_S):
                await older.finished.wait()
        link = PeerLink(self, peer_id, ws, encoding, self.new_exchange(peer_id))
        self.state.links[peer_id] = link
        log_event(log, logging.INFO, "peer_connected", peer=peer_id, encoding=encoding,
                  direction=direction, compressed=ws.compressed)
        try:
            await link.run()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(ws.stream)

    def is_node(self, identity: str) -> bool:
        """Whether ``identity`` names a node of the overlay (a node's own route says so)."""
        return identity == self.node_id or any(
            route.origin == identity for route in self.state.table.candidates(identity))

    def new_exchange(self, peer_id: str) -> ExchangeSession:
        """The route-exchange session for a new link to ``peer_id``."""
        return ExchangeSession(self.node_id, peer_id, self.state.table, sign=self._sign,
                               verify=self._verify, hold_time_s=HOLD_TIME_S,
                               keepalive_s=KEEPALIVE_S)

    async def link_gone(self, link: PeerLink) -> None:
        """A peer link closed: withdraw its routes at once, end the sessions riding on it."""
        state = self.state
        current = state.links.get(link.peer_id)
        if current is link:
            del state.links[link.peer_id]
            self.handle_events(link, link.exchange.link_down(trio.current_time()))
        # else a newer link to the same peer holds its routes now: leave them
        link.exchange.close()
        for virtual in list(link.bound):
            virtual.end(1001, f"peer link to {link.peer_id} closed")
        self.attacher.link_gone(link)
        state.wake()
        log_event(log, logging.INFO, "peer_disconnected", peer=link.peer_id,
                  reason="link closed")

    def handle_events(self, link: PeerLink, events: list[Any]) -> bool:
        """Log and count exchange events; True when the peer's hold timer expired."""
        expired = False
        for event in events:
            if isinstance(event, AnnouncementRejected):
                self.state.count("announcements_rejected")
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
            self.state.wake()
        return expired

    async def dispatch(self, link: PeerLink, frame: OverlayFrame) -> None:
        """One frame a peer link read: a route message for us, or one to forward."""
        if frame.type == SEND and frame.action == ACTION:
            if frame.dest == self.node_id:
                self.handle_events(link, link.exchange.receive(frame.payload,
                                                               trio.current_time()))
            return
        await self.forwarder.route(link, frame)

