"""permessage-deflate on the node's links (router/net/compression.py): a text that came
compressed goes on as it came when the next hop's window takes it, and is deflated again
otherwise; small messages go uncompressed.

The extension is tested with plain calls on websockets' own frames; the links over real
Unix socket pairs, with websockets' stock extension at the far ends (a station, a CSMS).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode

from router.net.compression import (
    SMALLEST_COMPRESSED,
    Carried,
    CompressedText,
    Deflate,
    Wire,
    client_extensions,
    passing_bits,
    server_extensions,
)
from router.net.wslink import WsLink
from router.wire.frames import Version, decode
from tests.memory_ws import ws_pair

TAIL = b"\x00\x00\xff\xff"


def _meter_values(seed: int = 0) -> str:
    rng = random.Random(seed)
    samples = [{"value": round(rng.uniform(0, 99999), 1), "measurand": m,
                "unitOfMeasure": {"unit": "Wh"}}
               for m in ("Energy.Active.Import.Register", "Power.Active.Import", "Voltage")]
    return json.dumps([2, f"mv-{seed}", "MeterValues", {
        "evseId": 1, "meterValue": [{"timestamp": "2026-11-28T12:00:00Z",
                                      "sampledValue": samples}]}], separators=(",", ":"))


def _deflated(text: bytes, bits: int = 12, flush: int = zlib.Z_SYNC_FLUSH,
              level: int = 6) -> bytes:
    """``text`` compressed with a fresh context, as RFC 7692 puts it in a frame."""
    deflater = zlib.compressobj(level, zlib.DEFLATED, -bits)
    data = deflater.compress(text) + deflater.flush(flush)
    return data[:-4] if data.endswith(TAIL) else data


def _frame(payload: bytes, rsv1: bool = True, opcode: Opcode = Opcode.TEXT) -> WsFrame:
    return WsFrame(opcode, payload, True, rsv1)


def _receiver(bits: int = 12, takeover: bool = False) -> Deflate:
    """The node's extension on a link whose far end sends with a window of ``bits``."""
    return Deflate(not takeover, True, bits, 12, {"memLevel": 5})


# --- the extension, with plain calls -----------------------------------------------------


def test_a_whole_text_with_a_fresh_context_keeps_its_wire() -> None:
    text = _meter_values().encode()
    payload = _deflated(text)
    frame = _receiver().decode(_frame(payload), max_size=1 << 20)
    assert frame.rsv1 is False and type(frame.data) is Carried
    assert frame.data == text and frame.data.wire == payload
    assert len(text) <= 512 and frame.data.bits == 9  # reaches back at most 2^9 bytes
    carried = frame.data.text()
    assert type(carried) is CompressedText and carried == text.decode()
    assert carried.wire == payload


@pytest.mark.parametrize("case", ["final block", "context takeover", "binary", "plain"])
def test_what_is_inflated_but_not_kept_as_it_came(case: str) -> None:
    text = _meter_values().encode()
    extension = _receiver(takeover=case == "context takeover")
    if case == "final block":  # a stream closed with BFINAL: no receiver may get it as is
        frame = _frame(_deflated(text, flush=zlib.Z_FINISH))
    elif case == "binary":
        frame = _frame(_deflated(text), opcode=Opcode.BINARY)
    elif case == "plain":
        frame = _frame(text, rsv1=False)
    else:
        frame = _frame(_deflated(text))
    decoded = extension.decode(frame, max_size=1 << 20)
    assert decoded.data == text and type(decoded.data) is not Carried
    assert decoded.rsv1 is False


def test_the_size_limit_counts_inflated_bytes() -> None:
    text = json.dumps([2, "1", "DataTransfer", {"data": "x" * 5000}]).encode()
    payload = _deflated(text)
    assert len(payload) < 100  # a small frame that inflates to 5 KB
    exact = _receiver().decode(_frame(payload), max_size=len(text))
    assert exact.data == text
    with pytest.raises(PayloadTooBig):
        _receiver().decode(_frame(payload), max_size=len(text) - 1)
    with pytest.raises(ProtocolError):
        _receiver().decode(_frame(b"\xff" + payload), max_size=1 << 20)


