"""TLS contexts for the station listener (security profiles 2 and 3)."""

from __future__ import annotations

import ssl
from typing import Any

from router.config import ListenSection


def server_context(listen: ListenSection) -> ssl.SSLContext | None:
    """The listener's TLS context, or None for profiles 0 and 1 (plain WebSocket)."""
    if listen.security_profile < 2:
        return None
    assert listen.tls_cert is not None and listen.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(listen.tls_cert), str(listen.tls_key))
    if listen.security_profile == 3:
        assert listen.tls_ca is not None
        ctx.load_verify_locations(str(listen.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_name(peer_cert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()`` form)."""
    if not peer_cert:
        return None
    for rdn in peer_cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
