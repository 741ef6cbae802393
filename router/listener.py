"""The station listener: who is connecting, whether they may, and where they go.

Per connection: the TLS handshake (profiles 2 and 3), the WebSocket upgrade read but not
yet answered, the identity from the URL path, authentication (Basic auth against the
station's ``password_hash``, or the client certificate's CN), then one of three: an
overlay peer link, a backend link dialled for the station (the Local Controller rule),
or an attach through the overlay. A station's upgrade is only accepted once it has
proven who it is and its backend has accepted a WebSocket for it with a subprotocol the
station offered; until then the station gets an HTTP status, never a half-open link.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import logging
import math
import secrets
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import trio

from policies import RateLimiter
from router.backends.dialer import BackendDialer
from router.config import (
    MAX_ID,
    RESERVED_IDS,
    BackendEntry,
    Config,
    StationEntry,
    unwraps_signed,
)
from router.logs import log_event
from router.net.handshake import DialFailed, HandshakeFailed, Upgrade, read_upgrade
from router.net.keepalive import Keepalive
from router.net.tls import common_name
from router.net.wslink import close_stream
from router.overlay.mesh import MODE_HEADER, MODE_OVERLAY, Overlay
from router.passwords import VerifiedCache, hash_password, verify_password
from router.relay.failover import FailoverLink
from router.relay.forwarding import SessionDeps
from router.relay.registry import SessionRegistry
from router.relay.session import StationSession
from router.stats import Stats
from router.wire.frames import Version

log = logging.getLogger("router.node")


class Refused(Exception):
    """A station's upgrade is refused with this HTTP status; ``reason`` is the reply's
    text, ``detail`` (for the log only) what the station must not learn."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None,
                 detail: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.detail = detail


# set in each connection's task while it is still a handshake (see StationListener)
_HANDSHAKE: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("handshake")
SHED_RETRY_AFTER_S = 2
_SHED_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %d\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: 31\r\nConnection: close\r\n"
                  b"\r\ntoo many handshakes; try again\n")
AUTH_WINDOW_S = 60.0  # max_auth_failures counts per remote address over this window


_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="ocpp", charset="UTF-8"'}


