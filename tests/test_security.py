"""Security profiles 1-3 at the node's station listener, end to end.

Profile 1: HTTP Basic over ws://; profile 2: TLS + Basic; profile 3: mutual TLS with the
client certificate's CN as the station identity. One node per profile (module scope) in
front of one ``ocpp``-package CSMS. Certificates come from ``tests.certs``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from ocpp.v16 import call as call16
from websockets.exceptions import InvalidHandshake, InvalidMessage

from tests.certs import Pki, make_pki
from tests.nodeproc import NodeProcess, start_node
from tests.peers import edge_config, node_env
from tests.peers.ocpp_csms import Csms, identity_time
from tests.peers.ocpp_station import basic_auth, handshake_status, open_station

STEP = 10.0
PASSWORD = "correct horse battery staple"
WRONG = "Tr0ub4dor&3"

# how a refused TLS handshake may surface at a websockets client: alert or reset during
# the handshake, or (TLS 1.3, where the server checks the client cert after the client
# finished) the connection closing before any HTTP response
TLS_REFUSED = (ssl.SSLError, ConnectionError, EOFError, InvalidMessage, InvalidHandshake, OSError)


def _hash(password: str) -> str:
    from router.passwords import hash_password

    return hash_password(password)


@pytest.fixture(scope="module")
def csms() -> Iterator[Csms]:
    with Csms() as server:
        yield server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _start(config_text: str, directory: Path) -> NodeProcess:
    return start_node(config_text, directory, env=node_env())


@pytest.fixture(scope="module")
def node_p1(csms: Csms, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    config = edge_config(
        csms.url,
        security_profile=1,
        stations=[{"match": "SEC1-*", "password_hash": _hash(PASSWORD)}],
    )
    proc = _start(config, tmp_path_factory.mktemp("p1"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def node_p2(
    csms: Csms, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    config = edge_config(
        csms.url,
        security_profile=2,
        stations=[{"match": "SEC2-*", "password_hash": _hash(PASSWORD)}],
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
    )
    proc = _start(config, tmp_path_factory.mktemp("p2"))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def node_p3(
    csms: Csms, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    config = edge_config(
        csms.url,
        security_profile=3,
        stations=[{"match": "SEC3-*"}],
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca_cert,
    )
    proc = _start(config, tmp_path_factory.mktemp("p3"))
    try:
        yield proc
    finally:
        proc.stop()


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _boot_through(
    url: str, identity: str, *, password: str | None = None, ctx: ssl.SSLContext | None = None
) -> None:
    """Connect an OCPP 1.6 station, boot and heartbeat; check the CSMS's answers."""

    async def scenario() -> None:
        async with open_station(
            url, "1.6", identity=identity, password=password, ssl=ctx
        ) as station:
            boot = await station.boot()
            assert boot.status == "Accepted"
            assert boot.current_time == identity_time(identity)
            heartbeat = await station.heartbeat()
            assert heartbeat.current_time == identity_time(identity)

    asyncio.run(scenario())


# --- profile 1: Basic auth ---------------------------------------------------------------


@pytest.mark.parametrize("password", [WRONG, None], ids=["wrong-password", "no-credentials"])
def test_profile1_bad_credentials_get_401_and_no_backend_link(
    node_p1: NodeProcess, csms: Csms, password: str | None
) -> None:
    identity = f"SEC1-BAD-{'none' if password is None else 'wrong'}"
    status, headers = asyncio.run(
        handshake_status(node_p1.url(identity), password=password, identity=identity)
    )
    assert status == 401
    challenge = _header(headers, "WWW-Authenticate")
    assert challenge is not None and challenge.lower().startswith("basic"), headers
    node_p1.wait_for_event("station_rejected", timeout=STEP, station=identity)
    assert csms.connections(identity) == []
    # the password never shows up in the node's log
    assert not any(WRONG in line for line in node_p1.raw_stderr)


def test_profile1_password_of_another_identity_is_refused(node_p1: NodeProcess, csms: Csms) -> None:
    """Username must equal the identity: right password, wrong username -> 401."""
    identity = "SEC1-OTHER-USER"
    header = basic_auth("SEC1-SOMEONE-ELSE", PASSWORD)
    status, _ = asyncio.run(
        handshake_status(node_p1.url(identity), headers={"Authorization": header})
    )
    assert status == 401
    assert csms.connections(identity) == []


def test_profile1_right_password_reaches_csms(node_p1: NodeProcess, csms: Csms) -> None:
    identity = "SEC1-GOOD"
    _boot_through(node_p1.url(identity), identity, password=PASSWORD)
    assert [c.action for c in csms.calls(identity)] == ["BootNotification", "Heartbeat"]
    assert not any(PASSWORD in line for line in node_p1.raw_stderr)


def test_profile1_passthrough_forwards_station_credentials(
    node_p1: NodeProcess, csms: Csms
) -> None:
    """``auth = "passthrough"``: the backend sees the station's own Basic credentials."""
    identity = "SEC1-PASSTHROUGH"
    _boot_through(node_p1.url(identity), identity, password=PASSWORD)
    [link] = csms.connections(identity)
    assert link.authorization == basic_auth(identity, PASSWORD)


