"""router/channels/flow.py and the channel data frame (type 7), as plain calls."""

from __future__ import annotations

import base64
import json

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.channels.flow import ChannelFault, Inbound, Outbound
from router.wire.frames import FrameError
from router.wire.overlay_frames import (
    CHANNEL_DATA,
    MAX_CHANNEL_DATA,
    OverlayFrame,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)

# --- flow control ------------------------------------------------------------------------


def test_a_sender_stops_at_the_far_window_and_resumes_on_acknowledgement() -> None:
    out = Outbound(window=1000)
    assert out.take(600) == 0 and out.take(400) == 600
    assert out.credit() == 0
    with pytest.raises(ValueError):
        out.take(1)
    assert out.acknowledge(250) is True
    assert out.credit() == 250 and out.take(250) == 1000
    assert out.acknowledge(250) is False  # the same acknowledgement again: nothing new


@pytest.mark.parametrize("received", [-1, 1001, 100])
def test_an_acknowledgement_of_bytes_never_sent_or_going_back_is_a_fault(received: int) -> None:
    out = Outbound(window=1000, sent=1000, acked=200)
    with pytest.raises(ChannelFault):
        out.acknowledge(received)


def test_a_receiver_acknowledges_each_quarter_window_written() -> None:
    inbound = Inbound(window=1000)
    inbound.accept(0, 600)
    assert inbound.wrote(200) is None  # less than a quarter since the last
    assert inbound.wrote(100) == 300
    assert inbound.wrote(300) == 600 and inbound.buffered == 0


def test_data_out_of_order_or_over_the_window_is_a_fault() -> None:
    inbound = Inbound(window=1000)
    inbound.accept(0, 500)
    with pytest.raises(ChannelFault, match="offset 400"):
        inbound.accept(400, 10)  # a frame lost or sent twice
    with pytest.raises(ChannelFault, match="overrun"):
        inbound.accept(500, 501)  # 1001 unwritten bytes against a window of 1000
    inbound.wrote(500)
    inbound.accept(500, 1000)  # written out: the whole window is free again


@given(st.lists(st.integers(1, 300), min_size=1, max_size=60), st.integers(300, 3000))
def test_sender_and_receiver_never_disagree(chunks: list[int], window: int) -> None:
    """A sender that sends what its credit allows and a receiver that writes everything at
    once never fault, and the sender always gets credit back."""
    out, inbound = Outbound(window), Inbound(window)
    for size in chunks:
        size = min(size, out.credit())
        if size == 0:
            raise AssertionError("stalled with everything written out")
        offset = out.take(size)
        inbound.accept(offset, size)
        ack = inbound.wrote(size)
        if ack is not None:
            out.acknowledge(ack)
        assert out.sent - out.acked <= window


# --- the data frame ------------------------------------------------------------------------

FRAME = OverlayFrame(CHANNEL_DATA, "edge-7", ("core-1",), "c0ffee", payload=b"\x00\x01\xff",
                     offset=4096)


def test_data_travels_as_bin_on_msgpack_and_base64_on_json() -> None:
    packed = encode_msgpack([FRAME])
    assert msgpack.unpackb(packed)[5] == b"\x00\x01\xff"
    assert decode_msgpack(packed) == [FRAME]
    text = encode_json(FRAME)
    assert json.loads(text) == [7, "edge-7", ["core-1"], "c0ffee", 4096, "AAH/"]
    assert decode_json(text) == FRAME
    batch = encode_msgpack([FRAME, FRAME._replace(offset=4099)])
    assert [f.offset for f in decode_msgpack(batch)] == [4096, 4099]


@pytest.mark.parametrize(("items", "problem"), [
    ([7, "e", [], "c", -1, "AAAA"], "offset"),
    ([7, "e", [], "c", 1.5, "AAAA"], "offset"),
    ([7, "e", [], "c", 0, "not base64!"], "base64"),
    ([7, "e", [], "c", 0, ""], "1-65536 bytes"),
    ([7, "e", [], "c", 0, {"a": 1}], "1-65536 bytes"),
    ([7, "e", [], "c", 0, base64.b64encode(b"x" * (MAX_CHANNEL_DATA + 1)).decode()],
     "1-65536 bytes"),
    ([7, "e", [], "c", 0], "has 6 elements"),
])
def test_malformed_data_frames_are_refused(items: list[object], problem: str) -> None:
    with pytest.raises(FrameError, match=problem):
        decode_json(json.dumps(items))


def test_bytes_stay_refused_in_every_other_frame_type() -> None:
    """Only a channel's data may be bytes: a CALL carrying bin has no JSON form."""
    packed = msgpack.packb([2, "e", [], "id1", "Heartbeat", {"x": b"\x00"}], use_bin_type=True)
    with pytest.raises(FrameError):
        decode_msgpack(packed)
