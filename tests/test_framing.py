"""A link's own framing (router/net/framing.py): it reads whole data frames and writes
whole text frames itself, every other frame through websockets, with the outcome
websockets gives alone.

Reading: whatever the bytes (valid frames, faulty ones, hostile ones) and however they
are cut into reads, a link with its framing delivers, sends and closes exactly as the
same link without it fed one byte at a time. The streams are written here byte by byte,
since websockets' own serializer refuses the faulty frames this needs. Writing: every
frame the link makes is the frame websockets makes, but for the mask's random key.
"""

from __future__ import annotations

import itertools
import socket
import zlib
from collections.abc import Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.http11 import Request
from websockets.protocol import Protocol as WsProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from router.net.compression import SMALLEST_COMPRESSED, Wire, client_extensions, server_extensions
from router.net.framing import Framing
from router.net.handshake import HandshakeFailed, read_upgrade
from router.net.wslink import WsLink
from router.wire.frames import SEND, Frame
from tests.memory_ws import ws_pair

LIMIT = 200  # the links' message size limit, so that some frames exceed it
MASK = b"\x37\xfa\x21\x3d"

# the extensions of the reading link and of its far end, as ws_pair takes them
Extensions = tuple[list[Any] | None, list[Any] | None]
PLAIN: Extensions = (None, None)
# the node's own extension, reading each message with a fresh context: the reader reads
# whole deflated texts too
NODES_DEFLATE: dict[str, Extensions] = {
    "server": (server_extensions(True), [ClientPerMessageDeflateFactory(
        client_max_window_bits=12, server_no_context_takeover=True,
        client_no_context_takeover=True)]),
    "client": (client_extensions(True), [ServerPerMessageDeflateFactory(
        server_max_window_bits=12, client_max_window_bits=12)]),
}
# websockets' stock extension: websockets reads and writes every frame
STOCK_DEFLATE: dict[str, Extensions] = {
    "server": ([ServerPerMessageDeflateFactory()], [ClientPerMessageDeflateFactory()]),
    "client": ([ClientPerMessageDeflateFactory()], [ServerPerMessageDeflateFactory()]),
}


def raw_frame(first: int, payload: bytes, *, masked: bool, length_bytes: int = 0) -> bytes:
    """One frame as bytes: ``first`` is the first header byte (FIN, RSV, opcode);
    ``length_bytes`` 2 or 8 writes the length in that many bytes even when fewer do (and
    in more when it does not fit)."""
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    length_bytes = max(length_bytes, 0 if length < 126 else 2 if length < 65536 else 8)
    if length_bytes == 0:
        header = bytes([first, mask_bit | length])
    elif length_bytes == 2:
        header = bytes([first, mask_bit | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + length.to_bytes(8, "big")
    if not masked:
        return header + payload
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return header + MASK + body


def deflated(text: bytes, bits: int, final: bool) -> bytes:
    """A message's permessage-deflate payload, from a fresh compressor."""
    compressor = zlib.compressobj(wbits=-bits)
    out = compressor.compress(text) + compressor.flush(zlib.Z_FINISH if final else
                                                       zlib.Z_SYNC_FLUSH)
    return out if final else out[:-4]


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> bytes:
    """One frame: mostly whole text and binary messages, with control frames, fragments,
    reserved bits, wrong masking, odd lengths, bad UTF-8 and bad compression among them."""
    kind = draw(st.sampled_from(
        ["text"] * 6 + ["binary"] * 2 + ["deflated"] * 3
        + ["big", "fragment", "continuation", "ping", "pong", "close", "bad"]))
    text = draw(st.text(max_size=120)).encode()
    length_bytes = draw(st.sampled_from([0] * 6 + [2, 8]))
    fin = 0x80 if draw(st.integers(0, 7)) else 0
    if kind == "text":
        payload = text if draw(st.integers(0, 9)) else text + b"\xff"  # bad UTF-8 too
        return raw_frame(0x81, payload, masked=masked, length_bytes=length_bytes)
    if kind == "binary":
        return raw_frame(0x82, draw(st.binary(max_size=260)), masked=masked,
                         length_bytes=length_bytes)
    if kind == "big":  # around the limit, and past it with each length encoding
        size = draw(st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1, 300, 70_000]))
        first = draw(st.sampled_from([0x81, 0x82, 0x01, 0xC1]))
        if first == 0xC1:  # within the limit on the wire, past it inflated
            return raw_frame(first, deflated(b"x" * size, 12, final=False), masked=masked)
        return raw_frame(first, b"y" * size, masked=masked, length_bytes=length_bytes)
    if kind == "deflated":
        if draw(st.integers(0, 5)):
            payload = deflated(text * draw(st.integers(1, 4)), draw(st.sampled_from([9, 12, 15])),
                               final=not draw(st.integers(0, 4)))
        else:
            payload = draw(st.binary(max_size=40))  # not a deflate stream
        return raw_frame(fin | 0x40 | draw(st.sampled_from([1, 1, 1, 2, 0])), payload,
                         masked=masked, length_bytes=length_bytes)
    if kind == "fragment":
        return raw_frame(draw(st.sampled_from([0x01, 0x02, 0x41])), text, masked=masked)
    if kind == "continuation":
        return raw_frame(fin, text, masked=masked)
    if kind in ("ping", "pong"):
        first = fin | (0x09 if kind == "ping" else 0x0A)
        return raw_frame(first, text[:draw(st.sampled_from([125, 125, 200]))], masked=masked)
    if kind == "close":
        code = draw(st.sampled_from([1000, 1001, 1008, 3000, 999, 1005]))
        body = code.to_bytes(2, "big") + text[:60] if draw(st.integers(0, 5)) else b"\x03"
        return raw_frame(0x88, body, masked=masked)
    # reserved bits, a reserved opcode, or the wrong masking
    first = draw(st.sampled_from([0x81 | 0x20, 0x81 | 0x10, 0x83, 0x8B, 0x81]))
    wrong = first == 0x81
    return raw_frame(first, text, masked=masked != wrong, length_bytes=length_bytes)


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> tuple[bytes, list[int], bool]:
    """Bytes from a far end, where its reads end, and whether the stream ends after."""
    stream = b"".join(draw(st.lists(frames(masked), min_size=1, max_size=8)))
    stream += draw(st.sampled_from([b""] * 4 + [b"\x81", b"\x81\xfe\x00", b"\x82\x7f\x00"]))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))))
    return stream, cuts, draw(st.booleans())


