"""The node, the composition root: it builds the parts, wires them, runs them, reloads
their configuration and shuts them down. Nothing else holds the parts together; each
part gets what it uses (see docs/architecture.md for the layers).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any

import trio

from router.backends.dialer import BackendDialer
from router.backends.duplication import DuplicationContext, Duplicator
from router.backends.failback import fail_back
from router.channels.service import ChannelService
from router.config import (
    BackendEntry,
    Config,
    ConfigError,
    DialSettings,
    ListenSection,
    NodeSection,
    StationEntry,
)
from router.config import load as load_config
from router.gcwatch import GcHousekeeper, GcWatch
from router.listener import StationListener
from router.logs import log_event
from router.net.dns import DnsCache
from router.net.keepalive import Keepalive
from router.net.tls import TlsContexts
from router.net.wslink import WsLink
from router.overlay.attach import AttachContext
from router.overlay.mesh import Overlay, OverlayConfig
from router.overlay.trust import TrustError
from router.relay.forwarding import SessionDeps
from router.relay.gate import Gate, GateError
from router.relay.registry import SessionRegistry
from router.relay.timer import CallTimer
from router.stats import Stats

log = logging.getLogger("router.node")


class Node:
    """One router node: its listener, sessions, backends, overlay and admin endpoint."""

    def __init__(self, config: Config, *, keep_gc: bool = False) -> None:
        """``keep_gc``: run the GC housekeeper (router/gcwatch.py), which freezes objects
        process-wide; the command line turns it on, a node embedded in a test or another
        program leaves the process's collector alone."""
        self.config = config
        self.stats = Stats()
        self.gc = GcWatch()
        self.gc_keeper = GcHousekeeper() if keep_gc else None
        self.gate = Gate.from_config(config)  # raises GateError / PolicyError: config mistakes
        self.sessions = SessionRegistry()
        self.timer = CallTimer(config.node.call_timeout_s)
        self.session_deps = SessionDeps(config.node, self.gate, self.stats, self.timer)
        if self.gc_keeper is not None:
            self.session_deps.step = self.gc_keeper.step
        self.dns = DnsCache(config.dns.nameservers or None,
                            ttl_floor_s=config.dns.ttl_floor_s,
                            ttl_ceiling_s=config.dns.ttl_ceiling_s,
                            timeout_s=config.dns.timeout_s)
        self.tls = TlsContexts(config)  # raises ssl.SSLError / OSError: unusable PEM files
        self.dialer = BackendDialer(self.dns, self._settings, config.listen.max_message_bytes,
                                    self._client_tls)
        self.duplicator = Duplicator(
            [b for b in config.backends if b.role == "secondary"],
            DuplicationContext(config.node.state_dir, self._settings,
                               config.listen.max_message_bytes, self.sessions,
                               self._client_tls))
        if self.duplicator.active:
            self.session_deps.duplicate = self.duplicator.offer
        self.overlay = Overlay(
            OverlayConfig(config.node.id, config.peers,
                          any(b.role == "primary" for b in config.backends),
                          self.gate.node_key, config.trust,
                          lambda: self.config.node.connect_timeout_s, self._client_tls),
            self.dns,
            AttachContext(self._settings, lambda: self.config.listen.subprotocols,
                          self._backend_for, self._dial_backend, self.sessions,
                          self.session_deps, self._station_keepalive))
        self.channels = ChannelService(self.overlay.state, lambda: self.gate, config.tunnels,
                                       lambda: self.config.channels)
        self.overlay.forwarder.channels = self.channels.handle
        self.listener = StationListener(lambda: self.config, self.stats, self.sessions,
                                        self.session_deps, self.dialer, self.overlay,
                                        lambda: self.tls.server)
        self._nursery: trio.Nursery | None = None

    # --- what the parts are given ---------------------------------------------------------

    def _settings(self) -> NodeSection:
        return self.config.node

    def _client_tls(self, dialing: DialSettings) -> ssl.SSLContext:
        return self.tls.client(dialing)

    def _station_keepalive(self) -> Keepalive | None:
        return Keepalive.of(self.config.listen)

    def _backend_for(self, station: str) -> BackendEntry | None:
        config = self.config
        entry = config.station_entry(station) or StationEntry(match="*")
        return config.primary_for(station, entry)

    async def _dial_backend(self, station: str, backend: BackendEntry, offered: list[str],
                            authorization: str | None,
                            better_than: int | None) -> tuple[WsLink, int]:
        return await self.dialer.dial(station, backend, offered, authorization,
                                      better_than=better_than)

    # --- what the admin endpoint reads ----------------------------------------------------

    @property
    def port(self) -> int:
        """The station listener's port, once bound (0 before)."""
        return self.listener.port

    def listener_problem(self) -> str | None:
        """Why stations cannot connect now, or None."""
        return self.listener.problem()

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``nursery.start(node.run)`` returns once bound."""
        listen = self.config.listen
        # TLS is wrapped per connection by the listener, with the context of the last
        # (re)load, where a failed handshake can be logged
        listeners: list[Any] = list(await trio.open_tcp_listeners(listen.port, host=listen.host))
        self.listener.port = listeners[0].socket.getsockname()[1]
        try:
            with self.gc:
                await self._serve(listeners, task_status)
        finally:
            self.duplicator.close()
            self.gate.close()

    async def _serve(self, listeners: list[Any], task_status: trio.TaskStatus[Node]) -> None:
        listen = self.config.listen
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.dns.run)
            nursery.start_soon(self.timer.run, nursery)
            if self.gc_keeper is not None:
                nursery.start_soon(self._keep_gc, self.gc_keeper)
            await self.overlay.run(nursery)
            await nursery.start(self.channels.run)
            nursery.start_soon(self.duplicator.run)
            if any(b.srv for b in self.config.backends):
                nursery.start_soon(fail_back, self.sessions, self.dialer,
                                   max(self.config.dns.ttl_floor_s, 1.0))
            nursery.start_soon(self.listener.serve, listeners, nursery)
            log_event(log, logging.INFO, "listening", host=listen.host, port=self.port,
                      path=listen.path, tls=self.tls.server is not None,
                      security_profile=listen.security_profile, node=self.config.node.id)
            task_status.started(self)

    async def _keep_gc(self, keeper: GcHousekeeper) -> None:
        """Once a second: freeze the young, end a burst's hold, sweep after churn
        (router/gcwatch.py)."""
        sessions = self.sessions
        with keeper:
            while True:
                await trio.sleep(1.0)
                keeper.tick(trio.current_time(), sessions.started, len(sessions))

    def reload(self) -> tuple[bool, str]:
        """Re-read the config file and its policy; keep the old ones if either is invalid.

        Station credentials, timeouts, the policy and secondaries' subscriptions take
        effect at once; certificates and keys (both sides), compression and pings serve
        the next connection; connected stations stay connected. Other listener and peer
        changes need a restart, and say so.
        """
        from policies import PolicyError

        if self.config.source is None:
            return False, "the config was not read from a file"
        try:
            config = load_config(self.config.source)
            gate = Gate.from_config(config)
            # certificates and keys are read again: a rotated file serves new connections
            tls = TlsContexts(config)
            if config.listen.security_profile != self.config.listen.security_profile:
                # TLS on or off, client certificates or not: a restart decides that, so
                # the listener keeps speaking as it did (reported below)
                tls.server = self.tls.server
            rekey = (config.trust, config.node.key) != (self.config.trust, self.config.node.key)
            if rekey:
                # checked now, applied below: a bad key file keeps the old config
                self.overlay.check_trust(config.trust)
        except (ConfigError, PolicyError, GateError, TrustError, ssl.SSLError, OSError) as exc:
            reason = str(exc).replace("\n", "; ")
            log_event(log, logging.ERROR, "reload_refused", reason=reason,
                      file=str(self.config.source))
            return False, reason
        needs_restart = [name for name, old, new in (
            ("listen", _restart_part(self.config.listen), _restart_part(config.listen)),
            ("peers", self.config.peers, config.peers),
            ("dns", self.config.dns, config.dns),
            ("tunnels", self.config.tunnels, config.tunnels),
            ("node.id", self.config.node.id, config.node.id),
        ) if old != new]
        old_names = {b.name for b in self.config.backends if b.role == "secondary"}
        new_names = {b.name for b in config.backends if b.role == "secondary"}
        if old_names != new_names:
            needs_restart.append("secondary backends added or removed")
        for old_entry in self.config.backends:
            new_entry = config.backend_entry(old_entry.name)
            if (old_entry.role == "secondary" and new_entry is not None
                    and _bounds(old_entry) != _bounds(new_entry)):
                needs_restart.append(f"queue or outbox bounds of {old_entry.name}")
        self.duplicator.reconfigure(config.backends)
        old_config = self.config
        gate.recent.extend(self.gate.recent)  # the admin's recent refusals survive a reload
        old_gate, self.gate, self.config, self.tls = self.gate, gate, config, tls
        deps = self.session_deps
        deps.gate, deps.settings = gate, config.node
        self.timer.timeout_s = config.node.call_timeout_s
        old_gate.close()
        if rekey:
            self.overlay.rekey(gate.node_key, config.trust)
        del old_config
        log_event(log, logging.INFO, "reloaded", file=str(config.source),
                  policy=str(config.policy.file) if config.policy else None,
                  needs_restart=needs_restart, route_keys_changed=rekey)
        return True, "reloaded" + (f"; restart needed for: {', '.join(needs_restart)}"
                                    if needs_restart else "")

    async def shutdown(self) -> None:
        """Stop accepting, wind every session down (CALLs answered, close frames), then stop."""
        log_event(log, logging.INFO, "shutdown", stations=len(self.sessions.local))
        self.listener.scope.cancel()
        wait_s = self.config.node.shutdown_timeout_s + 1
        await self.sessions.stop_all("node shutting down", wait_s, held=False)
        await self.sessions.stop_all("node shutting down", wait_s, held=True)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


def _restart_part(listen: ListenSection) -> ListenSection:
    """The ``[listen]`` settings a reload cannot change: certificates, compression and
    pings apply to the next connection, so they are left out of the comparison."""
    return dataclasses.replace(listen, tls_cert=None, tls_key=None, tls_ca=None,
                               compression="deflate", ping_interval_s=0.0, ping_timeout_s=30.0)


def _bounds(entry: BackendEntry) -> tuple[int, int, int, float]:
    """What a secondary's queue and outbox were made with (a reload does not remake them)."""
    return entry.queue, entry.outbox_max_rows, entry.outbox_max_bytes, entry.outbox_max_age_s
