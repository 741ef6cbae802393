"""TLS contexts: the listener's toward stations, and the node's own client contexts
toward backends and peers (security profiles 2 and 3).

OCPP 2.1 Part 4 §6.5 gives a Local Controller two identities: a CSMS certificate toward
stations (``[listen] tls_cert``) and a Charging Station certificate toward the CSMS
(``[[backends]] tls_cert``). Contexts are built when the config is loaded or reloaded, so
a rotated certificate serves the next connection while open links keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from router.config import Config, DialSettings, ListenSection
from router.config.load import no_key_password

# TLS 1.2 suites. OCPP 2.x Part 2 A00.FR.318 has a CSMS support the ECDHE-ECDSA and the
# RSA-key-exchange AES-GCM pairs, and A00.FR.319 a station one pair or the other, so all
# four are here (a station or CSMS that only has the RSA pair still connects); ECDHE-RSA
# (forward secrecy with an RSA certificate, which A00.FR.319 recommends over TLS_RSA) is
# preferred to them. TLS 1.3 suites are OpenSSL's (all AEAD) and not affected by this list.
OCPP_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
))


def server_context(listen: ListenSection) -> ssl.SSLContext | None:
    """The listener's TLS context, or None for profiles 0 and 1 (plain WebSocket)."""
    if listen.security_profile < 2:
        return None
    assert listen.tls_cert is not None and listen.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(OCPP_TLS12_CIPHERS)
    ctx.load_cert_chain(str(listen.tls_cert), str(listen.tls_key), password=no_key_password)
    if listen.security_profile == 3:
        assert listen.tls_ca is not None
        ctx.load_verify_locations(str(listen.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(dialing: DialSettings) -> ssl.SSLContext:
    """A client context that verifies the server against ``tls_ca`` (or the system store)
    and the host name, and presents the node's certificate when one is configured."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(dialing.tls_ca) if dialing.tls_ca is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(OCPP_TLS12_CIPHERS)
    if dialing.tls_cert is not None and dialing.tls_key is not None:
        ctx.load_cert_chain(str(dialing.tls_cert), str(dialing.tls_key), password=no_key_password)
    return ctx


TlsFor = Callable[[DialSettings], ssl.SSLContext]
"""The node's client TLS context for a backend's or peer's settings (rebuilt on reload)."""


class TlsContexts:
    """Every TLS context one config needs, built at once (a bad file fails here, not at
    the first dial); entries with the same files share a context."""

    def __init__(self, config: Config) -> None:
        self.server = server_context(config.listen)
        self._clients: dict[tuple[Any, ...], ssl.SSLContext] = {}
        for dialing in [b.dialing for b in config.backends] + [p.dialing for p in config.peers]:
            self.client(dialing)

    def client(self, dialing: DialSettings) -> ssl.SSLContext:
        """The client context for a backend's or peer's TLS settings."""
        key = (dialing.tls_ca, dialing.tls_cert, dialing.tls_key)
        ctx = self._clients.get(key)
        if ctx is None:
            ctx = self._clients[key] = client_context(dialing)
        return ctx


def tls_failure(exc: BaseException) -> str | None:
    """A readable TLS reason when ``exc`` is (or was caused by) an ssl.SSLError, else None."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            detail = getattr(seen, "verify_message", None) or seen.reason or str(seen)
            return f"TLS: {detail}"
        seen = seen.__cause__ or seen.__context__
    return None


def common_name(peer_cert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()`` form)."""
    if not peer_cert:
        return None
    for rdn in peer_cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
