"""One WebSocket link (router/net/wslink.py) over memory streams: whole messages both ways,
fragments reassembled, text checked for UTF-8, close codes reported consistently."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from router.net.wslink import LinkClosed
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