def test_a_text_longer_than_the_next_window_is_not_kept_for_it() -> None:
    # compressed with a 2^15 window, a repeat 6 KB back: a 2^12 receiver may not take it,
    # though a fresh inflater with an output buffer this large reads it (zlib does not
    # hold a sender to the window it announced)
    text = (bytes(range(256)) * 40)[:10000] + b"".join(
        bytes([i % 251, (i * 7) % 253]) for i in range(3000)) + (bytes(range(256)) * 40)[:200]
    payload = _deflated(text, bits=15)
    frame = _receiver(bits=12).decode(_frame(payload), max_size=1 << 20)
    assert frame.data == text and type(frame.data) is Carried
    assert frame.data.bits == 14 > passing_bits([Deflate(True, True, 12, 12)])
    assert frame.data.bits <= passing_bits([Deflate(True, True, 12, 15)])


def test_a_reference_before_the_start_is_refused() -> None:
    # a stream made for a window that held earlier data: a fresh context cannot read it
    deflater = zlib.compressobj(6, zlib.DEFLATED, -12)
    deflater.compress(b"MeterValues" * 20)
    deflater.flush(zlib.Z_SYNC_FLUSH)
    payload = deflater.compress(b"MeterValues" * 20) + deflater.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ProtocolError):
        _receiver().decode(_frame(payload[:-4]), max_size=1 << 20)


def test_encode_sends_a_wire_as_it_is_and_small_texts_uncompressed() -> None:
    sender = Deflate(True, True, 12, 12, {"memLevel": 5})
    wire = Wire(_deflated(_meter_values().encode()))
    passed = sender.encode(WsFrame(Opcode.TEXT, wire))
    assert passed.rsv1 is True and passed.data is wire
    small = b'[3,"a1",{}]'
    kept = sender.encode(WsFrame(Opcode.TEXT, small))
    assert kept.rsv1 is False and kept.data == small
    large = _meter_values().encode()
    assert len(large) >= SMALLEST_COMPRESSED
    deflated = sender.encode(WsFrame(Opcode.TEXT, large))
    assert deflated.rsv1 is True
    assert zlib.decompressobj(wbits=-12).decompress(deflated.data + TAIL) == large
    ping = sender.encode(WsFrame(Opcode.PING, b"x"))
    assert ping.rsv1 is False


def test_passing_bits_needs_the_nodes_extension_without_context_takeover() -> None:
    assert passing_bits([]) == 0
    assert passing_bits([Deflate(True, True, 12, 12)]) == 12
    assert passing_bits([Deflate(True, True, 15, 10)]) == 10
    assert passing_bits([Deflate(True, False, 12, 12)]) == 0  # its window runs on
    assert passing_bits([PerMessageDeflate(True, True, 12, 12)]) == 0


FOLLOW_UP = _meter_values(99).encode()


@settings(max_examples=300, deadline=None)
@given(text=st.text(min_size=1, max_size=3000), sender_bits=st.integers(9, 15),
       receiver_bits=st.integers(9, 15), level=st.integers(0, 9),
       finish=st.booleans(), stray=st.binary(max_size=2))
def test_what_the_node_forwards_inflates_to_what_it_checked(
        text: str, sender_bits: int, receiver_bits: int, level: int, finish: bool,
        stray: bytes) -> None:
    """Whatever a fresh-context sender chose, and whatever stray bytes it put after its
    stream, the bytes the node sends on inflate, at a receiver with the window the node
    announced, to the text the node decoded: for a receiver with a fresh inflater per
    message and for one that keeps one inflater for the link, which then reads the
    node's next message right too."""
    raw = text.encode()
    payload = _deflated(raw, sender_bits, zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH,
                        level)
    if stray:  # after a whole sync flush, as a sender that forgot to take it off
        payload += TAIL + stray
    inbound = Deflate(True, True, sender_bits, 12)
    try:
        frame = inbound.decode(_frame(payload), max_size=1 << 20)
        seen = frame.data.text() if type(frame.data) is Carried else str(frame.data, "utf-8")
    except (ProtocolError, UnicodeDecodeError):
        return  # the link fails; nothing is forwarded
    if not stray:
        assert seen == text
    outbound = Deflate(True, True, 15, receiver_bits, {"memLevel": 5})
    link_bits = passing_bits([outbound])
    passes = type(seen) is CompressedText and seen.bits <= link_bits
    if not stray:
        assert passes == (not finish and len(raw) <= 1 << receiver_bits)
    sent = [outbound.encode(WsFrame(Opcode.TEXT, seen.wire if passes else seen.encode())),
            outbound.encode(WsFrame(Opcode.TEXT, FOLLOW_UP))]
    kept = zlib.decompressobj(wbits=-receiver_bits)  # one inflater for the link
    for out, expected in zip(sent, (seen.encode(), FOLLOW_UP), strict=True):
        if out.rsv1:
            fresh = zlib.decompressobj(wbits=-receiver_bits).decompress(bytes(out.data) + TAIL)
            assert fresh == expected
            assert kept.decompress(bytes(out.data) + TAIL) == expected
        else:
            assert bytes(out.data) == expected