def test_unauthenticated_duplicate_cannot_knock_station_off(
    node_p1: NodeProcess, csms: Csms
) -> None:
    identity = "SEC1-VICTIM"

    async def scenario() -> None:
        async with open_station(node_p1.url(identity), "1.6", password=PASSWORD) as station:
            await station.boot()

            status, _ = await handshake_status(node_p1.url(identity), password=WRONG)
            assert status == 401
            status, _ = await handshake_status(node_p1.url(identity), password=None)
            assert status == 401

            # the first link is untouched and keeps getting answers
            for _ in range(3):
                heartbeat = await station.heartbeat()
                assert heartbeat.current_time == identity_time(identity)
            assert station.ws.close_code is None
            command = call16.RemoteStartTransaction(id_tag="VICTIM-TAG", connector_id=1)
            started = await csms.acall(identity, command)
            assert started.status == "Accepted"

    asyncio.run(scenario())
    assert [e for e in node_p1.events("station_replaced") if e.get("station") == identity] == []
    assert len(csms.connections(identity)) == 1
    assert [c.action for c in csms.calls(identity)] == ["BootNotification"] + ["Heartbeat"] * 3


def test_authenticated_duplicate_replaces_station(node_p1: NodeProcess, csms: Csms) -> None:
    """Contract: a second connection that authenticates replaces the first."""
    identity = "SEC1-REPLACED"

    async def scenario() -> None:
        async with open_station(node_p1.url(identity), "1.6", password=PASSWORD) as first:
            await first.boot()
            async with open_station(node_p1.url(identity), "1.6", password=PASSWORD) as second:
                await first.wait_closed(STEP)
                heartbeat = await second.heartbeat()
                assert heartbeat.current_time == identity_time(identity)

    asyncio.run(scenario())
    node_p1.wait_for_event("station_replaced", timeout=STEP, station=identity)


# --- profile 2: TLS + Basic ----------------------------------------------------------------


def test_profile2_tls_and_password_reach_csms(node_p2: NodeProcess, csms: Csms, pki: Pki) -> None:
    identity = "SEC2-GOOD"
    url = node_p2.url(identity)
    assert url.startswith("wss://")
    _boot_through(url, identity, password=PASSWORD, ctx=pki.client_context())
    assert [c.action for c in csms.calls(identity)] == ["BootNotification", "Heartbeat"]


def test_profile2_wrong_password_gets_401(node_p2: NodeProcess, csms: Csms, pki: Pki) -> None:
    identity = "SEC2-WRONG"
    status, headers = asyncio.run(
        handshake_status(node_p2.url(identity), password=WRONG, ssl=pki.client_context())
    )
    assert status == 401
    challenge = _header(headers, "WWW-Authenticate")
    assert challenge is not None and challenge.lower().startswith("basic"), headers
    node_p2.wait_for_event("station_rejected", timeout=STEP, station=identity)
    assert csms.connections(identity) == []


def test_profile2_client_not_trusting_the_ca_fails(
    node_p2: NodeProcess, csms: Csms, tmp_path: Path
) -> None:
    """The listener really speaks TLS with the configured certificate."""
    identity = "SEC2-UNTRUSTED"
    stranger = make_pki(tmp_path / "other", ca_name="Other CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(
            handshake_status(
                node_p2.url(identity), password=PASSWORD, ssl=stranger.client_context()
            )
        )
    assert csms.connections(identity) == []


# --- profile 3: mutual TLS -------------------------------------------------------------------


def test_profile3_matching_certificate_reaches_csms(
    node_p3: NodeProcess, csms: Csms, pki: Pki
) -> None:
    identity = "SEC3-GOOD"
    _boot_through(node_p3.url(identity), identity, ctx=pki.client_context(identity))
    assert [c.action for c in csms.calls(identity)] == ["BootNotification", "Heartbeat"]


def test_profile3_certificate_of_another_identity_is_refused(
    node_p3: NodeProcess, csms: Csms, pki: Pki
) -> None:
    identity = "SEC3-TARGET"
    ctx = pki.client_context("SEC3-IMPOSTOR")  # valid certificate, wrong CN
    try:
        status, _ = asyncio.run(handshake_status(node_p3.url(identity), ssl=ctx))
    except TLS_REFUSED:
        status = None  # handshake failure is an accepted way to refuse
    assert status in (403, None), f"expected 403 or a failed handshake, got HTTP {status}"
    if status == 403:
        node_p3.wait_for_event("station_rejected", timeout=STEP, station=identity)
    # a station that is let in afterwards reaches the CSMS; the impostor never did
    _boot_through(
        node_p3.url("SEC3-AFTER-IMPOSTOR"),
        "SEC3-AFTER-IMPOSTOR",
        ctx=pki.client_context("SEC3-AFTER-IMPOSTOR"),
    )
    assert csms.connections(identity) == []
    assert csms.connections("SEC3-IMPOSTOR") == []


def test_profile3_without_client_certificate_handshake_fails(
    node_p3: NodeProcess, csms: Csms, pki: Pki
) -> None:
    identity = "SEC3-NO-CERT"
    with pytest.raises(TLS_REFUSED):
        asyncio.run(handshake_status(node_p3.url(identity), ssl=pki.client_context(None)))
    assert csms.connections(identity) == []


def test_profile3_certificate_from_another_ca_handshake_fails(
    node_p3: NodeProcess, csms: Csms, pki: Pki, tmp_path: Path
) -> None:
    identity = "SEC3-FOREIGN-CA"
    stranger = make_pki(tmp_path / "other", ca_name="Other CA")
    cert, key = stranger.client(identity)  # right CN, issued by a CA the node does not trust
    ctx = pki.client_context(None)  # the client trusts the node's server certificate
    ctx.load_cert_chain(str(cert), str(key))
    with pytest.raises(TLS_REFUSED):
        asyncio.run(handshake_status(node_p3.url(identity), ssl=ctx))
    assert csms.connections(identity) == []
