"""One WebSocket link (router/net/wslink.py) over memory streams: whole messages both ways,
fragments reassembled, text checked for UTF-8, close codes reported consistently."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from router.net.keepalive import Keepalive
from router.net.wslink import CLOSE_ABNORMAL, LinkClosed
from router.wire.frames import CALL, Frame, encode_frame
from tests.memory_ws import ws_pair


async def test_text_and_binary_messages_cross_whole() -> None:
    node, backend = ws_pair()
    await node.send_message('[2,"1","Heartbeat",{}]')
    await node.send_bytes(b"\x00\x01")
    assert await backend.get_message() == '[2,"1","Heartbeat",{}]'
    assert await backend.get_message() == b"\x00\x01"


async def test_send_frame_uses_the_text_when_given_else_encodes_the_frame() -> None:
    node, backend = ws_pair()
    frame = Frame(CALL, "7", action="Heartbeat", payload={})
    await node.send_frame(frame, '[2, "7", "Heartbeat", {}]')  # as it arrived, spaces kept
    await node.send_frame(frame, None)
    assert await backend.get_message() == '[2, "7", "Heartbeat", {}]'
    assert await backend.get_message() == encode_frame(frame)


async def test_fragments_are_reassembled_into_one_message() -> None:
    node, backend = ws_pair()
    proto = node.protocol
    proto.send_frame(WsFrame(Opcode.TEXT, b'[2,"1",', fin=False))
    proto.send_frame(WsFrame(Opcode.CONT, b'"Heartbeat",', fin=False))
    proto.send_frame(WsFrame(Opcode.CONT, b"{}]", fin=True))
    await node.stream.send_all(b"".join(proto.data_to_send()))
    assert await backend.get_message() == '[2,"1","Heartbeat",{}]'


async def test_text_that_is_not_utf8_fails_the_link_with_1007() -> None:
    node, backend = ws_pair()
    proto = node.protocol
    proto.send_frame(WsFrame(Opcode.TEXT, b"\xff\xfe"))
    await node.stream.send_all(b"".join(proto.data_to_send()))
    with pytest.raises(LinkClosed) as closed:
        await backend.get_message()
    assert closed.value.code == 1007
    assert backend.closed == 1007


async def test_a_peer_close_then_a_dropped_connection_reports_the_peers_code() -> None:
    """The close code get_message raises is the one ``closed`` reports, even when the
    reply to the peer's close cannot be written because the connection is gone."""
    node, backend = ws_pair()
    backend.protocol.send_close(1001, "going away")
    await backend.stream.send_all(b"".join(backend.protocol.data_to_send()))
    await trio.aclose_forcefully(backend.stream)
    with pytest.raises(LinkClosed) as closed:
        await node.get_message()
    assert closed.value.code == 1001
    assert node.closed == 1001
    with pytest.raises(LinkClosed):
        await node.send_message("too late")


async def test_aclose_does_the_closing_handshake() -> None:
    node, backend = ws_pair()

    async def peer() -> None:
        with pytest.raises(LinkClosed) as closed:
            await backend.get_message()
        assert closed.value.code == 1000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        await node.aclose(1000, "bye", wait_s=1.0)
    assert node.closed == 1000
    assert node.info().state == "closing"
    assert backend.protocol.close_rcvd is not None
    assert backend.protocol.close_rcvd.reason == "bye"


