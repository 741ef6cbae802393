"""Unit tests of the OCPP-J codec: no network."""

from __future__ import annotations

import contextlib
import json
from typing import Any

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
    Version,
    decode,
    encode_call,
    encode_error,
    encode_result,
    error_answer,
    error_code,
)

V16, V201, V21 = Version.V16, Version.V201, Version.V21


def test_all_five_types_decode_on_21() -> None:
    assert decode('[2,"a","Heartbeat",{}]', V21).action == "Heartbeat"
    assert decode('[3,"a",{"x":1}]', V21).payload == {"x": 1}
    err = decode('[4,"a","GenericError","boom",{}]', V21)
    assert (err.type, err.code, err.description) == (CALLERROR, "GenericError", "boom")
    assert decode('[5,"a","InternalError","",{}]', V21).type == CALLRESULTERROR
    assert decode('[6,"a","NotifyPeriodicEventStream",{}]', V21).type == SEND


@pytest.mark.parametrize("version", [V16, V201])
@pytest.mark.parametrize("mtype", [5, 6])
def test_types_5_and_6_only_exist_on_21(version: Version, mtype: int) -> None:
    text = json.dumps([mtype, "a", "X", {}] if mtype == 6 else [mtype, "a", "c", "d", {}])
    with pytest.raises(FrameError) as info:
        decode(text, version)
    assert info.value.problem is Problem.MESSAGE_TYPE
    assert info.value.message_id == "a"
    assert info.value.wants_answer


@pytest.mark.parametrize(
    ("text", "problem", "message_id", "wants_answer"),
    [
        ("not json", Problem.RPC, None, True),
        ("{}", Problem.RPC, None, True),
        ("[]", Problem.RPC, None, True),
        ('["2","a","Heartbeat",{}]', Problem.RPC, None, True),
        ("[true,\"a\",\"Heartbeat\",{}]", Problem.RPC, None, True),
        ('[2,1,"Heartbeat",{}]', Problem.RPC, None, True),
        ('[2,"","Heartbeat",{}]', Problem.RPC, None, True),
        ('[2,"' + "x" * 37 + '","Heartbeat",{}]', Problem.RPC, None, True),
        ('[99,"a"]', Problem.MESSAGE_TYPE, "a", True),
        ('[2,"a","Heartbeat"]', Problem.FORMAT, "a", True),
        ('[2,"a",5,{}]', Problem.FORMAT, "a", True),
        ('[2,"a","Heartbeat",[]]', Problem.FORMAT, "a", True),
        ('[3,"a",[]]', Problem.FORMAT, "a", False),
        ('[3,"a",{},1]', Problem.FORMAT, "a", False),
        ('[4,"a",1,"d",{}]', Problem.FORMAT, "a", False),
        ('[3,5,{}]', Problem.RPC, None, False),
    ],
)
def test_structural_errors(
    text: str, problem: Problem, message_id: str | None, wants_answer: bool
) -> None:
    with pytest.raises(FrameError) as info:
        decode(text, V201)
    assert info.value.problem is problem
    assert info.value.message_id == message_id
    assert info.value.wants_answer is wants_answer


def test_error_codes_differ_by_version() -> None:
    assert error_code(Problem.RPC, V16) == "FormationViolation"
    assert error_code(Problem.RPC, V201) == "RpcFrameworkError"
    assert error_code(Problem.MESSAGE_TYPE, V21) == "MessageTypeNotSupported"
    assert error_code(Problem.FORMAT, V201) == "FormatViolation"
    assert error_code(Problem.INTERNAL, V16) == "InternalError"
    assert json.loads(error_answer(Problem.RPC, V201, None, "x")) == [
        4, "-1", "RpcFrameworkError", "x", {}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)
# What decode lets through: integers msgpack holds, finite floats (text() has no surrogates).
carried_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, derandomize=True)
@given(value=json_values, version=st.sampled_from(list(Version)))
def test_decode_raises_only_frame_errors(value: Any, version: Version) -> None:
    try:
        frame = decode(json.dumps(value), version)
    except FrameError:
        return
    assert frame.type in version.message_types


@settings(max_examples=200, derandomize=True)
@given(text=st.text(max_size=200), version=st.sampled_from(list(Version)))
def test_arbitrary_text_raises_only_frame_errors(text: str, version: Version) -> None:
    with contextlib.suppress(FrameError):
        decode(text, version)


@settings(max_examples=200, derandomize=True)
@given(
    mid=st.text(min_size=1, max_size=36),
    action=st.text(min_size=1, max_size=30),
    payload=st.dictionaries(st.text(max_size=8), carried_values, max_size=4),
)
def test_encoders_round_trip(mid: str, action: str, payload: dict[str, Any]) -> None:
    call = decode(encode_call(mid, action, payload), V16)
    assert (call.type, call.id, call.action, call.payload) == (CALL, mid, action, payload)
    result = decode(encode_result(mid, payload), V201)
    assert (result.type, result.payload) == (CALLRESULT, payload)
    err = decode(encode_error(mid, "GenericError", action, payload), V21)
    assert (err.code, err.description, err.details) == ("GenericError", action, payload)


def test_deeply_nested_json_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        decode("[" * 100_000 + "]" * 100_000, V201)
