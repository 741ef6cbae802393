"""Handshake floods and password guessing, against a node in this process (trio, real
sockets on loopback): ``max_handshakes`` sheds with 503, ``max_auth_failures`` answers 429
without checking more passwords, and a refusal costs the same for a known and an
unknown identity."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

import router.listener
from router.config import parse
from router.net.handshake import HandshakeFailed, dial
from router.node import Node
from router.passwords import hash_password
from tests.raw_backend import RawBackend

PASSWORD = "right-password-1"


def _auth(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
async def node(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Node]:
    backend = RawBackend().start()
    try:
        text = f"""
[node]
id = "hs-node"
state_dir = "{tmp_path / 'state'}"
[listen]
port = 0
security_profile = 1
max_handshakes = 3
max_auth_failures = 3
handshake_timeout_s = 1
[[stations]]
match = "HS-*"
password_hash = "{hash_password(PASSWORD)}"
[[backends]]
name = "main"
role = "primary"
url = "{backend.url}"
auth = "none"
"""
        node = Node(parse(text, str(tmp_path / "node.toml"), tmp_path))
        await nursery.start(node.run)
        yield node
    finally:
        await trio.to_thread.run_sync(backend.stop)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every password the node checks from now on, in order (the check still runs)."""
    checked: list[str] = []
    real = router.listener.verify_password

    def counting(password: str, encoded: str) -> bool:
        checked.append(password)
        return real(password, encoded)

    monkeypatch.setattr(router.listener, "verify_password", counting)
    return checked


async def _upgrade(node: Node, identity: str, headers: dict[str, str]) -> int:
    """The HTTP status of an upgrade attempt (101 when it succeeds; the link is closed)."""
    url = f"ws://127.0.0.1:{node.port}/ocpp/{identity}"
    try:
        with trio.fail_after(10):
            ws = await dial(url, ["ocpp1.6"], headers, 65536)
    except HandshakeFailed as exc:
        assert exc.status is not None, exc.reason
        return exc.status
    await ws.aclose()
    return 101


async def test_past_max_handshakes_a_connection_gets_503_at_once(node: Node) -> None:
    idle = [await trio.open_tcp_stream("127.0.0.1", node.port) for _ in range(3)]
    with trio.fail_after(5):
        while node.listener.handshakes < 3:  # accepted, waiting for an upgrade request
            await trio.sleep(0.01)
    fourth = await trio.open_tcp_stream("127.0.0.1", node.port)
    with trio.fail_after(2):
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = await fourth.receive_some(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 503 ")
    assert b"\r\nRetry-After: 2\r\n" in reply
    assert node.stats.handshakes_shed == 1
    # the idle ones time out (handshake_timeout_s = 1 s) and free their slots
    with trio.fail_after(5):
        while node.listener.handshakes:
            await trio.sleep(0.05)
    assert await _upgrade(node, "HS-1", _auth("HS-1", PASSWORD)) == 101
    for stream in [*idle, fourth]:
        await stream.aclose()


async def test_repeated_wrong_passwords_get_429_without_more_checks(
    node: Node, checks: list[str]
) -> None:
    assert await _upgrade(node, "HS-2", _auth("HS-2", PASSWORD)) == 101  # verified once
    checks.clear()  # count the guesses only
    for attempt in range(3):
        assert await _upgrade(node, "HS-3", _auth("HS-3", f"guess-{attempt}")) == 401
    assert len(checks) == 3
    assert await _upgrade(node, "HS-3", _auth("HS-3", "guess-4")) == 429
    assert len(checks) == 3  # refused without a password check
    assert node.stats.auth_limited == 1
    # a station whose password was verified before still connects from that address
    assert await _upgrade(node, "HS-2", _auth("HS-2", PASSWORD)) == 101


async def test_an_unknown_identity_costs_a_check_like_a_known_one(
    node: Node, checks: list[str]
) -> None:
    assert await _upgrade(node, "NOBODY-1", _auth("NOBODY-1", "x")) == 401  # no entry
    assert await _upgrade(node, "HS-4", _auth("HS-5", PASSWORD)) == 401  # wrong user name
    assert await _upgrade(node, "HS-4", _auth("HS-4", "wrong")) == 401  # wrong password
    assert checks == ["x", PASSWORD, "wrong"]


async def test_a_burst_of_wrong_passwords_cannot_queue_more_checks_than_allowed(
    node: Node, checks: list[str]
) -> None:
    """Ten at once, with max_auth_failures = 3: checks still running count, so at most
    three password checks are made and the others get 429 at once."""
    # room for all ten handshakes at once (the fixture's max_handshakes is 3)
    node.config = replace(node.config, listen=replace(node.config.listen, max_handshakes=100))
    statuses: list[int] = []

    async def attempt(i: int) -> None:
        statuses.append(await _upgrade(node, "HS-6", _auth("HS-6", f"burst-{i}")))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(attempt, i)
    assert sorted(statuses) == [401] * 3 + [429] * 7
    assert len(checks) == 3


async def _raw_reply(node: Node, request: bytes) -> bytes:
    """What the node answers to ``request`` sent on a plain TCP connection, to its end."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    await stream.send_all(request)
    reply = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            reply += chunk
    await stream.aclose()
    return reply


async def test_a_malformed_or_early_upgrade_request_gets_400(node: Node) -> None:
    """A request websockets cannot parse, and one with a frame behind it before the 101
    (RFC 6455 §4.1): 400 with the reason as its body. The first failed on an assertion in
    websockets before (its parser had queued its end of stream already)."""
    malformed = await _raw_reply(node, b"GET /ocpp/HS-1 HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n")
    assert malformed.startswith(b"HTTP/1.1 400 ")
    assert malformed.endswith(b"\r\n\r\nmalformed HTTP request\n")
    request = (b"GET /ocpp/HS-1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ocpp1.6\r\n\r\n")
    early = await _raw_reply(node, request + b"\x89\x80\x00\x00\x00\x00")  # a ping
    assert early.startswith(b"HTTP/1.1 400 ")
    assert early.endswith(b"\r\n\r\ndata sent before the upgrade response\n")
    assert await _upgrade(node, "HS-1", _auth("HS-1", PASSWORD)) == 101