def reading_link(side: str, extensions: Extensions,
                 limit: str = "message") -> tuple[WsLink, socket.socket]:
    """A link that reads as ``side`` (a server reads masked frames), and its far end's
    socket, where what the link sends arrives. ``limit``: which of websockets' two size
    limits is LIMIT (the node sets the message's only)."""
    readers, far = extensions
    if side == "server":
        far_link, link = ws_pair(sockets=True, client_extensions=far, server_extensions=readers)
    else:
        link, far_link = ws_pair(sockets=True, client_extensions=readers, server_extensions=far)
    if limit == "message":
        link.protocol.max_message_size = LIMIT
    else:
        link.protocol.max_message_size = LIMIT + 100
        link.protocol.max_fragment_size = LIMIT
    assert far_link.sock is not None
    far_link.sock.setblocking(False)
    return link, far_link.sock


def outcome(link: WsLink, reads: Sequence[bytes], eof: bool, far: socket.socket) -> object:
    """What the link made of these reads: messages, bytes sent, how it ended."""
    messages: list[object] = []
    for data in [*reads, b""] if eof else reads:
        for message in link.feed(data, 0.0):
            messages.append((type(message).__name__, message, getattr(message, "wire", None)))
    sent = b""
    try:
        while chunk := far.recv(65536):
            sent += chunk
    except BlockingIOError:
        pass
    proto = link.protocol
    sent += b"".join(proto.data_to_send())
    return (messages, unmasked(sent), proto.state, link.ended(), proto.close_rcvd,
            proto.close_sent)


def unmasked(sent: bytes) -> list[tuple[int, bytes]]:
    """The frames a link sent (first header byte, payload): a client's masks are random."""
    out = []
    pos = 0
    while pos < len(sent):
        first, second = sent[pos], sent[pos + 1]
        length, pos = second & 0x7F, pos + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length, pos = int.from_bytes(sent[pos:pos + size], "big"), pos + size
        mask = b"\0\0\0\0"
        if second & 0x80:
            mask, pos = sent[pos:pos + 4], pos + 4
        out.append((first, bytes(b ^ mask[i % 4] for i, b in enumerate(sent[pos:pos + length]))))
        pos += length
    return out


