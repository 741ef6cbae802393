"""Unit tests of the overlay frame codec (JSON and msgpack, batches): no network."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    SEND,
    FrameError,
    Problem,
)
from router.wire.overlay_frames import (
    MAX_HOPS,
    OverlayFrame,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    from_list,
)

node_ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF),
                   min_size=1, max_size=48)
json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
payloads = st.dictionaries(st.text(max_size=10), json_scalars, max_size=5)


@st.composite
def overlay_frames(draw: st.DrawFn) -> OverlayFrame:
    mtype = draw(st.sampled_from([CALL, CALLRESULT, CALLERROR, CALLRESULTERROR, SEND]))
    common: dict[str, Any] = dict(type=mtype, dest=draw(node_ids),
                                  path=tuple(draw(st.lists(node_ids, max_size=MAX_HOPS))),
                                  id=draw(st.text(min_size=1, max_size=36)))
    if mtype in (CALL, SEND):
        return OverlayFrame(**common, action=draw(st.text(min_size=1, max_size=30)),
                            payload=draw(payloads))
    if mtype == CALLRESULT:
        return OverlayFrame(**common, payload=draw(payloads))
    return OverlayFrame(**common, code=draw(st.text(max_size=20)),
                        description=draw(st.text(max_size=40)), details=draw(payloads))


@settings(max_examples=300, derandomize=True)
@given(frame=overlay_frames())
def test_json_round_trip(frame: OverlayFrame) -> None:
    assert decode_json(encode_json(frame)) == frame


@settings(max_examples=300, derandomize=True)
@given(frames=st.lists(overlay_frames(), min_size=1, max_size=8))
def test_msgpack_round_trip_single_and_batched(frames: list[OverlayFrame]) -> None:
    assert decode_msgpack(encode_msgpack(frames)) == frames
    assert decode_msgpack(encode_msgpack(frames[:1])) == frames[:1]


def test_wire_layout_matches_the_documented_field_order() -> None:
    call = decode_json('[2,"CSMS",["edge-1"],"m1","BootNotification",{"reason":"PowerUp"}]')
    assert (call.type, call.dest, call.path, call.id, call.action) == (
        CALL, "CSMS", ("edge-1",), "m1", "BootNotification")
    err = decode_json('[4,"edge-1",["core-1"],"m1","SecurityError","rule x",{}]')
    assert (err.code, err.description, err.details) == ("SecurityError", "rule x", {})
    assert json.loads(encode_json(call.passed("core-1")))[2] == ["edge-1", "core-1"]


@pytest.mark.parametrize(
    ("msg", "problem"),
    [
        ([], Problem.RPC),
        ({"a": 1}, Problem.RPC),
        (["2", "CSMS", [], "m", "A", {}], Problem.RPC),
        ([9, "CSMS", [], "m"], Problem.MESSAGE_TYPE),
        ([2, "CSMS", [], "m", "A"], Problem.RPC),
        ([2, "CSMS", [], 5, "A", {}], Problem.RPC),
        ([2, "", [], "m", "A", {}], Problem.FORMAT),
        ([2, "CSMS", "edge-1", "m", "A", {}], Problem.FORMAT),
        ([2, "CSMS", ["x" * 49], "m", "A", {}], Problem.FORMAT),
        ([2, "CSMS", ["n"] * (MAX_HOPS + 1), "m", "A", {}], Problem.FORMAT),
        ([2, "CSMS", [], "m", "", {}], Problem.FORMAT),
        ([2, "CSMS", [], "m", "A", []], Problem.FORMAT),
        ([3, "CSMS", [], "m", []], Problem.FORMAT),
        ([4, "CSMS", [], "m", 1, "d", {}], Problem.FORMAT),
    ],
)
def test_structural_errors(msg: Any, problem: Problem) -> None:
    with pytest.raises(FrameError) as info:
        from_list(msg)
    assert info.value.problem is problem


def test_garbage_is_a_frame_error_never_a_crash() -> None:
    for data in (b"", b"\xc1", b"\x92\x01", msgpack.packb([[1]] * 20_001), b"\xdd" + b"\xff" * 4):
        with pytest.raises(FrameError):
            decode_msgpack(data)
    with pytest.raises(FrameError):
        decode_json("[" * 100_000)


@settings(max_examples=300, derandomize=True)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_frame_errors(data: bytes) -> None:
    with contextlib.suppress(FrameError):
        decode_msgpack(data)
