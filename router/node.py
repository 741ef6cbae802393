"""The node: the station listener, the handshake (identity, auth, backend dial), and shutdown.

A station's upgrade is only accepted once the station has proven who it is and its
primary backend has accepted a WebSocket for it with a subprotocol the station offered;
until then the station gets an HTTP status, never a half-open link.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import ssl
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.nameserver
import trio

from router.admin import serve_admin
from router.config import MAX_ID, BackendEntry, Config, ConfigError, StationEntry
from router.config import load as load_config
from router.failover import FailoverLink
from router.fanout import Fanout
from router.logs import log_event
from router.mesh import MODE_HEADER, MODE_OVERLAY, Mesh
from router.net.dns import SrvResolver, SrvUnavailable
from router.net.handshake import HandshakeFailed, Upgrade, dial, read_upgrade
from router.net.tls import common_name, server_context
from router.net.wslink import WsLink
from router.passwords import VerifiedCache, verify_password
from router.relay.gate import Gate, GateError
from router.relay.timer import CallTimer
from router.session import StationSession
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


class Node:
    """One router node: owns the listener, the station sessions and the call timer."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self.timer = CallTimer(config.node.call_timeout_s)
        self.sessions: dict[str, StationSession] = {}
        self._claims: dict[str, trio.CancelScope] = {}
        self._verified = VerifiedCache()
        self.gate = Gate.from_config(config)  # raises GateError / PolicyError: config mistakes
        self._addresses: dict[str, tuple[str, float]] = {}  # SRV target host -> (address, until)
        self._address_failures: dict[str, int] = {}
        self._refreshing: set[str] = set()
        self._address_resolver: dns.asyncresolver.Resolver | None = None
        self.srv = SrvResolver(config.dns.nameservers or None,
                               ttl_floor_s=config.dns.ttl_floor_s,
                               ttl_ceiling_s=config.dns.ttl_ceiling_s,
                               timeout_s=config.dns.timeout_s)
        self.mesh = Mesh(self)
        self.fanout = Fanout(self)
        self._listen_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.port = 0

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``nursery.start(node.run)`` returns once bound."""
        listen = self.config.listen
        ssl_context = server_context(listen)
        listeners: list[Any]
        if ssl_context is None:
            listeners = list(await trio.open_tcp_listeners(listen.port, host=listen.host))
        else:
            # the handshake is done per connection, where a failure can be logged
            tcp = await trio.open_tcp_listeners(listen.port, host=listen.host)
            listeners = [trio.SSLListener(t, ssl_context, https_compatible=True) for t in tcp]
        first = listeners[0]
        sock = first.transport_listener.socket if ssl_context else first.socket
        self.port = sock.getsockname()[1]
        try:
            await self._run_nursery(listeners, ssl_context, task_status)
        finally:
            self.fanout.close()
            self.gate.close()

    async def _run_nursery(self, listeners: list[Any], ssl_context: Any,
                           task_status: trio.TaskStatus[Node]) -> None:
        listen = self.config.listen
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.timer.run, nursery)
            await self.mesh.run(nursery)
            nursery.start_soon(self.fanout.run)
            if any(b.srv for b in self.config.backends):
                nursery.start_soon(self._failback)
            nursery.start_soon(self._serve, listeners, nursery)
            log_event(log, logging.INFO, "listening", host=listen.host, port=self.port,
                      path=listen.path, tls=ssl_context is not None,
                      security_profile=listen.security_profile, node=self.config.node.id)
            await nursery.start(serve_admin, self)  # [admin]: returns at once without it
            task_status.started(self)

    async def _serve(self, listeners: list[Any], nursery: trio.Nursery) -> None:
        with self._listen_scope:
            await trio.serve_listeners(self._handle_stream, listeners, handler_nursery=nursery)

    async def _failback(self) -> None:
        """Move idle station links back to a better SRV target once one accepts again."""
        period = max(self.config.dns.ttl_floor_s, 1.0)
        while True:
            await trio.sleep(period)
            best: dict[str, int] = {}
            gave_up: set[str] = set()
            for session in list(self.sessions.values()):
                link = session.backend.ws
                if not isinstance(link, FailoverLink) or link.moving or not session.idle():
                    continue
                name = link.backend.name
                if name in gave_up:
                    continue
                if name not in best:
                    try:
                        targets = await self.backend_targets(link.backend, "-")
                    except Refused:
                        gave_up.add(name)
                        continue
                    best[name] = min(priority for priority, _ in targets)
                if link.priority > best[name] and not await link.move_to_better():
                    gave_up.add(name)  # the better target does not answer yet

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and its policy; keep the old ones if either is invalid.

        Station credentials, timeouts, the policy and secondaries' subscriptions take
        effect at once; connected stations stay connected. Listener and peer changes
        need a restart, and say so.
        """
        from policies import PolicyError

        if self.config.source is None:
            return False, "the config was not read from a file"
        try:
            config = load_config(self.config.source)
            gate = Gate.from_config(config)
        except (ConfigError, PolicyError, GateError) as exc:
            reason = str(exc).replace("\n", "; ")
            log_event(log, logging.ERROR, "reload_refused", reason=reason,
                      file=str(self.config.source))
            return False, reason
        needs_restart = [name for name, old, new in (
            ("listen", self.config.listen, config.listen),
            ("peers", self.config.peers, config.peers),
            ("dns", self.config.dns, config.dns),
            ("node.id", self.config.node.id, config.node.id),
        ) if old != new]
        old_names = {b.name for b in self.config.backends if b.role == "secondary"}
        new_names = {b.name for b in config.backends if b.role == "secondary"}
        if old_names != new_names:
            needs_restart.append("secondary backends added or removed")
        for sub in self.fanout.subscribers:
            entry = next((b for b in config.backends if b.name == sub.name), None)
            if entry is not None:
                sub.entry = entry
        old_gate, self.gate, self.config = self.gate, gate, config
        old_gate.close()
        log_event(log, logging.INFO, "reloaded", file=str(config.source),
                  policy=str(config.policy.file) if config.policy else None,
                  needs_restart=needs_restart)
        return True, "reloaded" + (f"; restart needed for: {', '.join(needs_restart)}"
                                    if needs_restart else "")

    def session_for(self, station: str) -> StationSession | None:
        """The session of a station, connected here or attached through the overlay."""
        session = self.sessions.get(station)
        if session is None and station in self.mesh.remote:
            session = self.mesh.remote[station][1]
        return session

    async def shutdown(self) -> None:
        """Stop accepting, wind every session down (CALLs answered, close frames), then stop."""
        log_event(log, logging.INFO, "shutdown", stations=len(self.sessions))
        self._listen_scope.cancel()
        for session in list(self.sessions.values()):
            session.stop("node shutting down")
        with trio.move_on_after(self.config.node.shutdown_timeout_s + 1):
            for session in list(self.sessions.values()):
                await session.done.wait()
        await self.mesh.stop_all()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- one incoming connection ----------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        # serve_listeners lets a handler's exception end the whole server: never let one out
        try:
            await self._handle_stream_inner(stream)
        except Exception as exc:
            log.exception("connection handler failed", extra={"fields": {"error": repr(exc)}})
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle_stream_inner(self, stream: trio.abc.Stream) -> None:
        listen = self.config.listen
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
        identity = None
        try:
            identity = identity_from_path(upgrade.path, self.config.listen.path)
            upgrade.check()
            entry = await self._authenticate(identity, upgrade, peer_cert)
            if upgrade.header(MODE_HEADER) == MODE_OVERLAY:
                peer = True
            else:
                peer = False
                offered = [p for p in upgrade.offered_subprotocols()
                           if p in self.config.listen.subprotocols]
                if not offered:
                    raise Refused(400, "no supported OCPP subprotocol offered (supported: "
                                  + ", ".join(self.config.listen.subprotocols) + ")")
                backend = self.config.primary_for(identity, entry)
                if backend is None and not self.mesh.active:
                    raise Refused(403, "no primary backend serves this station")
        except HandshakeFailed as exc:
            await self._refuse(upgrade, identity, remote, Refused(exc.status or 400, exc.reason))
            return
        except Refused as refused:
            await self._refuse(upgrade, identity, remote, refused)
            return
        if peer:
            await self.mesh.accept_peer(upgrade, identity)
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

    async def _attach_over_overlay(
        self, upgrade: Upgrade, identity: str, entry: StationEntry, offered: list[str],
        claim: trio.CancelScope, remote: str,
    ) -> None:
        async def refuse(refused: Refused) -> None:
            await self._refuse(upgrade, identity, remote, refused)

        attached = await self.mesh.attach_station(upgrade, identity, offered, refuse)
        if attached is None:
            return
        station_ws, virtual = attached
        session = StationSession(
            self, identity, Version.from_subprotocol(virtual.subprotocol or ""), station_ws,
            virtual, f"overlay:{virtual.link.peer_id}",
            station_keeps_signatures=entry.keep_signatures, backend_keeps_signatures=True,
        )
        try:
            await self._run_session(identity, session, claim, remote)
        finally:
            self.mesh.detach_station(identity, virtual)

    async def _claim(self, identity: str) -> None:
        older = self._claims.get(identity)
        session = self.sessions.get(identity)
        if older is None and session is None:
            return
        self.stats.stations_replaced += 1
        log_event(log, logging.INFO, "station_replaced", station=identity)
        if older is not None:
            # still dialling its backend: it has nothing to answer, so just cancel it
            older.cancel()
        if session is not None:
            session.stop("replaced by a new connection")
            with trio.move_on_after(self.config.node.shutdown_timeout_s + 1):
                await session.done.wait()

    async def _authenticate(self, identity: str, upgrade: Upgrade, peer_cert: Any) -> StationEntry:
        profile = self.config.listen.security_profile
        entry = self.config.station_entry(identity)
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

    @staticmethod
    def backend_headers(authorization: str | None, identity: str,
                        backend: BackendEntry) -> dict[str, str]:
        """The Authorization header toward a backend, per its ``auth`` setting."""
        auth = backend.auth
        if auth.mode == "passthrough":
            return {"Authorization": authorization} if authorization is not None else {}
        if auth.mode == "password" and auth.password is not None:
            token = base64.b64encode(f"{identity}:{auth.password}".encode()).decode()
            return {"Authorization": f"Basic {token}"}
        return {}

    async def address_of(self, host: str) -> str | None:
        """An SRV target's address from the ``[dns]`` nameservers (None: use the system's).

        Only the first lookup of a host waits for DNS. After that the known address is
        used at once and, once its TTL has passed, refreshed by one background query, so
        a DNS outage neither delays stations nor floods the resolver; a failed refresh
        keeps the last good address and is retried with back-off.
        """
        if not self.config.dns.nameservers or dns.inet.is_address(host):
            return None
        cached = self._addresses.get(host)
        if cached is None:
            return await self._resolve_address(host)
        stale = cached[1] <= trio.current_time()
        if stale and host not in self._refreshing and self._nursery is not None:
            self._refreshing.add(host)
            self._nursery.start_soon(self._refresh_address, host)
        return cached[0]

    async def _refresh_address(self, host: str) -> None:
        try:
            await self._resolve_address(host)
        finally:
            self._refreshing.discard(host)

    async def _resolve_address(self, host: str) -> str | None:
        if self._address_resolver is None:
            self._address_resolver = dns.asyncresolver.Resolver(configure=False)
            self._address_resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address, port)
                for address, port in self.config.dns.nameservers]
        resolver = self._address_resolver
        cached = self._addresses.get(host)
        try:
            answer = await resolver.resolve(host, "A", lifetime=self.config.dns.timeout_s,
                                            backend=dns.asyncbackend.get_backend("trio"))
        except dns.exception.DNSException as exc:
            failures = self._address_failures.get(host, 0) + 1
            self._address_failures[host] = failures
            log_event(log, logging.WARNING, "srv_failed", name=host, reason=repr(exc),
                      using="last good address" if cached else "nothing")
            if cached is None:
                return None  # the system's resolver gets a try
            retry = min(60.0, 2.0 ** (failures - 1))
            self._addresses[host] = (cached[0], trio.current_time() + retry)
            return cached[0]
        self._address_failures.pop(host, None)
        address = str(next(iter(answer.rrset or ())))
        ttl = min(max(float(answer.rrset.ttl if answer.rrset else 0),
                      self.config.dns.ttl_floor_s), self.config.dns.ttl_ceiling_s)
        self._addresses[host] = (address, trio.current_time() + ttl)
        return address

    async def backend_targets(self, backend: BackendEntry, quoted: str) -> list[tuple[int, str]]:
        """(priority, URL) of each place a station's backend link may go, in the order to try."""
        if backend.srv is None:
            return [(0, backend.station_url(quoted))]
        try:
            targets = await self.srv.targets(backend.srv)
        except SrvUnavailable as exc:
            raise Refused(502, f"no backend target: {exc.reason}") from None
        for target in targets:
            # learn every target's address while DNS answers, not only the first one's:
            # a failover during a DNS outage needs the backup's
            if target.host not in self._addresses:
                await self.address_of(target.host)
        return [(t.priority, f"{backend.scheme}://{t.host}:{t.port}{backend.path}/{quoted}")
                for t in targets]

    async def dial_backend(
        self, identity: str, backend: BackendEntry, offered: list[str],
        authorization: str | None, *, better_than: int | None = None,
    ) -> tuple[WsLink, int]:
        """Open the station's backend link at the first target that accepts it.

        Returns the link and its target's priority; raises Refused with the status for the
        station. ``better_than`` limits the attempt to targets of a better priority.
        """
        targets = await self.backend_targets(backend, quote(identity, safe=""))
        if better_than is not None:
            targets = [t for t in targets if t[0] < better_than]
            if not targets:
                raise Refused(502, "no better target")
        headers = self.backend_headers(authorization, identity, backend)
        refusal = Refused(502, "backend unreachable")
        for priority, url in targets:
            try:
                with trio.fail_after(self.config.node.connect_timeout_s):
                    host = urlsplit(url).hostname or ""
                    ws = await dial(url, offered, headers, self.config.listen.max_message_bytes,
                                    connect_host=await self.address_of(host))
                return ws, priority
            except HandshakeFailed as exc:
                status = exc.status if exc.status is not None and 400 <= exc.status <= 599 else 502
                reason, refusal = exc.reason, Refused(status, "backend refused the station")
                if status < 500:
                    break  # an answer about the station (e.g. credentials): no other target
            except trio.TooSlowError:
                reason, refusal = "timeout", Refused(504, "backend did not answer in time")
            except (OSError, trio.BrokenResourceError) as exc:
                reason = repr(exc)
            log_event(log, logging.WARNING, "backend_failed", station=identity,
                      backend=backend.name, target=url.rsplit("/", 1)[0], reason=reason)
        raise refusal

    async def _connect(
        self, upgrade: Upgrade, identity: str, entry: StationEntry, backend: BackendEntry,
        offered: list[str], claim: trio.CancelScope, remote: str,
    ) -> None:
        authorization = upgrade.header("Authorization")
        try:
            backend_ws, priority = await self.dial_backend(identity, backend, offered,
                                                           authorization)
        except Refused as refused:
            await self._refuse(upgrade, identity, remote, refused)
            return
        link: WsLink | FailoverLink = backend_ws
        if backend.srv is not None:
            link = FailoverLink(self, identity, backend, offered, authorization, backend_ws,
                                priority)
        try:
            await self._bridge(upgrade, identity, entry, backend, offered, claim, remote, link)
        finally:
            with trio.CancelScope(shield=True):
                final = link.current if isinstance(link, FailoverLink) else link
                await trio.aclose_forcefully(final.stream)

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
            self, identity, Version.from_subprotocol(chosen), station_ws, backend_ws, backend.name,
            station_keeps_signatures=entry.keep_signatures,
            backend_keeps_signatures=backend.keep_signatures,
        )
        if isinstance(backend_ws, FailoverLink):
            backend_ws.session = session
        await self._run_session(identity, session, claim, remote)

    async def _run_session(
        self, identity: str, session: StationSession, claim: trio.CancelScope, remote: str
    ) -> None:
        if self._claims.get(identity) is claim:
            # connected: from now on a newer connection stops this one gracefully
            del self._claims[identity]
        self.sessions[identity] = session
        self.stats.stations_connected += 1
        log_event(log, logging.INFO, "station_connected", station=identity,
                  subprotocol=session.version.value, backend=session.backend_name, remote=remote)
        try:
            await session.run()
        finally:
            self.stats.stations_connected -= 1
            if self.sessions.get(identity) is session:
                del self.sessions[identity]
            session.done.set()


def _remote(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None) or getattr(
        getattr(stream, "transport_stream", None), "socket", None
    )
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"