def check_reads_as_websockets(side: str, extensions: Extensions,
                              case: tuple[bytes, list[int], bool], limit: str = "message") -> None:
    stream, cuts, eof = case
    link, far = reading_link(side, extensions, limit)
    assert link._framing is not None
    reference, reference_far = reading_link(side, extensions, limit)
    reference._framing = None
    bounds = [0, *cuts, len(stream)]
    reads = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    expected = outcome(reference, [stream[i:i + 1] for i in range(len(stream))], eof,
                       reference_far)
    assert outcome(link, reads, eof, far) == expected


@pytest.mark.parametrize("limit", ["message", "fragment"])
@pytest.mark.parametrize("side", ["server", "client"])
@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_a_link_reads_as_websockets_does_byte_by_byte(side: str, limit: str,
                                                      data: st.DataObject) -> None:
    check_reads_as_websockets(side, PLAIN, data.draw(streams(side == "server")), limit)


@pytest.mark.parametrize("side", ["server", "client"])
@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_with_the_nodes_deflate_too(side: str, data: st.DataObject) -> None:
    link, _ = reading_link(side, NODES_DEFLATE[side])
    assert link.protocol.extensions and link._framing is not None
    assert link._framing._inflate is not None
    check_reads_as_websockets(side, NODES_DEFLATE[side], data.draw(streams(side == "server")))


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_link_with_websockets_stock_deflate_is_framed_by_websockets(side: str) -> None:
    """Its encode compresses what the node's own sends as it is: no framing here."""
    link, far = reading_link(side, STOCK_DEFLATE[side])
    assert link.protocol.extensions and link._framing is None
    link.put_frame(Frame(SEND, "1", action="Heartbeat", payload={}), None)
    frame = raw_frame(0x81, b"[2,\"2\",\"Heartbeat\",{}]", masked=side == "server")
    assert link.feed(frame, 0.0) == ['[2,"2","Heartbeat",{}]']
    [(first, _)] = unmasked(far.recv(100))
    assert first == 0xC1  # compressed by websockets, 23 bytes and all


def test_whole_data_frames_do_not_go_through_websockets_parser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader is on for the websockets installed (it needs 16 or later): a whole text
    frame, or several in one read, never reach ``receive_data``; a ping does."""
    link, far = reading_link("server", PLAIN)
    given_to_websockets: list[bytes] = []
    receive = link.protocol.receive_data

    def spy(data: bytes) -> None:
        given_to_websockets.append(bytes(data))
        receive(data)

    monkeypatch.setattr(link.protocol, "receive_data", spy)
    one = raw_frame(0x81, b'[2,"1","Heartbeat",{}]', masked=True)
    assert link.feed(one + one, 0.0) == ['[2,"1","Heartbeat",{}]'] * 2
    assert given_to_websockets == []
    ping = raw_frame(0x89, b"p", masked=True)
    assert link.feed(ping + one, 0.0) == ['[2,"1","Heartbeat",{}]']
    assert given_to_websockets == [ping]
    assert far.recv(100) == b"\x8a\x01p"  # websockets' pong


def test_a_frame_split_across_reads_is_read_whole() -> None:
    """A header cut inside its extended length, and a payload cut anywhere."""
    link, _ = reading_link("client", PLAIN)
    frame = raw_frame(0x82, bytes(range(150)), masked=False, length_bytes=8)
    assert link.feed(frame[:3], 0.0) == []
    assert link.feed(frame[3:20], 0.0) == []
    assert link.feed(frame[20:] + frame, 0.0) == [bytes(range(150))] * 2


def _server_after(early: bytes) -> ServerProtocol:
    """A server protocol that read an upgrade request and ``early`` in the same read, then
    answered 101 (what ``read_upgrade`` now refuses: the protocol as it would be)."""
    client = ClientProtocol(parse_uri("ws://csms.test/ocpp/CS-1"))
    server = ServerProtocol()
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()) + early)
    request = server.events_received()[0]
    assert isinstance(request, Request)
    server.send_response(server.accept(request))
    return server


def test_a_link_opened_inside_a_frame_is_read_by_websockets_alone() -> None:
    """A client that sent a frame's first bytes with its upgrade request: websockets has
    begun that frame, so the link's reader stays off and websockets reads the rest."""
    frame = raw_frame(0x81, b"early", masked=True)
    server = _server_after(frame[:6])  # the header and the mask
    assert server.state is State.OPEN
    assert Framing.of(server) is None
    near, far = socket.socketpair()
    link = WsLink(trio.SocketStream(trio.socket.from_stdlib_socket(near)), server)
    assert link._framing is None
    assert link.feed(frame[6:] + raw_frame(0x81, b"next", masked=True), 0.0) == ["early", "next"]
    far.close()


