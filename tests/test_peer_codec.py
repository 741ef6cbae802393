"""The per-link overlay codec: JSON and msgpack messages, batches, wrong and broken input."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.overlay.codec import ENCODINGS, PeerCodec, WrongEncoding
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    MAX_MESSAGE_ID,
    SEND,
    FrameError,
)
from router.wire.overlay_frames import MAX_HOPS, MAX_NODE_ID, OverlayFrame

BOOT = OverlayFrame(CALL, "CSMS", ("edge-1",), "m1", action="BootNotification",
                    payload={"reason": "PowerUp", "chargingStation": {"model": "X"}})
RESULT = OverlayFrame(CALLRESULT, "edge-1", ("core-1", "edge-2"), "m1",
                      payload={"status": "Accepted", "interval": 300})
ERROR = OverlayFrame(CALLERROR, "edge-1", (), "m2", code="SecurityError",
                     description="rule x", details={"rule": "x"})
RESULT_ERROR = OverlayFrame(CALLRESULTERROR, "*", ("a",), "m3", code="InternalError",
                            description="", details={})
NOTIFY = OverlayFrame(SEND, "core-1", ("edge-1",), "m4", action="NotifyPeriodicEventStream",
                      payload={"data": [1, 2.5, None, True, "ü"]})
FRAMES = [BOOT, RESULT, ERROR, RESULT_ERROR, NOTIFY]


def exactly(a: Any, b: Any) -> bool:
    """Equal, and of the same types throughout (``1 == 1.0 == True`` would hide a change)."""
    return bool(a == b and repr(a) == repr(b))


# -- JSON links -----------------------------------------------------------------------------


def test_a_json_link_sends_one_text_message_per_frame() -> None:
    codec = PeerCodec("json")
    messages = codec.encode(FRAMES)
    assert len(messages) == len(FRAMES)
    assert all(type(m) is str for m in messages)
    for message, frame in zip(messages, FRAMES, strict=True):
        assert json.loads(message) == frame.as_list()
        assert exactly(codec.decode(message), [frame])


def test_a_json_link_sends_nothing_for_no_frames() -> None:
    assert PeerCodec("json").encode([]) == []


def test_a_binary_message_on_a_json_link_is_wrong_encoding_with_close_code_1003() -> None:
    codec = PeerCodec("json")
    valid = msgpack.packb(BOOT.as_list(), use_bin_type=True)
    for message in (valid, b"", b"\xc1", json.dumps(BOOT.as_list()).encode()):
        with pytest.raises(WrongEncoding) as info:
            codec.decode(message)
        assert info.value.close_code == 1003
        assert not isinstance(info.value, FrameError)


# -- msgpack links --------------------------------------------------------------------------


def test_a_msgpack_link_sends_a_batch_as_one_binary_message() -> None:
    codec = PeerCodec("msgpack")
    messages = codec.encode(FRAMES)
    assert len(messages) == 1
    message = messages[0]
    assert type(message) is bytes
    assert msgpack.unpackb(message) == [f.as_list() for f in FRAMES]
    assert exactly(codec.decode(message), FRAMES)


def test_a_single_frame_travels_as_one_frame_not_a_batch_of_one() -> None:
    codec = PeerCodec("msgpack")
    for frame in FRAMES:
        [message] = codec.encode([frame])
        assert type(message) is bytes
        assert msgpack.unpackb(message) == frame.as_list()
        assert exactly(codec.decode(message), [frame])


def test_a_msgpack_link_also_reads_json_text() -> None:
    codec = PeerCodec("msgpack")
    for frame in FRAMES:
        [text] = PeerCodec("json").encode([frame])
        assert exactly(codec.decode(text), [frame])
    decoded = codec.decode('[2,"CSMS",["edge-1"],"m1","Heartbeat",{}]')
    assert decoded == [OverlayFrame(CALL, "CSMS", ("edge-1",), "m1", action="Heartbeat",
                                    payload={})]


def test_a_batch_keeps_the_order_of_frames_with_equal_ids() -> None:
    codec = PeerCodec("msgpack")
    frames = [BOOT._replace(payload={"n": n}) for n in range(20)]
    assert exactly(codec.decode(codec.encode(frames)[0]), frames)


# -- broken input ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[",
        "[" * 100_000,
        "{}",
        "[]",
        '"a string"',
        "2",
        "null",
        "[2]",
        '[9,"CSMS",[],"m"]',
        '[2,"CSMS",[],"m","A"]',
        '[2,"",[],"m","A",{}]',
        '[2,"CSMS",[],"","A",{}]',
        f'[2,"CSMS",[],"{"m" * (MAX_MESSAGE_ID + 1)}","A",{{}}]',
        f'[2,"{"n" * (MAX_NODE_ID + 1)}",[],"m","A",{{}}]',
        '[2,"CSMS",["edge",""],"m","A",{}]',
        '[2,"CSMS",' + json.dumps(["n"] * (MAX_HOPS + 1)) + ',"m","A",{}]',
        '[2,"CSMS",[],"m","A",[]]',
        '[true,"CSMS",[],"m","A",{}]',
        '[3,"CSMS",[],"m",null]',
        '[4,"CSMS",[],"m","c","d",[]]',
        '[[2,"CSMS",[],"m","A",{}]]',  # a batch is binary-only
    ],
)
def test_garbage_text_is_a_frame_error(encoding: str, text: str) -> None:
    with pytest.raises(FrameError):
        PeerCodec(encoding).decode(text)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # an array cut short
        b"\x93\x01\x02\x03",  # an array, not a frame
        msgpack.packb([]),
        msgpack.packb("text"),
        msgpack.packb({"a": 1}),
        msgpack.packb([2, "CSMS", [], "m", "A", {}]) + b"\x00",  # trailing data
        msgpack.packb([[2, "CSMS", [], "m", "A", {}], [3, "x"]]),  # one bad frame in a batch
        msgpack.packb([[1]] * 20_001),
        msgpack.packb([2, "CSMS", [], "m", "A", {1: 2}]),  # non-string map key
        b"\xdd\xff\xff\xff\xff",  # claims 4 billion elements
        b"\x91" * 100_000,  # nested too deep
        b"\xa3\xff\xfe\xfd",  # a str that is not UTF-8
    ],
)
def test_garbage_bytes_are_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        PeerCodec("msgpack").decode(data)


@settings(max_examples=300, derandomize=True)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_only_frame_error(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        frames = PeerCodec("msgpack").decode(data)
        assert frames and all(type(f) is OverlayFrame for f in frames)
    with pytest.raises(WrongEncoding):
        PeerCodec("json").decode(data)


@settings(max_examples=300, derandomize=True)
@given(text=st.text(max_size=100))
def test_arbitrary_text_decodes_or_raises_only_frame_error(text: str) -> None:
    for encoding in ENCODINGS:
        with contextlib.suppress(FrameError):
            frames = PeerCodec(encoding).decode(text)
            assert len(frames) == 1 and type(frames[0]) is OverlayFrame


@pytest.mark.parametrize("encoding", ["", "JSON", "cbor", "msgpack ", None])
def test_an_unknown_encoding_is_a_value_error(encoding: Any) -> None:
    with pytest.raises(ValueError, match="unknown overlay encoding"):
        PeerCodec(encoding)


def test_the_known_encodings() -> None:
    assert ENCODINGS == ("json", "msgpack")
    for name in ENCODINGS:
        assert PeerCodec(name).encoding == name


# -- round trips of generated frames --------------------------------------------------------

# Values both encodings carry: no lone surrogates (hypothesis' text() has none), integers
# msgpack can hold, no NaN (it is never equal to itself).
texts = st.text(max_size=12)
node_ids = st.text(min_size=1, max_size=MAX_NODE_ID)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | texts
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
objects = st.dictionaries(texts, values, max_size=5)


@st.composite
def overlay_frames(draw: st.DrawFn) -> OverlayFrame:
    mtype = draw(st.sampled_from([CALL, CALLRESULT, CALLERROR, CALLRESULTERROR, SEND]))
    dest = draw(node_ids | st.sampled_from(["CSMS", "*"]))
    path = tuple(draw(st.lists(node_ids, max_size=MAX_HOPS)))
    mid = draw(st.text(min_size=1, max_size=MAX_MESSAGE_ID))
    if mtype in (CALL, SEND):
        return OverlayFrame(mtype, dest, path, mid, action=draw(st.text(min_size=1, max_size=30)),
                            payload=draw(objects))
    if mtype == CALLRESULT:
        return OverlayFrame(mtype, dest, path, mid, payload=draw(objects))
    return OverlayFrame(mtype, dest, path, mid, code=draw(texts),
                        description=draw(st.text(max_size=40)), details=draw(objects))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(frames=st.lists(overlay_frames(), min_size=1, max_size=4))
def test_generated_frames_round_trip_on_both_encodings(frames: list[OverlayFrame]) -> None:
    json_link, msgpack_link = PeerCodec("json"), PeerCodec("msgpack")

    messages = json_link.encode(frames)
    assert len(messages) == len(frames) and all(type(m) is str for m in messages)
    decoded = [f for m in messages for f in json_link.decode(m)]
    assert exactly(decoded, frames)
    assert exactly([f for m in messages for f in msgpack_link.decode(m)], frames)

    [binary] = msgpack_link.encode(frames)
    assert exactly(msgpack_link.decode(binary), frames)
    for frame in frames:
        [single] = msgpack_link.encode([frame])
        assert exactly(msgpack_link.decode(single), [frame])