def _kept_reads_on(text: bytes, wire: bytes) -> bool:
    """Whether a receiver with one inflater for the link reads ``wire`` as ``text`` and then
    the node's own next message right."""
    kept = zlib.decompressobj(wbits=-12)
    try:
        first = kept.decompress(wire + TAIL)
        follow = Deflate(True, True, 12, 12).encode(WsFrame(Opcode.TEXT, FOLLOW_UP)).data
        return first == text and kept.decompress(bytes(follow) + TAIL) == FOLLOW_UP
    except zlib.error:
        return False


def test_a_stream_not_left_between_blocks_is_deflated_again() -> None:
    """Every one- and two-byte tail after a whole sync flush (a red-team review found that
    ``02`` or ``04 00`` leave a block header open, and a receiver with one inflater per
    link then misreads the next message): what the node keeps as it came, such a
    receiver reads right."""
    text = _meter_values(7).encode()
    base = _deflated(text) + TAIL
    kept = refused = 0
    for stray in [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256)
                                                     for b in range(0, 256, 5)]:
        try:
            frame = _receiver().decode(_frame(base + stray), max_size=1 << 20)
        except ProtocolError:
            refused += 1
            continue
        if type(frame.data) is Carried:
            kept += 1
            assert _kept_reads_on(frame.data, frame.data.wire), stray.hex()
    assert kept and refused  # both kinds occur among these tails
    for stray in (b"\x02", b"\x04\x00"):
        frame = _receiver().decode(_frame(base + stray), max_size=1 << 20)
        assert frame.data == text and type(frame.data) is not Carried


@pytest.mark.parametrize("level", range(10))
@pytest.mark.parametrize("size", [1, 127, 128, 600, 4095, 4096, 4097])
def test_honest_streams_are_kept_as_they_came(level: int, size: int) -> None:
    text = (_meter_values(size) * 20).encode()[:size]
    frame = _receiver(bits=15).decode(_frame(_deflated(text, 15, level=level)),
                                      max_size=1 << 20)
    assert type(frame.data) is Carried and frame.data == text


# --- links over sockets, with websockets' stock extension at the far ends -----------------


NODES_OWN: list[ServerExtensionFactory] = []  # _hops: the CSMS end with the node's extension


def _station_factory(window_bits: int | bool | None = True,
                     level: int = 0) -> list[ClientPerMessageDeflateFactory]:
    """websockets' own extension, as the ``ocpp`` package's stations use it. Level 0
    (stored blocks) by default, so that the node's deflate could not make the same bytes."""
    return [ClientPerMessageDeflateFactory(client_max_window_bits=window_bits,
                                           compress_settings={"level": level})]


def _hops(station_window: int | bool | None = True,
          csms_extensions: Sequence[ServerExtensionFactory] | None = NODES_OWN,
          ) -> tuple[WsLink, WsLink, WsLink, WsLink]:
    """(station, the node's station link, the node's CSMS link, CSMS), all compressed
    unless ``csms_extensions`` is None. By default the CSMS's end is the node's own
    extension, which keeps what it received as it came, to compare."""
    station, node_station = ws_pair(sockets=True,
                                    client_extensions=_station_factory(station_window),
                                    server_extensions=server_extensions(True))
    node_backend, csms = ws_pair(
        sockets=True, client_extensions=client_extensions(csms_extensions is not None),
        server_extensions=server_extensions(True) if csms_extensions is NODES_OWN
        else csms_extensions)
    return station, node_station, node_backend, csms