def websockets_frame(proto: WsProtocol, payload: bytes) -> list[tuple[int, bytes]]:
    proto.send_text(payload)
    return unmasked(b"".join(proto.data_to_send()))


@pytest.mark.parametrize("extensions", ["plain", "deflate"])
@pytest.mark.parametrize("side", ["server", "client"])
@settings(max_examples=60, deadline=None)
@given(length=st.sampled_from([0, 1, 125, 126, 127, 200, 65535, 65536, 70_000])
       | st.integers(0, 300), wire=st.booleans())
def test_a_text_frame_is_the_frame_websockets_makes(side: str, extensions: str, length: int,
                                                    wire: bool) -> None:
    """Plain texts of every length encoding; with the node's deflate, a payload that goes
    as it came (RSV1) and one too short to compress, and none framed that must be
    compressed."""
    chosen = PLAIN if extensions == "plain" else NODES_DEFLATE[side]
    link, _ = reading_link(side, chosen)
    framing = link._framing
    assert framing is not None
    payload = bytes(i % 251 for i in range(length))
    if wire and extensions == "deflate":
        payload = Wire(deflated(payload, 12, final=False))
    framed = framing.text_frame(payload)
    if extensions == "deflate" and type(payload) is not Wire and length >= SMALLEST_COMPRESSED:
        assert framed is None  # websockets compresses it
        return
    assert framed is not None
    assert unmasked(framed) == websockets_frame(link.protocol, payload)
    assert (framed[1] & 0x80 != 0) is (side == "client")  # a client masks, §5.3


def test_no_frame_is_made_here_while_websockets_sends_a_message_in_fragments() -> None:
    link, _ = reading_link("client", PLAIN)
    assert link._framing is not None
    link.protocol.send_text(b"first part", fin=False)
    assert link._framing.text_frame(b"text") is None


def test_a_frame_made_here_goes_behind_what_websockets_has_waiting() -> None:
    """A pong websockets queued, not yet written: the next text goes after it."""
    link, far = reading_link("server", PLAIN)
    link.protocol.receive_data(raw_frame(0x89, b"p", masked=True))
    assert link.protocol.writes
    link.put_frame(Frame(SEND, "1", action="Heartbeat", payload={}), None)
    assert unmasked(far.recv(100)) == [(0x8A, b"p"), (0x81, b'[6,"1","Heartbeat",{}]')]


@pytest.mark.parametrize("early", [b"\x83\x80" + MASK, b"\x81\x01x",
                                   raw_frame(0x88, b"\x03\xe8", masked=True)])
def test_a_protocol_that_failed_or_closed_before_it_opened_is_not_framed(early: bytes) -> None:
    """A reserved opcode, an unmasked frame or a close after the request: websockets'
    parser discards from then on, waiting where a parser between frames waits; such a
    link is not framed, so nothing it sends later is delivered (red-team review)."""
    server = _server_after(early)
    assert server.state is State.OPEN
    assert Framing.of(server) is None


async def test_data_before_the_upgrade_response_is_refused_with_400() -> None:
    """RFC 6455 §4.1: a client waits for the answer. A frame, a ping (whose pong would go
    before the answer) or a bad frame sent with the request gets 400, nothing before it."""
    for early in (raw_frame(0x81, b"early", masked=True), raw_frame(0x89, b"p", masked=True),
                  b"\x83\x80" + MASK, b"\x81\xfe"):
        client = ClientProtocol(parse_uri("ws://csms.test/ocpp/CS-1"))
        client.send_request(client.connect())
        near, far = trio.testing.memory_stream_pair()
        await far.send_all(b"".join(client.data_to_send()) + early)
        with pytest.raises(HandshakeFailed) as refused:
            await read_upgrade(near, 65536)
        assert refused.value.status == 400
        answer = await far.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert answer.endswith(b"data sent before the upgrade response\n")


def test_a_link_the_node_gave_up_delivers_nothing_read_after() -> None:
    """A link the node found dead (a write found the connection gone) reads a text and a
    close in one read: the text is not delivered, as websockets fed byte by byte would
    not deliver it (red-team review)."""
    link, _ = reading_link("server", PLAIN)
    link._connection_lost()
    read = raw_frame(0x81, b"late", masked=True) + raw_frame(0x88, b"\x03\xe8", masked=True)
    assert link.feed(read, 0.0) == []