def identity_from_path(target: str, base: str) -> str:
    """The station identity in ``<base>/<identity>``; raises Refused (404/400) otherwise."""
    path = target.split("?", 1)[0]
    prefix = base.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise Refused(404, f"path must be {prefix}<identity>")
    raw = path[len(prefix):]
    try:
        identity = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise Refused(400, "identity is not valid UTF-8") from None
    if not 1 <= len(identity) <= MAX_ID:
        raise Refused(400, f"identity must be 1-{MAX_ID} characters")
    if "/" in identity or not identity.isprintable() or identity.strip() != identity:
        raise Refused(400, "identity has a slash, a control character or surrounding space")
    if identity in (".", ".."):
        # it would be dialled as <url>/. or <url>/.. toward the backend
        raise Refused(400, "identity cannot be . or ..")
    return identity


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(username, password) from an ``Authorization: Basic`` header value, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class StationListener:
    """Accepts stations (and peers) on the node's port; ``config`` gives the live config."""

    def __init__(self, config: Callable[[], Config], stats: Stats, sessions: SessionRegistry,
                 session_deps: SessionDeps, dialer: BackendDialer, overlay: Overlay,
                 server_tls: Callable[[], ssl.SSLContext | None] = lambda: None) -> None:
        self._config = config
        # the listener's TLS context as of the last (re)load: a rotated certificate serves
        # the next connection; open links keep the one they shook hands with
        self._server_tls = server_tls
        self.stats = stats
        self.sessions = sessions
        self.session_deps = session_deps
        self.dialer = dialer
        self.overlay = overlay
        self._claims: dict[str, trio.CancelScope] = {}
        self._verified = VerifiedCache()
        self.scope = trio.CancelScope()  # cancelled when the node stops accepting
        self.port = 0
        self.handshakes = 0  # connections not yet running a session (or a peer link)
        self._last_shed_log = -math.inf
        # failed authentications per remote address: past the limit, no more scrypt runs
        self._failures: RateLimiter | None = None
        self._failures_limit = 0
        self._checking: dict[str, int] = {}  # password checks running, per remote address
        # one password check at a time: a flood of wrong passwords costs one core at most
        self._scrypt = trio.CapacityLimiter(1)
        # checked when the identity has no hash (unknown, or the wrong user name), so a
        # refusal takes as long as one for a known identity: no enumeration by timing;
        # made on first use (a node that never sees a wrong password never pays for it)
        self._decoy_hash: str | None = None

    async def serve(self, listeners: list[Any], nursery: trio.Nursery) -> None:
        """Accept connections until :attr:`scope` is cancelled; handlers run in ``nursery``."""
        with self.scope:
            await trio.serve_listeners(self.handle_stream, listeners, handler_nursery=nursery)

    def problem(self) -> str | None:
        """Why the listener is not accepting, or None while it is."""
        if not self.port:
            return "listener down: the station listener is not bound"
        if self.scope.cancel_called:
            return "listener down: the station listener is closed (node shutting down)"
        return None

    # --- one incoming connection ----------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection; nothing it does can end the listener."""
        # serve_listeners lets a handler's exception end the whole server: never let one out
        try:
            if self.handshakes >= self._config().listen.max_handshakes:
                await self._shed(stream)
                return
            self.handshakes += 1
            _HANDSHAKE.set([True])
            try:
                await self._handle_stream(stream)
            finally:
                self._handshake_over()
        except Exception as exc:
            log.exception("connection handler failed", extra={"fields": {"error": repr(exc)}})
        finally:
            await close_stream(stream)

    def _handshake_over(self) -> None:
        """This connection's handshake is over (a session or a peer link runs now, or it
        was refused): it no longer counts toward ``max_handshakes``."""
        flag = _HANDSHAKE.get(None)
        if flag is not None and flag[0]:
            flag[0] = False
            self.handshakes -= 1

    async def _shed(self, stream: trio.abc.Stream) -> None:
        """Too many handshakes at once: 503 with Retry-After, before reading anything
        (a TLS connection is closed instead: answering it would cost a TLS handshake)."""
        self.stats.handshakes_shed += 1
        now = trio.current_time()
        if now - self._last_shed_log >= 1.0:
            self._last_shed_log = now
            log_event(log, logging.WARNING, "handshakes_shed", in_progress=self.handshakes,
                      shed=self.stats.handshakes_shed, remote=_remote(stream))
        if self._server_tls() is not None:
            return
        with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError,
                                                        trio.ClosedResourceError):
            await stream.send_all(_SHED_RESPONSE % SHED_RETRY_AFTER_S)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        listen = self._config().listen
        peer_cert = None
        remote = _remote(stream)
        tls = self._server_tls()
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
        try:
            with trio.fail_after(listen.handshake_timeout_s):
                if isinstance(stream, trio.SSLStream):
                    try:
                        await stream.do_handshake()
                    except (trio.BrokenResourceError, ssl.SSLError) as exc:
                        self.stats.stations_rejected += 1
                        log_event(log, logging.INFO, "tls_failed", remote=remote, reason=repr(exc))
                        return
                    peer_cert = stream.getpeercert()
                upgrade = await read_upgrade(stream, listen.max_message_bytes,
                                             compression=listen.compression == "deflate")
        except trio.TooSlowError:
            log_event(log, logging.INFO, "handshake_timeout", remote=remote)
            return
        except (HandshakeFailed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log_event(log, logging.INFO, "station_rejected", station=None, status=400,
                      reason=str(exc), remote=remote)
            return
        await self._handle_upgrade(upgrade, peer_cert, remote)

    async def _handle_upgrade(self, upgrade: Upgrade, peer_cert: Any, remote: str) -> None:
        config = self._config()
        identity = None
        try:
            identity = identity_from_path(upgrade.path, config.listen.path)
            upgrade.check()
            peer = upgrade.header(MODE_HEADER) == MODE_OVERLAY
            if peer:
                # only a listed [[peers]] id, on its own entry's credentials
                await self._authenticate_peer(config, identity, upgrade, peer_cert, remote)
            else:
                entry = await self._authenticate(config, identity, upgrade, peer_cert, remote)
                offered = [p for p in upgrade.offered_subprotocols()
                           if p in config.listen.subprotocols]
                if not offered:
                    raise Refused(400, "no supported OCPP subprotocol offered (supported: "
                                  + ", ".join(config.listen.subprotocols) + ")")
                backend = config.primary_for(identity, entry)
                if backend is None and not self.overlay.active:
                    raise Refused(404, "no primary backend serves this station")
        except HandshakeFailed as exc:
            await self._refuse(upgrade, identity, remote, Refused(exc.status or 400, exc.reason))
            return
        except Refused as refused:
            await self._refuse(upgrade, identity, remote, refused)
            return
        if peer:
            self._handshake_over()
            await self.overlay.accept_peer(upgrade, identity)
            return
        # authenticated: this connection now replaces any older one for the identity
        await self._claim(identity)
        claim = trio.CancelScope()
        self._claims[identity] = claim
        try:
            with claim:
                if backend is None:
                    await self._attach_over_overlay(upgrade, identity, entry, offered, claim,
                                                    remote)
                else:
                    await self._connect(upgrade, identity, entry, backend, offered, claim,
                                        remote)
        finally:
            if self._claims.get(identity) is claim:
                del self._claims[identity]

    async def _claim(self, identity: str) -> None:
        older = self._claims.get(identity)
        if older is None and identity not in self.sessions.local:
            return
        self.stats.stations_replaced += 1
        log_event(log, logging.INFO, "station_replaced", station=identity)
        if older is not None:
            # still dialling its backend: it has nothing to answer, so just cancel it
            older.cancel()
        await self.sessions.stop(identity, "replaced by a new connection",
                                 self._config().node.shutdown_timeout_s + 1)

    async def _authenticate(self, config: Config, identity: str, upgrade: Upgrade,
                            peer_cert: Any, remote: str) -> StationEntry:
        profile = config.listen.security_profile
        if self._reserved(config, identity):
            # "CSMS", "*", this node's id, a peer's or another node's: a station by that
            # name would take frames addressed to the overlay itself
            raise Refused(403, "identity is reserved in the overlay (a node id, CSMS or *)")
        entry = config.station_entry(identity)
        if entry is None:
            if profile in (1, 2):
                # refused like a wrong password, as slowly: no telling who exists
                await self._check_password(upgrade, identity, None, remote)
            # Part 4 §3.3: an identity this node does not serve is "not found"
            raise Refused(404, "no [[stations]] entry matches this identity")
        if profile == 3:
            cn = common_name(peer_cert)
            if cn != identity:
                raise Refused(403, f"client certificate CN {cn!r} is not the station identity")
        if profile in (1, 2) or entry.password_hash is not None:
            await self._check_password(upgrade, identity, entry.password_hash, remote)
        return entry

    async def _authenticate_peer(self, config: Config, node_id: str, upgrade: Upgrade,
                                 peer_cert: Any, remote: str) -> None:
        """An overlay link is for listed peers only, on their own ``[[peers]]`` entry;
        a ``[[stations]]`` entry never authenticates a peer."""
        entry = config.peer_entry(node_id)
        if entry is None:
            raise Refused(403, "overlay links are only for nodes listed in [[peers]]")
        profile = config.listen.security_profile
        if profile == 3:
            cn = common_name(peer_cert)
            if cn != node_id:
                raise Refused(403, f"client certificate CN {cn!r} is not the peer's node id")
        if profile in (1, 2) or entry.password_hash is not None:
            await self._check_password(upgrade, node_id, entry.password_hash, remote)

    def _reserved(self, config: Config, identity: str) -> bool:
        return (identity in RESERVED_IDS or identity == config.node.id
                or config.peer_entry(identity) is not None
                or self.overlay.is_node(identity))

    async def _check_password(self, upgrade: Upgrade, identity: str,
                              password_hash: str | None, remote: str) -> None:
        """Basic credentials of ``identity`` against its entry's hash; Refused otherwise.

        Every refusal of a password costs one hash check, also for an identity without a
        hash or a wrong user name, so its timing tells nothing. Failures are counted per
        remote address; past ``max_auth_failures`` a minute the address gets 429 without
        any check, except for a password verified before (a station reconnecting).
        """
        creds = basic_credentials(upgrade.header("Authorization"))
        if creds is None:
            raise Refused(401, "Basic credentials required", _BASIC_CHALLENGE)
        user, password = creds
        own = password_hash if user == identity else None
        if own is not None and self._verified.hit(password, own):
            return
        address = remote.rsplit(":", 1)[0]
        failures = self._failure_limiter()
        # checks still running count as failures to come: a burst cannot queue up more
        # checks than the address may fail
        checking = self._checking.get(address, 0)
        if failures.tokens(address, trio.current_time()) < checking + 1:
            self.stats.auth_limited += 1
            raise Refused(429, "too many failed authentications; try again later",
                          {"Retry-After": str(int(AUTH_WINDOW_S))},
                          detail=f"more than {self._failures_limit} failed authentications "
                                 f"a minute from {address}")
        self._checking[address] = checking + 1
        try:
            if own is not None and await self._password_ok(password, own):
                return
            if own is None:
                if self._decoy_hash is None:
                    self._decoy_hash = await trio.to_thread.run_sync(
                        hash_password, secrets.token_urlsafe(16), limiter=self._scrypt)
                await self._password_ok(password, self._decoy_hash)  # the same time, no answer
        finally:
            left = self._checking[address] - 1
            if left:
                self._checking[address] = left
            else:
                del self._checking[address]
        failures.allow(address, trio.current_time(), record=True)
        raise Refused(401, "wrong credentials", _BASIC_CHALLENGE,
                      detail="unknown identity" if password_hash is None else
                      "wrong user name" if user != identity else "wrong password")

    def _failure_limiter(self) -> RateLimiter:
        limit = self._config().listen.max_auth_failures  # a reload may change it
        if self._failures is None or self._failures_limit != limit:
            self._failures = RateLimiter(limit, AUTH_WINDOW_S, max_sources=50_000)
            self._failures_limit = limit
        return self._failures

    async def _password_ok(self, password: str, encoded: str) -> bool:
        if self._verified.hit(password, encoded):
            return True
        # scrypt takes tens of milliseconds: off the event loop, one at a time
        ok = await trio.to_thread.run_sync(verify_password, password, encoded,
                                           limiter=self._scrypt)
        if ok:
            self._verified.fit(len(self._config().stations))  # a reload may add entries
            self._verified.add(password, encoded)
        return ok

    async def _refuse(
        self, upgrade: Upgrade, identity: str | None, remote: str, refused: Refused
    ) -> None:
        self.stats.stations_rejected += 1
        log_event(log, logging.INFO, "station_rejected", station=identity, status=refused.status,
                  reason=refused.detail or refused.reason, remote=remote)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await upgrade.reject(refused.status, refused.reason, refused.headers)

    # --- where the station goes -----------------------------------------------------------

    async def _attach_over_overlay(
        self, upgrade: Upgrade, identity: str, entry: StationEntry, offered: list[str],
        claim: trio.CancelScope, remote: str,
    ) -> None:
        try:
            station_ws, virtual = await self.overlay.attacher.attach(upgrade, identity, offered)
        except DialFailed as failed:
            await self._refuse(upgrade, identity, remote, Refused(failed.status, failed.reason))
            return
        session = StationSession(
            self.session_deps, identity, Version.from_subprotocol(virtual.subprotocol or ""),
            station_ws, virtual, f"overlay:{virtual.link.peer_id}",
            station_keeps_signatures=entry.keep_signatures, backend_keeps_signatures=True,
            station_unwraps_signed=unwraps_signed(entry.signed_messages,
                                                  virtual.subprotocol or ""),
        )
        try:
            await self._run_session(session, claim, remote)
        finally:
            self.overlay.attacher.detach(identity, virtual)

    async def _connect(
        self, upgrade: Upgrade, identity: str, entry: StationEntry, backend: BackendEntry,
        offered: list[str], claim: trio.CancelScope, remote: str,
    ) -> None:
        authorization = upgrade.header("Authorization")
        try:
            backend_ws, priority = await self.dialer.dial(identity, backend, offered,
                                                          authorization)
        except DialFailed as failed:
            await self._refuse(upgrade, identity, remote, Refused(failed.status, failed.reason))
            return
        if backend.srv is None:
            try:
                await self._bridge(upgrade, identity, entry, backend, offered, claim, remote,
                                   backend_ws)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(backend_ws.stream)
            return

        async def redial(better_than: int | None) -> tuple[Any, int]:
            return await self.dialer.dial(identity, backend, offered, authorization,
                                          better_than=better_than)

        link = FailoverLink(identity, backend, backend_ws, priority, redial,
                            lambda: self._config().node.failover_grace_s)
        try:
            await self._bridge(upgrade, identity, entry, backend, offered, claim, remote, link)
        finally:
            with trio.CancelScope(shield=True):
                await link.close_stream()

    async def _bridge(
        self, upgrade: Upgrade, identity: str, entry: StationEntry, backend: BackendEntry,
        offered: list[str], claim: trio.CancelScope, remote: str, backend_ws: Any,
    ) -> None:
        chosen = backend_ws.subprotocol
        # Part 4 §3.3: never accept the station on a subprotocol the CSMS did not agree
        # (None included: a CSMS that agrees none completes the handshake without one)
        if chosen not in offered:
            log_event(log, logging.WARNING, "backend_failed", station=identity,
                      backend=backend.name, reason=f"backend chose subprotocol {chosen!r}")
            await backend_ws.aclose(1002, "no subprotocol agreed")
            await self._refuse(upgrade, identity, remote,
                               Refused(502, "backend chose no subprotocol"))
            return
        try:
            listen = self._config().listen
            station_ws = await upgrade.accept(
                chosen, keepalive=Keepalive.of(listen))
        except (HandshakeFailed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log_event(log, logging.INFO, "station_rejected", station=identity, status=400,
                      reason=str(exc), remote=remote)
            await backend_ws.aclose(1001, "station went away during the handshake")
            return
        session = StationSession(
            self.session_deps, identity, Version.from_subprotocol(chosen), station_ws,
            backend_ws, backend.name, station_keeps_signatures=entry.keep_signatures,
            backend_keeps_signatures=backend.keep_signatures,
            station_unwraps_signed=unwraps_signed(entry.signed_messages, chosen),
            backend_unwraps_signed=unwraps_signed(backend.signed_messages, chosen),
        )
        if isinstance(backend_ws, FailoverLink):
            backend_ws.on_lost = session.backend_lost
        await self._run_session(session, claim, remote)

    async def _run_session(self, session: StationSession, claim: trio.CancelScope,
                           remote: str) -> None:
        identity = session.identity
        if self._claims.get(identity) is claim:
            # connected: from now on a newer connection stops this one gracefully
            del self._claims[identity]
        self._handshake_over()
        self.stats.stations_connected += 1
        log_event(log, logging.INFO, "station_connected", station=identity,
                  subprotocol=session.version.value, backend=session.backend_name, remote=remote,
                  station_compressed=session.station.ws.info().compressed,
                  backend_compressed=session.backend.ws.info().compressed)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.ended(session)
            self.stats.stations_connected -= 1


def _remote(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None
    )
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"