async def test_a_quiet_far_end_that_answers_pings_keeps_the_link(
        autojump_clock: trio.testing.MockClock) -> None:
    node, backend = ws_pair(keepalive=Keepalive(10.0, 5.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.get_message)  # reading answers pings; nothing else comes
        with trio.move_on_after(100):
            await node.get_message()
        assert node.closed is None  # ten pings went out, ten pongs came back
        nursery.cancel_scope.cancel()


async def test_a_far_end_that_stops_reading_is_dead_after_interval_plus_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    node, _backend = ws_pair(keepalive=Keepalive(10.0, 5.0))  # the backend never reads
    start = trio.current_time()
    with pytest.raises(LinkClosed) as caught:
        await node.get_message()
    assert trio.current_time() - start == pytest.approx(15.0)
    assert caught.value.code == CLOSE_ABNORMAL
    assert "no answer to a ping within 5 s" in caught.value.reason
    assert node.closed == CLOSE_ABNORMAL


async def test_traffic_postpones_the_ping(autojump_clock: trio.testing.MockClock) -> None:
    node, backend = ws_pair(keepalive=Keepalive(10.0, 5.0))
    pings: list[bytes] = []
    send_ping = node.protocol.send_ping
    node.protocol.send_ping = lambda data: (pings.append(bytes(data)), send_ping(data))[1]  # type: ignore[method-assign]
    for _ in range(5):  # a message every 8 s: the node never needs to ping
        await trio.sleep(8)
        await backend.send_message('[2,"1","Heartbeat",{}]')
        assert await node.get_message() == '[2,"1","Heartbeat",{}]'
    assert pings == []
    with trio.move_on_after(11):  # then 10 s of quiet: one ping
        await node.get_message()
    assert pings == [b""]


def test_no_interval_means_no_keepalive() -> None:
    assert Keepalive.every(0, 30) is None
    assert Keepalive.every(20, 30) == Keepalive(20, 30)


async def test_a_reader_busy_elsewhere_is_neither_pinged_nor_declared_dead(
        autojump_clock: trio.testing.MockClock) -> None:
    """The session's reader of a link may wait minutes on the other link (a station that
    does not drain); an answer could sit unread, so the watcher only looks again."""
    node, backend = ws_pair(keepalive=Keepalive(10.0, 5.0))
    await trio.sleep(100)  # nobody reads the node's link
    assert node.closed is None
    await backend.send_message('[2,"1","Heartbeat",{}]')
    assert await node.get_message() == '[2,"1","Heartbeat",{}]'


async def test_a_closed_link_leaves_no_reference_cycles() -> None:
    """An ended session's protocols are freed by reference counting, not left for the
    node's collector sweeps (router/gcwatch.py): websockets' parser generator and a
    server's subprotocol chooser (the Upgrade's bound method) each hold the protocol."""
    import gc
    import weakref

    class Chooser:  # as router.net.handshake.Upgrade: it holds the protocol, which holds it
        def __init__(self, proto: object) -> None:
            self.proto = proto

        def pick(self, _proto: object, _offered: object) -> None:
            return None

    node, backend = ws_pair()
    vars(backend.protocol)["select_subprotocol"] = Chooser(backend.protocol).pick
    protocols = [weakref.ref(node.protocol), weakref.ref(backend.protocol)]
    gc.disable()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.aclose)
            await node.aclose()
        # a reader that was parked on the socket still hands its EOF to the protocol
        node.protocol.receive_eof()
        backend.protocol.receive_data(b"late bytes")
        with pytest.raises(LinkClosed):
            await node.get_message()
        del node, backend, nursery
        assert [ref() for ref in protocols] == [None, None]
    finally:
        gc.enable()


async def test_a_refused_upgrade_leaves_no_reference_cycles() -> None:
    """A refused handshake (401, 429, 503 in a storm) is freed by reference counting too:
    read_upgrade's subprotocol chooser closes over the Upgrade, which holds the protocol."""
    import gc
    import weakref

    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    from router.net.handshake import read_upgrade

    station, node_side = trio.testing.memory_stream_pair()
    client = ClientProtocol(parse_uri("ws://node.test/ocpp/CS-1"))
    client.send_request(client.connect())
    await station.send_all(b"".join(client.data_to_send()))
    gc.disable()
    try:
        upgrade = await read_upgrade(node_side, 65536)
        protocol = weakref.ref(upgrade._proto)
        await upgrade.reject(401, "wrong credentials")
        del upgrade
        assert protocol() is None
        assert b"401" in await station.receive_some(4096)
    finally:
        gc.enable()


async def test_open_tcp_connects_to_addresses_straight_and_to_names_as_trio_does() -> None:
    from router.net.handshake import open_tcp

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    for host in ("127.0.0.1", "localhost"):
        stream = await open_tcp(host, port)
        accepted.append(await listeners[0].accept())
        await stream.send_all(b"x")
        assert await accepted[-1].receive_some(1) == b"x"
        await stream.aclose()
    for listener in listeners:
        await listener.aclose()
    with pytest.raises(OSError):
        await open_tcp("127.0.0.1", port)  # nothing listens there now
    for stream in accepted:
        await stream.aclose()


async def test_close_stream_closes_a_tcp_socket_in_place_and_any_other_stream_too() -> None:
    """A plain TCP stream is closed at once (the far end reads EOF, a reader waiting on it
    is woken with ClosedResourceError) and without a checkpoint, so a wind-down of
    thousands of sessions pays no cancel scope per socket; a wrapped stream (TLS) goes
    through trio.aclose_forcefully."""
    from router.net.wslink import close_stream

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    ours = await trio.open_tcp_stream("127.0.0.1", port)
    theirs = await listeners[0].accept()
    woken: list[type[BaseException]] = []

    async def read_ours() -> None:
        try:
            await ours.receive_some(10)
        except trio.ClosedResourceError as exc:
            woken.append(type(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_ours)
        await trio.testing.wait_all_tasks_blocked()
        with trio.testing.assert_no_checkpoints():
            await close_stream(ours)
    assert woken == [trio.ClosedResourceError]
    assert ours.socket.fileno() == -1
    assert await theirs.receive_some(10) == b""  # EOF at the far end
    await close_stream(ours)  # a second close is harmless

    wrapped, far = trio.testing.memory_stream_pair()
    await close_stream(wrapped)
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.send_all(b"x")
    assert await far.receive_some(10) == b""
    await theirs.aclose()
    for listener in listeners:
        await listener.aclose()



def test_address_family_of_literals_and_names() -> None:
    import socket

    from router.net.dns import address_family as _address_family

    assert _address_family("127.0.0.1") == socket.AF_INET
    assert _address_family("::1") == socket.AF_INET6
    assert _address_family("csms.example") is None
    assert _address_family("127.0.0.1") == socket.AF_INET  # cached answers agree
