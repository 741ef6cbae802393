"""Opening a station's link to its primary backend, the OCPP Local Controller way.

The node dials the backend *as the station*: the station's identity in the URL path,
the subprotocols the station offered, and the Authorization header per the backend's
``auth`` setting, so a standard CSMS cannot tell a node is in between. A backend given by
an SRV name is tried target by target in RFC 2782 order.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import trio

from router.config import BackendEntry, NodeSection
from router.logs import log_event
from router.net.dns import DnsCache, SrvUnavailable
from router.net.handshake import DialFailed, HandshakeFailed, dial
from router.net.tls import TlsFor, tls_failure
from router.net.wslink import WsLink

log = logging.getLogger("router.node")


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


class BackendDialer:
    """Dials stations' backend links; ``settings`` gives the live ``[node]`` section and
    ``tls`` the client TLS context of a backend's current settings."""

    def __init__(self, dns: DnsCache, settings: Callable[[], NodeSection],
                 max_message_bytes: int, tls: TlsFor) -> None:
        self.dns = dns
        self._settings = settings
        self._tls = tls
        self.max_message_bytes = max_message_bytes

    async def targets(self, backend: BackendEntry, quoted: str) -> list[tuple[int, str]]:
        """(priority, URL) of each place a station's backend link may go, in the order to
        try; raises DialFailed (502) when an SRV name has no usable answer."""
        if backend.srv is None:
            return [(0, backend.station_url(quoted))]
        try:
            targets = await self.dns.targets(backend.srv)
        except SrvUnavailable as exc:
            raise DialFailed(502, f"no backend target: {exc.reason}") from None
        for target in targets:
            # learn every target's address while DNS answers, not only the first one's:
            # a failover during a DNS outage needs the backup's
            if not self.dns.knows_address(target.host):
                await self.dns.address(target.host)
        return [(t.priority, f"{backend.scheme}://{t.host}:{t.port}{backend.path}/{quoted}")
                for t in targets]

    async def dial(
        self, identity: str, backend: BackendEntry, offered: list[str],
        authorization: str | None, *, better_than: int | None = None,
    ) -> tuple[WsLink, int]:
        """Open the station's backend link at the first target that accepts it.

        Returns the link and its target's priority; raises DialFailed with the status for
        the station. ``better_than`` limits the attempt to targets of a better priority.
        """
        targets = await self.targets(backend, quote(identity, safe=""))
        if better_than is not None:
            targets = [t for t in targets if t[0] < better_than]
            if not targets:
                raise DialFailed(502, "no better target")
        headers = backend_headers(authorization, identity, backend)
        failure = DialFailed(502, "backend unreachable")
        dialing = backend.dialing
        for priority, url in targets:
            try:
                with trio.fail_after(self._settings().connect_timeout_s):
                    host = urlsplit(url).hostname or ""
                    ws = await dial(url, offered, headers, self.max_message_bytes,
                                    ssl_context=self._tls(dialing),
                                    connect_host=await self.dns.address(host),
                                    dialing=dialing)
                return ws, priority
            except HandshakeFailed as exc:
                status = exc.status if exc.status is not None and 400 <= exc.status <= 599 else 502
                reason, failure = exc.reason, DialFailed(status, "backend refused the station")
                if status < 500:
                    break  # an answer about the station (e.g. credentials): no other target
            except trio.TooSlowError:
                reason, failure = "timeout", DialFailed(504, "backend did not answer in time")
            except (OSError, trio.BrokenResourceError) as exc:
                # a TLS refusal (server certificate, or ours refused) says so in the log
                reason = tls_failure(exc) or repr(exc)
                if reason.startswith("TLS"):
                    failure = DialFailed(502, "backend TLS handshake failed")
            log_event(log, logging.WARNING, "backend_failed", station=identity,
                      backend=backend.name, target=url.rsplit("/", 1)[0], reason=reason)
        raise failure