async def _forwarded(node_in: WsLink, node_out: WsLink,
                     far: WsLink) -> tuple[str | bytes, str | bytes]:
    """The next message on the node's link ``node_in``, forwarded unchanged on ``node_out``
    (the forwarding loop's write), and what the far end of ``node_out`` got."""
    got = await node_in.get_message()
    node_out.put_frame(decode(got, Version.V201), got)
    return got, await far.get_message()


async def test_a_text_goes_on_as_it_came_when_the_windows_fit() -> None:
    station, node_station, node_backend, csms = _hops()
    text = _meter_values(1)
    await station.send_message(text)
    got = await node_station.get_message()
    assert type(got) is CompressedText and got == text
    # the task's path (send_frame) and the loop's (put_frame)
    await node_backend.send_frame(decode(got, Version.V201), got)
    node_backend.put_frame(decode(got, Version.V201), got)
    for _ in range(2):
        at_csms = await csms.get_message()
        assert type(at_csms) is CompressedText and at_csms == text
        assert at_csms.wire == got.wire  # the station's bytes, not the node's deflate


async def test_a_text_longer_than_the_next_window_is_deflated_again() -> None:
    # a station that does not offer client_max_window_bits compresses with 2^15 bytes;
    # what counts is how far the text can reach back, not what the sender announced
    station, node_station, node_backend, csms = _hops(station_window=None)
    for size in (3000, 6000):
        text = json.dumps([2, f"dt-{size}", "DataTransfer", {
            "vendorId": "x", "data": "".join(random.Random(size).choice("abcdef0123456789")
                                             for _ in range(size))}])
        await station.send_message(text)
        got, at_csms = await _forwarded(node_station, node_backend, csms)
        assert type(got) is CompressedText
        assert at_csms == text and type(at_csms) is CompressedText
        # within 2^12 bytes it goes on as it came; past them, the node deflates it
        assert (at_csms.wire == got.wire) == (size < 4096)


async def test_a_changed_or_small_text_is_encoded_here() -> None:
    station, node_station, node_backend, csms = _hops()
    await station.send_message(_meter_values(3))
    got = await node_station.get_message()
    frame = decode(got, Version.V201)
    node_backend.put_frame(frame, None)  # rebuilt by the node (a firewall rewrite)
    at_csms = await csms.get_message()
    assert json.loads(at_csms) == json.loads(got) and type(at_csms) is CompressedText
    assert at_csms.wire != got.wire
    # a small text goes out with RSV1 clear: a plain str at the far end
    answer = '[3,"mv-3",{}]'
    await csms.send_message(answer)
    small, back = await _forwarded(node_backend, node_station, station)
    assert small == answer and type(small) is str
    assert back == answer and type(back) is str


async def test_a_link_without_compression_gets_the_text() -> None:
    station, node_station, node_backend, csms = _hops(csms_extensions=None)
    text = _meter_values(4)
    await station.send_message(text)
    got, at_csms = await _forwarded(node_station, node_backend, csms)
    assert type(got) is CompressedText
    assert at_csms == text and type(at_csms) is str


async def test_a_final_block_from_the_station_is_deflated_again() -> None:
    station, node_station, node_backend, csms = _hops()
    text = _meter_values(5)
    sock = station.sock
    assert sock is not None
    # written past the station's extension: one frame whose stream ends with BFINAL
    payload = _deflated(text.encode(), flush=zlib.Z_FINISH)
    assert 126 <= len(payload) < 1 << 16
    mask = b"\x01\x02\x03\x04"
    sock.send(bytes([0xC1, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask
              + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    got, at_csms = await _forwarded(node_station, node_backend, csms)
    assert got == text and type(got) is str
    assert at_csms == text and type(at_csms) is CompressedText


async def test_a_csms_with_websockets_defaults_is_passed_on_to_the_station() -> None:
    # the CSMS end: websockets' stock server extension (the ``ocpp`` package's CSMS)
    station, node_station, node_backend, csms = _hops(csms_extensions=[
        ServerPerMessageDeflateFactory(server_max_window_bits=12, client_max_window_bits=12)])
    text = _meter_values(6).replace('[2,', '[3,', 1).replace(',"MeterValues"', '', 1)
    # websockets' stock extension deflates even 14 bytes; the node passes both on as is
    for sent in (text, '[3,"mv-6",{}]'):
        await csms.send_message(sent)
        got, at_station = await _forwarded(node_backend, node_station, station)
        assert type(got) is CompressedText and got == sent
        assert at_station == sent
