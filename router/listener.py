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
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import trio

from router.backends.dialer import BackendDialer
from router.config import MAX_ID, BackendEntry, Config, StationEntry
from router.logs import log_event
from router.net.handshake import DialFailed, HandshakeFailed, Upgrade, read_upgrade
from router.net.tls import common_name
from router.overlay.mesh import MODE_HEADER, MODE_OVERLAY, Overlay
from router.passwords import VerifiedCache, verify_password
from router.relay.failover import FailoverLink
from router.relay.registry import SessionRegistry
from router.relay.session import SessionDeps, StationSession
from router.stats import Stats
from router.wire.frames import Version

log = logging.getLogger("router.node")


class Refused(Exception):
    """A station's upgrade is refused with this HTTP status."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


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
                 session_deps: SessionDeps, dialer: BackendDialer, overlay: Overlay) -> None:
        self._config = config
        self.stats = stats
        self.sessions = sessions
        self.session_deps = session_deps
        self.dialer = dialer
        self.overlay = overlay
        self._claims: dict[str, trio.CancelScope] = {}
        self._verified = VerifiedCache()
        self.scope = trio.CancelScope()  # cancelled when the node stops accepting
        self.port = 0

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
            await self._handle_stream(stream)
        except Exception as exc:
            log.exception("connection handler failed", extra={"fields": {"error": repr(exc)}})
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        listen = self._config().listen
        peer_cert = None
        remote = _remote(stream)
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
                upgrade = await read_upgrade(stream, listen.max_message_bytes)
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
            entry = await self._authenticate(config, identity, upgrade, peer_cert)
            if upgrade.header(MODE_HEADER) == MODE_OVERLAY:
                peer = True
            else:
                peer = False
                offered = [p for p in upgrade.offered_subprotocols()
                           if p in config.listen.subprotocols]
                if not offered:
                    raise Refused(400, "no supported OCPP subprotocol offered (supported: "
                                  + ", ".join(config.listen.subprotocols) + ")")
                backend = config.primary_for(identity, entry)
                if backend is None and not self.overlay.active:
                    raise Refused(403, "no primary backend serves this station")
        except HandshakeFailed as exc:
            await self._refuse(upgrade, identity, remote, Refused(exc.status or 400, exc.reason))
            return
        except Refused as refused:
            await self._refuse(upgrade, identity, remote, refused)
            return
        if peer:
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
                            peer_cert: Any) -> StationEntry:
        profile = config.listen.security_profile
        entry = config.station_entry(identity)
        if entry is None:
            if profile in (1, 2):
                raise Refused(401, "unknown station", _BASIC_CHALLENGE)
            raise Refused(403, "no [[stations]] entry matches this identity")
        if profile == 3:
            cn = common_name(peer_cert)
            if cn != identity:
                raise Refused(403, f"client certificate CN {cn!r} is not the station identity")
        if profile in (1, 2) or entry.password_hash is not None:
            creds = basic_credentials(upgrade.header("Authorization"))
            if creds is None:
                raise Refused(401, "Basic credentials required", _BASIC_CHALLENGE)
            user, password = creds
            if user != identity or entry.password_hash is None:
                raise Refused(401, "wrong credentials", _BASIC_CHALLENGE)
            if not await self._password_ok(password, entry.password_hash):
                raise Refused(401, "wrong credentials", _BASIC_CHALLENGE)
        return entry

    async def _password_ok(self, password: str, encoded: str) -> bool:
        if self._verified.hit(password, encoded):
            return True
        # scrypt takes tens of milliseconds: keep it off the event loop
        ok = await trio.to_thread.run_sync(verify_password, password, encoded)
        if ok:
            self._verified.add(password, encoded)
        return ok

    async def _refuse(
        self, upgrade: Upgrade, identity: str | None, remote: str, refused: Refused
    ) -> None:
        self.stats.stations_rejected += 1
        log_event(log, logging.INFO, "station_rejected", station=identity, status=refused.status,
                  reason=refused.reason, remote=remote)
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
        if chosen not in offered:
            log_event(log, logging.WARNING, "backend_failed", station=identity,
                      backend=backend.name, reason=f"backend chose subprotocol {chosen!r}")
            await backend_ws.aclose(1002, "no subprotocol agreed")
            await self._refuse(upgrade, identity, remote,
                               Refused(502, "backend chose no subprotocol"))
            return
        try:
            station_ws = await upgrade.accept(chosen)
        except (HandshakeFailed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log_event(log, logging.INFO, "station_rejected", station=identity, status=400,
                      reason=str(exc), remote=remote)
            await backend_ws.aclose(1001, "station went away during the handshake")
            return
        session = StationSession(
            self.session_deps, identity, Version.from_subprotocol(chosen), station_ws,
            backend_ws, backend.name, station_keeps_signatures=entry.keep_signatures,
            backend_keeps_signatures=backend.keep_signatures,
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
        self.stats.stations_connected += 1
        log_event(log, logging.INFO, "station_connected", station=identity,
                  subprotocol=session.version.value, backend=session.backend_name, remote=remote)
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
