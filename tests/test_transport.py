"""The transport duties of a Local Controller (OCPP 2.1 Part 4), end to end: per-hop
permessage-deflate (§3.4), the node's own TLS client certificate and private CA toward
the CSMS (§6.5), keepalive pings (§5.3 and the close rule of §6.3), and the handshake
rules of §3.3.

Real parts only: the node as a subprocess, the ``ocpp``-package CSMS (websockets server,
optionally wss:// requiring client certificates) and ``ocpp`` stations, a PKI made here.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from router.config import ConfigError, DialSettings, parse
from router.net.tls import OCPP_TLS12_CIPHERS, client_context
from router.passwords import hash_password
from tests.certs import Pki, make_pki
from tests.nodeproc import NodeProcess, start_node
from tests.overlay_support import PeerLink, overlay_config, routes_to, wait_log
from tests.peers import edge_config, node_env
from tests.peers.ocpp_csms import Csms, identity_time
from tests.peers.ocpp_station import handshake_status, open_raw, open_station

STEP = 15.0


def _boot(url: str, identity: str, **kwargs: object) -> str | None:
    """Boot a 1.6 station through the node; the Sec-WebSocket-Extensions it was given."""

    async def scenario() -> str | None:
        async with open_station(url, "1.6", identity=identity, **kwargs) as station:  # type: ignore[arg-type]
            boot = await station.boot()
            assert boot.current_time == identity_time(identity)
            return station.ws.response.headers.get("Sec-WebSocket-Extensions")  # type: ignore[no-any-return]

    return asyncio.run(scenario())


def _node(config: str, directory: Path) -> NodeProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return start_node(config, directory, env=node_env())


# --- §3.4 compression, hop by hop ---------------------------------------------------------


@pytest.fixture(scope="module")
def csms() -> Iterator[Csms]:
    with Csms() as server:
        yield server


@pytest.fixture(scope="module")
def plain_csms() -> Iterator[Csms]:
    """A CSMS that refuses compression."""
    with Csms(compression=None) as server:
        yield server


def test_deflate_is_agreed_on_both_hops(csms: Csms, tmp_path: Path) -> None:
    node = _node(edge_config(csms.url), tmp_path)
    try:
        agreed = _boot(node.url("DEF-1"), "DEF-1")
        # the node, as the station's server, imposes no context takeover both ways
        assert agreed is not None and agreed.startswith("permessage-deflate")
        assert "server_no_context_takeover" in agreed and "client_no_context_takeover" in agreed
        [record] = csms.connections("DEF-1")
        offer = {k.lower(): v for k, v in record.headers.items()}["sec-websocket-extensions"]
        assert offer.startswith("permessage-deflate")
        assert record.extensions is not None and "permessage-deflate" in record.extensions
        event = node.wait_for_event("station_connected", station="DEF-1")
        assert event["station_compressed"] is True and event["backend_compressed"] is True
    finally:
        node.stop()


def test_each_hop_negotiates_on_its_own(csms: Csms, plain_csms: Csms, tmp_path: Path) -> None:
    node = _node(edge_config(csms.url), tmp_path / "a")
    try:
        # a station that offers nothing still gets a compressed backend hop
        assert _boot(node.url("DEF-2"), "DEF-2", compression=None) is None
        assert "permessage-deflate" in (csms.connections("DEF-2")[0].extensions or "")
    finally:
        node.stop()
    node = _node(edge_config(plain_csms.url), tmp_path / "b")
    try:
        # a CSMS that refuses the offer is used uncompressed; the station hop stays compressed
        assert "permessage-deflate" in (_boot(node.url("DEF-3"), "DEF-3") or "")
        assert plain_csms.connections("DEF-3")[0].extensions is None
        event = node.wait_for_event("station_connected", station="DEF-3")
        assert event["station_compressed"] is True and event["backend_compressed"] is False
    finally:
        node.stop()


def test_a_deflate_bomb_closes_only_its_link_with_1009(csms: Csms, tmp_path: Path) -> None:
    """10 MB of JSON whitespace deflates to a few KiB; the node inflates no further than
    max_message_bytes and closes that link with 1009. Another station keeps working."""
    node = _node(edge_config(csms.url), tmp_path)

    async def scenario() -> int | None:
        async with open_station(node.url("BOMB-OK"), "1.6", identity="BOMB-OK") as other:
            await other.boot()
            async with open_raw(node.url("BOMB-1"), ("ocpp1.6",), identity="BOMB-1") as ws:
                bomb = '[2,"b1","Heartbeat",{' + " " * 10_000_000 + "}]"
                await ws.send(bomb)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), STEP)
                code = ws.close_code
            assert (await other.heartbeat()).current_time == identity_time("BOMB-OK")
            return code

    try:
        assert asyncio.run(scenario()) == 1009
        assert not [c for c in csms.calls("BOMB-1") if c.action == "Heartbeat"]
    finally:
        node.stop()


def test_compression_none_offers_and_accepts_nothing(csms: Csms, tmp_path: Path) -> None:
    config = edge_config(csms.url, listen_extra={"compression": "none"},
                         backend_extra={"compression": "none"})
    node = _node(config, tmp_path)
    try:
        assert _boot(node.url("DEF-4"), "DEF-4") is None
        [record] = csms.connections("DEF-4")
        assert "sec-websocket-extensions" not in {k.lower() for k in record.headers}
        assert record.extensions is None
    finally:
        node.stop()


def test_a_peer_link_negotiates_deflate(csms: Csms, tmp_path: Path) -> None:
    core = _node(overlay_config("core-z", backend_url=csms.url, accept=["edge-z"]),
                 tmp_path / "core")
    try:
        edge = _node(overlay_config("edge-z", peers=[PeerLink.to(core, "core-z", "msgpack")]),
                     tmp_path / "edge")
        try:
            dialled = edge.wait_for_event("peer_connected", timeout=STEP, peer="core-z")
            accepted = core.wait_for_event("peer_connected", timeout=STEP, peer="edge-z")
            assert dialled["compressed"] is True and accepted["compressed"] is True
            # and a station carried over the compressed msgpack link is served
            wait_log(edge, "routes_changed", routes_to("CSMS"), timeout=STEP)
            assert "permessage-deflate" in (_boot(edge.url("DEF-5"), "DEF-5") or "")
        finally:
            edge.stop()
    finally:
        core.stop()


# --- §6.5 the node's own certificate toward the CSMS ------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("csms-pki"), ca_name="CSMS Operator CA")


@pytest.fixture(scope="module")
def mtls_csms(pki: Pki) -> Iterator[Csms]:
    """A profile-3 CSMS: wss://, a server certificate from its CA, client certificates
    required and verified against the same CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.load_verify_locations(str(pki.ca_cert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    with Csms(ssl=ctx) as server:
        yield server


def _tls_backend(pki: Pki, cn: str | None, ca: Path | None = None) -> dict[str, object]:
    extra: dict[str, object] = {"tls_ca": str(ca or pki.ca_cert)}
    if cn is not None:
        cert, key = pki.client(cn)
        extra |= {"tls_cert": str(cert), "tls_key": str(key)}
    return extra


def test_a_csms_that_requires_a_client_certificate_sees_the_nodes(
        mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    node = _node(edge_config(mtls_csms.url, backend_extra=_tls_backend(pki, "edge-lc-1")),
                 tmp_path)
    try:
        _boot(node.url("TLS-1"), "TLS-1")
        [record] = mtls_csms.connections("TLS-1")
        assert record.client_cn == "edge-lc-1"
        # the station's own identity still travels in the URL, as §6 asks of a LC
        assert record.path.endswith("/TLS-1")
    finally:
        node.stop()


def test_without_a_client_certificate_the_station_gets_502_and_the_log_says_tls(
        mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    node = _node(edge_config(mtls_csms.url, backend_extra=_tls_backend(pki, None)), tmp_path)
    try:
        status, _ = asyncio.run(handshake_status(node.url("TLS-2"), ("ocpp1.6",)))
        assert status == 502
        failed = node.wait_for_event("backend_failed", station="TLS-2")
        assert failed["reason"].startswith("TLS"), failed
        assert not mtls_csms.connections("TLS-2")
    finally:
        node.stop()


def test_a_wrong_tls_ca_fails_verification_with_a_clear_log_line(
        mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "other", ca_name="Some Other CA")
    node = _node(edge_config(mtls_csms.url,
                             backend_extra=_tls_backend(pki, "edge-lc-1", stranger.ca_cert)),
                 tmp_path)
    try:
        status, _ = asyncio.run(handshake_status(node.url("TLS-3"), ("ocpp1.6",)))
        assert status == 502
        failed = node.wait_for_event("backend_failed", station="TLS-3")
        assert failed["reason"].startswith("TLS"), failed
        assert "certificate" in failed["reason"].lower(), failed
    finally:
        node.stop()


def test_a_rotated_client_certificate_serves_the_next_station_after_sighup(
        mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "node-cert.pem", tmp_path / "node-key.pem"

    def install(cn: str) -> None:
        cert, key = pki.client(cn)
        cert_file.write_bytes(cert.read_bytes())
        key_file.write_bytes(key.read_bytes())

    install("edge-old")
    config = edge_config(mtls_csms.url, backend_extra={
        "tls_ca": str(pki.ca_cert), "tls_cert": str(cert_file), "tls_key": str(key_file)})
    node = _node(config, tmp_path / "node")

    async def scenario() -> None:
        async with open_station(node.url("ROT-1"), "1.6", identity="ROT-1") as first:
            await first.boot()
            install("edge-new")
            node.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(node.wait_for_event, "reloaded")
            async with open_station(node.url("ROT-2"), "1.6", identity="ROT-2") as second:
                await second.boot()
            # the open link keeps the certificate it shook hands with, and keeps working
            assert (await first.heartbeat()).current_time == identity_time("ROT-1")

    try:
        asyncio.run(scenario())
        assert mtls_csms.connections("ROT-1")[0].client_cn == "edge-old"
        assert mtls_csms.connections("ROT-2")[0].client_cn == "edge-new"
        assert len(mtls_csms.connections("ROT-1")) == 1
    finally:
        node.stop()


def test_profile_3_on_both_hops(mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    """The edge gateway of docs/operations.md: a station shows its certificate to the node
    (CN = identity), the node shows its own to the CSMS; neither sees the other's."""
    site = make_pki(tmp_path / "site", ca_name="Site CA")
    config = edge_config(mtls_csms.url, security_profile=3, tls_cert=site.server_cert,
                         tls_key=site.server_key, tls_ca=site.ca_cert,
                         backend_extra=_tls_backend(pki, "edge-p3"))
    node = _node(config, tmp_path / "node")
    try:
        url = node.url("P3-1").replace("ws://", "wss://")
        _boot(url, "P3-1", ssl=site.client_context("P3-1"))
        [record] = mtls_csms.connections("P3-1")
        assert record.client_cn == "edge-p3"
        # a station certificate for another identity does not get through
        status, _ = asyncio.run(handshake_status(node.url("P3-2").replace("ws://", "wss://"),
                                                 ("ocpp1.6",), ssl=site.client_context("P3-1")))
        assert status == 403
    finally:
        node.stop()


def test_a_rotated_listener_certificate_serves_the_next_station(
        csms: Csms, tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old", "Old CA"), make_pki(tmp_path / "new", "New CA")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(old.server_cert.read_bytes())
    key_file.write_bytes(old.server_key.read_bytes())
    node = _node(edge_config(csms.url, security_profile=2, tls_cert=cert_file,
                             tls_key=key_file,
                             stations=[{"match": "*", "password_hash": hash_password("pw")}]),
                 tmp_path / "node")
    trust_both = ssl.create_default_context(cafile=str(old.ca_cert))
    trust_both.load_verify_locations(str(new.ca_cert))

    async def issuer(identity: str) -> str:
        url = node.url(identity).replace("ws://", "wss://")
        async with open_raw(url, ("ocpp1.6",), identity=identity, password="pw",
                            ssl=trust_both) as ws:
            cert = ws.transport.get_extra_info("peercert")
            return dict(rdn[0] for rdn in cert["issuer"])["commonName"]  # type: ignore[no-any-return]

    try:
        assert asyncio.run(issuer("ROTL-1")) == "Old CA"
        cert_file.write_bytes(new.server_cert.read_bytes())
        key_file.write_bytes(new.server_key.read_bytes())
        node.proc.send_signal(signal.SIGHUP)
        node.wait_for_event("reloaded")
        assert asyncio.run(issuer("ROTL-2")) == "New CA"
    finally:
        node.stop()


def test_a_tls12_only_csms_gets_an_ocpp_suite(pki: Pki, tmp_path: Path) -> None:
    """A00.FR.313/318: TLS 1.2 at least, with the Part 2 suites; a CSMS that stops at 1.2
    and offers only ECDHE-ECDSA AES-256-GCM is reached."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
    with Csms(ssl=ctx) as csms12:
        node = _node(edge_config(csms12.url, backend_extra={"tls_ca": str(pki.ca_cert)}),
                     tmp_path)
        try:
            _boot(node.url("TLS12-1"), "TLS12-1")
            assert csms12.connections("TLS12-1")
        finally:
            node.stop()
    dialing = DialSettings(tls_ca=pki.ca_cert)
    client = client_context(dialing)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    tls12 = [c["name"] for c in client.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 == OCPP_TLS12_CIPHERS.split(":")


def test_a_mismatched_or_unreadable_pair_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    cert_a, _ = pki.client("pair-a")
    _, key_b = pki.client("pair-b")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    def problems(extra: str) -> str:
        text = ('[node]\nid = "n"\n[listen]\nsecurity_profile = 0\n[[stations]]\nmatch = "*"\n'
                '[[backends]]\nname = "c"\nurl = "wss://csms.example/ocpp"\n' + extra)
        with pytest.raises(ConfigError) as caught:
            parse(text, "node.toml", tmp_path)
        return str(caught.value)

    mismatched = problems(f'tls_cert = "{cert_a}"\ntls_key = "{key_b}"\n')
    assert "backends[0].tls_cert" in mismatched and str(cert_a) in mismatched
    assert "backends[0].tls_ca" in problems(f'tls_ca = "{junk}"\n')
    assert "go together" in problems(f'tls_cert = "{cert_a}"\n')
    # TLS settings on a ws:// URL are a mistake, not silently ignored
    with pytest.raises(ConfigError, match="wss://"):
        parse('[node]\nid = "n"\n[listen]\nsecurity_profile = 0\n[[stations]]\nmatch = "*"\n'
              '[[backends]]\nname = "c"\nurl = "ws://csms.example/ocpp"\n'
              f'tls_ca = "{pki.ca_cert}"\n',
              "node.toml", tmp_path)
    # an encrypted key would make OpenSSL prompt on the terminal: refused instead
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    cert_c, key_c = pki.client("pair-c")
    locked = tmp_path / "locked.key"
    locked.write_bytes(load_pem_private_key(key_c.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert "encrypted" in problems(f'tls_cert = "{cert_c}"\ntls_key = "{locked}"\n')
    assert "at least 0.1 s" in problems("ping_interval_s = 0.001\n")
    # the scheme is case-insensitive, as URLs are
    parse('[node]\nid = "n"\n[listen]\nsecurity_profile = 0\n[[stations]]\nmatch = "*"\n'
          f'[[backends]]\nname = "c"\nurl = "WSS://csms.example/ocpp"\ntls_ca = "{pki.ca_cert}"\n',
          "node.toml", tmp_path)
    with pytest.raises(ConfigError, match="compression"):
        parse('[node]\nid = "n"\n[listen]\nsecurity_profile = 0\ncompression = "gzip"\n'
              '[[stations]]\nmatch = "*"\n[[backends]]\nname = "c"\nurl = "ws://c/ocpp"\n',
              "node.toml", tmp_path)


def test_a_reload_cannot_switch_tls_on_or_off(csms: Csms, pki: Pki, tmp_path: Path) -> None:
    """security_profile needs a restart: a reload that changes it says so, and the
    listener goes on speaking as before (no TLS dropped, none added) until then."""
    password_hash = hash_password("pw")
    config = edge_config(csms.url, security_profile=1,
                         stations=[{"match": "*", "password_hash": password_hash}])
    node = _node(config, tmp_path)
    try:
        to_tls = edge_config(csms.url, security_profile=2, tls_cert=pki.server_cert,
                             tls_key=pki.server_key,
                             stations=[{"match": "*", "password_hash": password_hash}])
        node.config_path.write_text(to_tls)
        node.proc.send_signal(signal.SIGHUP)
        reloaded = node.wait_for_event("reloaded")
        assert "listen" in reloaded["needs_restart"]
        status, _ = asyncio.run(handshake_status(node.url("PROF-1"), ("ocpp1.6",),
                                                 password="pw"))
        assert status == 101  # still plain ws:// as started
    finally:
        node.stop()


def test_a_reload_with_a_broken_key_keeps_the_old_certificates(
        mtls_csms: Csms, pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.client("edge-keep")
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.read_bytes())
    node = _node(edge_config(mtls_csms.url, backend_extra={
        "tls_ca": str(pki.ca_cert), "tls_cert": str(cert), "tls_key": str(key_file)}),
        tmp_path / "node")
    try:
        key_file.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        node.proc.send_signal(signal.SIGHUP)
        refused = node.wait_for_event("reload_refused")
        assert "tls_cert" in refused["reason"] and str(key_file) in refused["reason"]
        _boot(node.url("KEEP-1"), "KEEP-1")
        assert mtls_csms.connections("KEEP-1")[0].client_cn == "edge-keep"
    finally:
        node.stop()


# --- §5.3 / §6.3 keepalive and the close rule --------------------------------------------


def test_a_blackholed_backend_is_detected_by_ping_and_the_station_is_told(
        csms: Csms, tmp_path: Path) -> None:
    """The CSMS stops reading (socket open, no pongs). Within ping_interval_s +
    ping_timeout_s the node calls the link dead, answers the CALL in flight InternalError
    and closes the station's link."""
    csms.set_raw("KA-1")  # recorded, never answered: the CALL stays in flight
    config = edge_config(csms.url, backend_extra={"ping_interval_s": 0.5,
                                                  "ping_timeout_s": 0.5})
    node = _node(config, tmp_path)

    async def scenario() -> tuple[list[object], int | None]:
        async with open_raw(node.url("KA-1"), ("ocpp1.6",), identity="KA-1") as ws:
            await asyncio.to_thread(csms.wait_for, lambda: csms.is_connected("KA-1") or None)
            csms.blackhole("KA-1")
            await ws.send(json.dumps([2, "hb-1", "Heartbeat", {}]))
            answer = json.loads(await asyncio.wait_for(ws.recv(), STEP))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), STEP)
            return answer, ws.close_code

    try:
        answer, code = asyncio.run(scenario())
        assert answer[:3] == [4, "hb-1", "InternalError"], answer
        assert code is not None and code != 1000
        gone = node.wait_for_event("station_disconnected", station="KA-1")
        assert "no answer to a ping" in gone["reason"], gone
    finally:
        csms.set_raw("KA-1", False)
        node.stop()


def test_the_node_answers_a_stations_own_pings(csms: Csms, tmp_path: Path) -> None:
    node = _node(edge_config(csms.url), tmp_path)

    async def scenario() -> float:
        async with open_raw(node.url("PING-1"), ("ocpp1.6",), identity="PING-1") as ws:
            pong = await ws.ping(b"station-ping")
            return await asyncio.wait_for(pong, STEP)

    try:
        assert asyncio.run(scenario()) >= 0
    finally:
        node.stop()


# --- §3.3 handshake rules -----------------------------------------------------------------


def test_a_csms_that_agrees_no_subprotocol_gets_no_station(csms: Csms, tmp_path: Path) -> None:
    csms.set_subprotocols("NOSUB-1", None)
    node = _node(edge_config(csms.url), tmp_path)
    try:
        status, _ = asyncio.run(handshake_status(node.url("NOSUB-1"), ("ocpp1.6",)))
        assert status == 502
        failed = node.wait_for_event("backend_failed", station="NOSUB-1")
        assert "subprotocol" in failed["reason"]
    finally:
        csms.clear_subprotocols("NOSUB-1")
        node.stop()


def test_an_identity_the_node_does_not_serve_gets_404(csms: Csms, tmp_path: Path) -> None:
    node = _node(edge_config(csms.url, stations=[{"match": "SITE7-*"}]), tmp_path)
    try:
        status, _ = asyncio.run(handshake_status(node.url("ELSEWHERE-1"), ("ocpp1.6",)))
        assert status == 404
        assert _boot(node.url("SITE7-1"), "SITE7-1") is not None
    finally:
        node.stop()
