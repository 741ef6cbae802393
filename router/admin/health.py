"""``/healthz``: whether the node can serve stations now, with the reason when not."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from router.admin.view import NodeView
from router.config import BackendEntry
from router.net.dns import SrvUnavailable
from router.wire.overlay_frames import ANYCAST_CSMS

PROBE_TIMEOUT_S = 0.5  # one TCP connect to a backend target, for /healthz
HEALTH_TTL_S = 1.0  # a probed verdict is reused this long: scrapes never hammer a backend


@dataclass(frozen=True, slots=True)
class Health:
    """The verdict of ``/healthz``: healthy, or the reason it is not."""

    ok: bool
    reason: str = ""


class HealthCheck:
    """Whether the node can serve stations: its listener is up and a backend is reachable.

    An open backend link is proof enough. Without one, every primary backend is probed
    with a TCP connect (targets in SRV order, ``PROBE_TIMEOUT_S`` each), and the verdict
    is kept for ``HEALTH_TTL_S`` so that frequent checks cost a backend nothing. A node
    without primaries (chained) is healthy while a connected peer offers a route to
    ``"CSMS"``.
    """

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self._cached: tuple[float, Health] | None = None
        self._lock = trio.Lock()

    async def check(self) -> Health:
        problem = listener_problem(self.node)
        if problem is not None:
            return Health(False, problem)
        if any(s.backend.ws.closed is None for s in self.node.sessions.all()):
            return Health(True)
        async with self._lock:  # concurrent checks share one probe
            cached = self._cached
            if cached is not None and cached[0] > trio.current_time():
                return cached[1]
            health = await self._probe()
            self._cached = (trio.current_time() + HEALTH_TTL_S, health)
            return health

    async def _probe(self) -> Health:
        config = self.node.config
        primaries = [b for b in config.backends if b.role == "primary"]
        if primaries:
            problems: dict[str, str | None] = {}

            async def probe(backend: BackendEntry) -> None:
                problems[backend.name] = await self._probe_backend(backend)

            async with trio.open_nursery() as nursery:
                for backend in primaries:
                    nursery.start_soon(probe, backend)
            if any(problem is None for problem in problems.values()):
                return Health(True)
            return Health(False, "no backend reachable: " + "; ".join(
                f"{b.name}: {problems[b.name]}" for b in primaries))
        overlay = self.node.overlay
        if config.peers or overlay.links:
            if overlay.state.link_toward(ANYCAST_CSMS) is not None:
                return Health(True)
            return Health(False, "no backend reachable: no connected peer offers a route "
                                 f"to {ANYCAST_CSMS}")
        return Health(False, "no backend reachable: no primary backend and no peer configured")

    async def _probe_backend(self, backend: BackendEntry) -> str | None:
        """None when a target of the backend accepts a TCP connection, else why not."""
        if backend.srv is None:
            parts = urlsplit(backend.url)
            port = parts.port or (443 if parts.scheme == "wss" else 80)
            addresses = [(parts.hostname or "", port)]
        else:
            try:
                with trio.fail_after(self.node.config.dns.timeout_s + 0.5):
                    targets = await self.node.dns.targets(backend.srv)
            except SrvUnavailable as exc:
                return f"SRV {backend.srv}: {exc.reason}"
            except trio.TooSlowError:
                return f"SRV {backend.srv}: no DNS answer in time"
            addresses = [(t.host, t.port) for t in targets[:4]]
        problem = "no target"
        for host, port in addresses:
            with trio.move_on_after(PROBE_TIMEOUT_S):
                try:
                    connect_to = await self.node.dns.address(host) or host
                    stream = await trio.open_tcp_stream(connect_to, port)
                except OSError as exc:
                    problem = f"{host}:{port}: {_connect_error(exc)}"
                    continue
                await trio.aclose_forcefully(stream)
                return None
            problem = f"{host}:{port}: no answer within {PROBE_TIMEOUT_S:g} s"
        return problem


def _connect_error(exc: OSError) -> str:
    """The first underlying reason of a failed connect (trio groups one per address)."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if isinstance(cause, OSError):
        exc = cause
    return (exc.strerror or str(exc)).lower()


def listener_problem(node: NodeView) -> str | None:
    """Why the station listener is not accepting, or None while it is."""
    return node.listener_problem()
