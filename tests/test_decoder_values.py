"""Both frame decoders let through only values JSON and msgpack carry unchanged.

A node forwards what one link decoded onto another link, which may use the other encoding
(or a receiver that reads an ambiguous text differently). So a decoder refuses duplicate
object keys, NaN and infinities, lone surrogates, integers beyond 64 bits, nesting deeper
than msgpack packs, and msgpack's bin and ext values; everything it accepts must encode
again, on both encodings, into messages that decode to the same frame.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from policies.values import MAX_DEPTH, MAX_INT, MIN_INT, value_flaw
from router.overlay.codec import ENCODINGS, PeerCodec
from router.wire.frames import (
    CALL,
    CALLRESULT,
    Frame,
    FrameError,
    Problem,
    Version,
    decode,
    encode_frame,
    error_answer,
)
from router.wire.overlay_frames import (
    OverlayFrame,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
    from_list,
)

V16, V201 = Version.V16, Version.V201


def exactly(a: Any, b: Any) -> bool:
    """Equal, and of the same types throughout (``1 == 1.0 == True`` would hide a change)."""
    return bool(a == b and repr(a) == repr(b))


def refused(text: str | bytes, version: Version = V201) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(text, version)
    return info.value


def call(payload_text: str, message_id: str = "m1") -> str:
    return f'[2,"{message_id}","DataTransfer",{payload_text}]'


# -- standard frames: refused values, and the answer each gets -----------------------------

# A well-formed CALL holding an unfit value: a format violation, answered with its id.
UNFIT_PAYLOADS = {
    "duplicate-key": '{"key":"AuthorizationKey","value":"x","key":"HeartbeatInterval"}',
    "duplicate-key-deep": '{"data":[{"a":1},{"b":{"c":1,"c":1}}]}',
    "duplicate-empty-key": '{"":1,"":2}',
    "int-above-uint64": '{"n":18446744073709551616}',
    "int-below-int64": '{"n":-9223372036854775809}',
    "int-of-5000-digits": '{"n":' + "9" * 5000 + "}",
    "float-overflow": '{"n":1e400}',
    "float-overflow-negative": '{"n":-1.5E+999}',
    "float-of-400-digits": '{"n":' + "9" * 400 + ".0}",
    "lone-high-surrogate": '{"data":"\\ud800"}',
    "lone-low-surrogate": '{"data":"x\\uDC00y"}',
    "surrogates-reversed": '{"data":"\\ude00\\ud83d"}',
    "surrogate-in-key": '{"\\ud800":1}',
    "surrogate-in-nested-list": '{"a":[[["\\udfff"]]]}',
    "nested-too-deep": '{"a":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}",
}


@pytest.mark.parametrize(
    ("version", "code"), [(V16, "FormationViolation"), (V201, "FormatViolation")]
)
@pytest.mark.parametrize("payload", UNFIT_PAYLOADS.values(), ids=UNFIT_PAYLOADS.keys())
def test_an_unfit_value_in_a_call_is_a_format_violation_with_the_calls_id(
    payload: str, version: Version, code: str
) -> None:
    err = refused(call(payload), version)
    assert (err.problem, err.message_id, err.message_type) == (Problem.FORMAT, "m1", CALL)
    assert err.wants_answer
    answer = json.loads(error_answer(err.problem, version, err.message_id, err.description))
    assert answer[:3] == [4, "m1", code]
    assert len(err.description) < 120  # names the value, not all 5000 digits of it


def test_the_description_names_the_duplicate_key() -> None:
    err = refused(call(UNFIT_PAYLOADS["duplicate-key"]))
    assert err.description == "an object holds the key 'key' twice"


@pytest.mark.parametrize(
    "text",
    [
        '[3,"m1",{"status":"Accepted","status":"Rejected"}]',
        '[3,"m1",{"interval":18446744073709551616}]',
        '[4,"m1","GenericError","",{"a":"\\ud800"}]',
        '[4,"m1","GenericError","",{"a":1,"a":1}]',
    ],
)
def test_an_unfit_answer_is_refused_and_not_answered(text: str) -> None:
    err = refused(text)
    assert (err.problem, err.message_id) == (Problem.FORMAT, "m1")
    assert not err.wants_answer


@pytest.mark.parametrize(
    ("version", "code"), [(V16, "FormationViolation"), (V201, "RpcFrameworkError")]
)
@pytest.mark.parametrize(
    "text",
    [
        call('{"n":NaN}'),
        call('{"n":Infinity}'),
        call('{"n":-Infinity}'),
        "[NaN]",
        call('{"a":1,"a":2}') + ",",  # a duplicate, then a syntax error: not JSON first
        call('{"a":1,"a":2,"n":NaN}'),
    ],
)
def test_nan_and_infinity_are_not_json(text: str, version: Version, code: str) -> None:
    err = refused(text, version)
    assert (err.problem, err.message_id) == (Problem.RPC, None)
    assert err.description.startswith("not valid JSON")
    answer = json.loads(error_answer(err.problem, version, err.message_id, err.description))
    assert answer[:3] == [4, "-1", code]


@pytest.mark.parametrize(
    ("text", "problem", "message_id"),
    [
        # the frame's own faults are reported first, as without the unfit value
        ('[2,"m1","DataTransfer",{"a":1,"a":2},{}]', Problem.FORMAT, "m1"),
        ('[2,17,"DataTransfer",{"a":1,"a":2}]', Problem.RPC, None),
        ('[2,"m1",18446744073709551616,{}]', Problem.FORMAT, "m1"),
        ('[99999999999999999999,"m1",{}]', Problem.MESSAGE_TYPE, "m1"),
        ('[{"a":1,"a":2}]', Problem.RPC, None),
        # an id that cannot be sent back: answered like any unreadable id
        ('[2,"\\ud800","DataTransfer",{}]', Problem.RPC, None),
        ('[2,"\\udc00","DataTransfer",{"a":1,"a":2}]', Problem.RPC, None),
    ],
)
def test_the_frames_own_faults_come_first(
    text: str, problem: Problem, message_id: str | None
) -> None:
    err = refused(text)
    assert (err.problem, err.message_id) == (problem, message_id)


@pytest.mark.parametrize("data", ["\ud800", "é\udfff", "中\ud800", "\ud800😀"])
def test_a_surrogate_in_an_in_process_str_is_refused(data: str) -> None:
    # a link delivers valid UTF-8 only; a str made in the process may hold anything
    err = refused(call('{"data":"' + data + '"}'))
    assert (err.problem, err.message_id) == (Problem.FORMAT, "m1")


def test_bytes_with_an_encoded_surrogate_are_not_json() -> None:
    # json.loads decodes bytes with "surrogatepass" and would let this through
    err = refused(call('{"data":"x"}').encode().replace(b'"x"', b'"\xed\xa0\x80"'))
    assert err.problem is Problem.RPC


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        ('{"n":18446744073709551615}', MAX_INT),
        ('{"n":-9223372036854775808}', MIN_INT),
        ('{"n":1e308}', 1e308),
        ('{"n":1e-400}', 0.0),
        ('{"n":-0.0}', -0.0),
        ('{"data":"\\ud83d\\ude00"}', "\U0001f600"),
        ('{"data":"\\u00e9\\\\ud800"}', "é\\ud800"),  # an escaped backslash, then text
        ('{"data":"é😀"}', "é😀"),
        ('{"data":"ßü"}', "ßü"),
        ('{"data":"中文"}', "中文"),
        ('{"data":"\\ud7ff\\ue000"}', "\ud7ff\ue000"),
    ],
)
def test_values_at_the_limits_pass(payload: str, value: Any) -> None:
    frame = decode(call(payload), V201)
    assert exactly(next(iter(frame.payload.values())), value)


@pytest.mark.parametrize("text", [call("{}") + " \n", " \t" + call("{}"), "\r\n" + call("{}")])
def test_whitespace_around_a_frame_is_still_fine(text: str) -> None:
    assert decode(text, V16) == Frame(CALL, "m1", action="DataTransfer", payload={})


def nested(levels: int) -> str:
    """JSON arrays nested ``levels`` deep; in a payload the frame adds two levels."""
    return "[" * levels + "]" * levels


def test_nesting_up_to_the_limit_passes_and_travels() -> None:
    frame = decode(call('{"a":' + nested(MAX_DEPTH - 2) + "}"), V201)
    overlay = OverlayFrame(CALL, "CSMS", (), frame.id, action=frame.action, payload=frame.payload)
    assert exactly(decode_msgpack(encode_msgpack([overlay, overlay])), [overlay, overlay])


@pytest.mark.parametrize("levels", [MAX_DEPTH - 1, 600])
def test_nesting_deeper_is_a_format_violation(levels: int) -> None:
    # 600 levels decode as JSON, but msgpack packs no deeper than 511: a writer would fail
    err = refused(call('{"a":' + nested(levels) + "}"))
    assert (err.problem, err.message_id) == (Problem.FORMAT, "m1")
    assert err.description == f"arrays and objects nest deeper than {MAX_DEPTH} levels"


def test_brackets_in_strings_are_not_nesting() -> None:
    text = json.dumps(nested(500))
    assert decode(call('{"a":' + text + "}"), V16).payload == {"a": nested(500)}


# -- overlay frames, JSON --------------------------------------------------------------------


def overlay_call(payload_text: str, path: str = '["edge-1"]') -> str:
    return f'[2,"CSMS",{path},"m1","DataTransfer",{payload_text}]'


@pytest.mark.parametrize("payload", UNFIT_PAYLOADS.values(), ids=UNFIT_PAYLOADS.keys())
def test_an_unfit_value_in_an_overlay_json_frame_is_refused(payload: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_json(overlay_call(payload))
    assert (info.value.problem, info.value.message_id) == (Problem.FORMAT, "m1")


@pytest.mark.parametrize(
    "text",
    [
        overlay_call('{"n":NaN}'),
        overlay_call('{"n":-Infinity}'),
        overlay_call("{}", path='["edge-1","\\ud800"]'),
        '[2,"\\udbff",[],"m1","DataTransfer",{}]',
        overlay_call('{"a":{"b":1,"b":2}}'),
    ],
)
def test_overlay_json_refuses_what_standard_json_refuses(text: str) -> None:
    with pytest.raises(FrameError):
        decode_json(text)


# -- overlay frames, msgpack -----------------------------------------------------------------

HEAD = [CALL, "CSMS", ["edge-1"], "m1", "DataTransfer"]


def pk(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def msgpack_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A map written pair by pair from packed keys and values (a dict cannot repeat a key)."""
    header = bytes(msgpack.Packer().pack_map_header(len(pairs)))
    return header + b"".join(k + v for k, v in pairs)


def msgpack_array(items: list[bytes]) -> bytes:
    return bytes(msgpack.Packer().pack_array_header(len(items))) + b"".join(items)


def frame_with(payload: bytes) -> bytes:
    """An overlay CALL whose payload is already packed."""
    return msgpack_array([*(pk(item) for item in HEAD), payload])


def packed(payload: Any) -> bytes:
    return frame_with(pk(payload))


UNFIT_MSGPACK = {
    "bin-value": packed({"data": b"\x00\x01"}),
    "bin-in-a-list": packed({"data": ["ok", b""]}),
    "bytes-key": packed({b"key": 1}),
    "ext-value": packed({"data": msgpack.ExtType(5, b"x")}),
    "timestamp-ext": packed({"at": msgpack.Timestamp(1_700_000_000)}),
    "nan": packed({"n": math.nan}),
    "infinity": packed({"n": -math.inf}),
    "float32-infinity": frame_with(msgpack_map(
        [(pk("n"), msgpack.packb(math.inf, use_single_float=True))])),
    "duplicate-key": frame_with(msgpack_map(
        [(pk("key"), pk("AuthorizationKey")), (pk("key"), pk("HeartbeatInterval"))])),
    "duplicate-key-deep": frame_with(msgpack_map(
        [(pk("a"), msgpack_array([msgpack_map([(pk("b"), pk(1)), (pk("b"), pk(1))])]))])),
    "nested-too-deep": frame_with(b"\x81" + pk("a") + b"\x91" * (MAX_DEPTH - 1) + b"\x90"),
}


@pytest.mark.parametrize("data", UNFIT_MSGPACK.values(), ids=UNFIT_MSGPACK.keys())
def test_an_unfit_value_in_a_msgpack_frame_is_refused(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_msgpack(data)
    assert (info.value.problem, info.value.message_id) == (Problem.FORMAT, "m1")


@pytest.mark.parametrize("data", UNFIT_MSGPACK.values(), ids=UNFIT_MSGPACK.keys())
def test_one_unfit_frame_refuses_its_batch(data: bytes) -> None:
    good = packed({"data": "ok"})
    batch = b"\x93" + good + data + good  # fixarray of three frames
    assert len(decode_msgpack(b"\x92" + good + good)) == 2
    with pytest.raises(FrameError) as info:
        decode_msgpack(batch)
    assert info.value.problem is Problem.FORMAT


def test_the_msgpack_cases_hold_what_they_claim() -> None:
    raw = msgpack.unpackb(UNFIT_MSGPACK["duplicate-key-deep"], object_pairs_hook=list)
    assert raw == [*HEAD, [("a", [[("b", 1), ("b", 1)]])]]
    raw = msgpack.unpackb(UNFIT_MSGPACK["float32-infinity"])
    assert raw == [*HEAD, {"n": math.inf}]


@pytest.mark.parametrize(
    "data",
    [
        packed({1: "int key"}),
        packed({"data": "x"}).replace(b"\xa1x", b"\xa3\xed\xa0\x80"),  # an encoded surrogate
    ],
)
def test_msgpack_the_parser_refuses_is_not_valid_msgpack(data: bytes) -> None:
    with pytest.raises(FrameError) as info:
        decode_msgpack(data)
    assert info.value.problem is Problem.RPC


@pytest.mark.parametrize(
    "value",
    [b"x", bytearray(b"x"), (1, 2), {1, 2}, 2**64, -(2**63) - 1, math.nan, math.inf,
     "\ud800", {"\udfff": 1}, {1: 1}, {b"k": 1}, msgpack.ExtType(1, b""), object()],
)
def test_from_list_refuses_what_no_encoding_carries(value: Any) -> None:
    with pytest.raises(FrameError) as info:
        from_list([*HEAD, {"deep": [value]}])
    assert (info.value.problem, info.value.message_id) == (Problem.FORMAT, "m1")
    assert value_flaw(value) is not None


@pytest.mark.parametrize(
    "value", [None, True, 0, MAX_INT, MIN_INT, -0.0, 1.5, "é😀", [], {}, {"a": [{"b": None}]}]
)
def test_value_flaw_passes_what_both_encodings_carry(value: Any) -> None:
    assert value_flaw(value) is None


def test_the_walk_stops_at_the_depth_limit_without_recursion() -> None:
    deep: Any = b"bin"
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert value_flaw(deep) == "a value of type bytes is not JSON"
    for _ in range(5000):
        deep = [deep]
    assert value_flaw(deep) == f"arrays and objects nest deeper than {MAX_DEPTH} levels"


# -- the cases of issue 12: what a link decodes, any link can send on ------------------------

ISSUE_HEAD = [CALL, "CSMS", ["edge-1"], "m1", "DataTransfer"]


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        pytest.param("json", json.dumps([*ISSUE_HEAD, {"data": "ok"}]), id="plain-json"),
        pytest.param("msgpack", msgpack.packb([*ISSUE_HEAD, {"data": "ok"}]),
                     id="plain-msgpack"),
        pytest.param("json", '[2,"CSMS",["edge-1"],"m1","DataTransfer",{"data":"\\ud800"}]',
                     id="json-lone-surrogate"),
        pytest.param("msgpack", '[2,"CSMS",[],"m1","DataTransfer",{"n":18446744073709551616}]',
                     id="json-int-beyond-msgpack"),
        pytest.param("msgpack",
                     msgpack.packb([*ISSUE_HEAD, {"data": b"\x00\x01"}], use_bin_type=True),
                     id="msgpack-bin-value"),
        pytest.param("msgpack", msgpack.packb([*ISSUE_HEAD, {b"key": 1}], use_bin_type=True),
                     id="msgpack-bytes-key"),
    ],
)
def test_a_frame_the_codec_accepts_can_be_sent_on_either_encoding(
    encoding: str, message: str | bytes
) -> None:
    try:
        frames = PeerCodec(encoding).decode(message)
    except FrameError:
        return  # refused at the door: fine
    for target in ENCODINGS:
        codec = PeerCodec(target)
        out = codec.encode(frames)  # must not raise: this runs in the link's writer task
        for m in out:
            if isinstance(m, str):
                m.encode("utf-8")  # a WebSocket text message must be valid UTF-8
        assert exactly([f for m in out for f in codec.decode(m)], frames)


@pytest.mark.parametrize(
    "message",
    [
        '[2,"CSMS",["edge-1"],"m1","DataTransfer",{"data":"\\ud800"}]',
        '[2,"CSMS",[],"m1","DataTransfer",{"n":18446744073709551616}]',
        msgpack.packb([*ISSUE_HEAD, {"data": b"\x00\x01"}], use_bin_type=True),
        msgpack.packb([*ISSUE_HEAD, {b"key": 1}], use_bin_type=True),
    ],
)
def test_the_unfit_cases_of_issue_12_are_refused(message: str | bytes) -> None:
    with pytest.raises(FrameError):
        PeerCodec("msgpack").decode(message)


# -- property: whatever a decoder accepts travels on both encodings unchanged ----------------

# JSON text built from pieces, a few of them unfit: duplicate keys, NaN, numbers too large,
# surrogate escapes (lone, paired, behind an escaped backslash) and raw surrogates. Unfit
# pieces are rare among the fit ones, so that about half the payloads pass.
_FIT_ESCAPES = ["\\ud83d\\ude00", "\\u00e9", "\\\\ud800", "\\n", "\\\\", '\\"', "\\/"]
_UNFIT_ESCAPES = ["\\ud800", "\\uDFFF", "\\ude00\\ud83d", "\ud800"]
_STRING_PIECES = st.text(st.characters(exclude_characters='"\\', min_codepoint=0x20),
                         max_size=4) | st.sampled_from(_FIT_ESCAPES * 4 + _UNFIT_ESCAPES)
json_strings = st.lists(_STRING_PIECES, max_size=3).map(lambda parts: '"' + "".join(parts) + '"')
_FIT_NUMBERS = [str(MAX_INT), str(MIN_INT), "1e-400", "-0.0", "-0", "0.5e1", "9" * 25 + ".5"]
_UNFIT_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e400", "-1E+400", str(MAX_INT + 1),
                  str(MIN_INT - 1), "9" * 400]
_JSON_NUMBERS = (st.integers(MIN_INT, MAX_INT).map(str)
                 | st.floats(allow_nan=False, allow_infinity=False).map(repr)
                 | st.sampled_from(_FIT_NUMBERS * 3 + _UNFIT_NUMBERS))
json_scalars = st.one_of(st.sampled_from(["null", "true", "false"]), _JSON_NUMBERS, json_strings)
# a few names (one escaped), so that an object of three keys now and then repeats one
_KEYS = st.sampled_from(['"a"', '"b"', '"c"', '"d"', '"e"', '"\\u0061"', '"é"']) | json_strings


def _object_text(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
    | st.lists(st.tuples(_KEYS, inner), max_size=3).map(_object_text),
    max_leaves=10,
)
json_payloads = st.lists(st.tuples(_KEYS, json_values), max_size=3).map(_object_text)

# msgpack built from packed pieces, some unfit: bin, ext, NaN and infinities, bytes keys,
# duplicate keys.
_UNFIT_MSGPACK_VALUES = [b"x", msgpack.ExtType(5, b"x"), msgpack.Timestamp(0), math.nan,
                         math.inf, -math.inf]
_MSGPACK_SCALARS = (
    st.one_of(st.none(), st.booleans(), st.integers(MIN_INT, MAX_INT), st.text(max_size=6),
              st.floats(allow_nan=False, allow_infinity=False)).map(pk)
    | st.floats(width=32, allow_nan=False, allow_infinity=False).map(
        lambda f: msgpack.packb(f, use_single_float=True))
    | st.sampled_from([None, 0, "", "é", 0.5] * 4 + _UNFIT_MSGPACK_VALUES).map(pk)
)
_MSGPACK_KEYS = (st.sampled_from(["a", "b", "c", "d", "é"] * 2 + [b"a"])
                 | st.text(max_size=4)).map(pk)
msgpack_values = st.recursive(
    _MSGPACK_SCALARS,
    lambda inner: st.lists(inner, max_size=4).map(msgpack_array)
    | st.lists(st.tuples(_MSGPACK_KEYS, inner), max_size=3).map(msgpack_map),
    max_leaves=10,
)
msgpack_payloads = st.lists(st.tuples(_MSGPACK_KEYS, msgpack_values), max_size=3).map(msgpack_map)


def assert_travels(frame: OverlayFrame) -> None:
    """The frame encodes on both encodings, and each message decodes to the same frame."""
    text = encode_json(frame)
    text.encode("utf-8")
    assert exactly(decode_json(text), frame)
    assert exactly(decode_msgpack(encode_msgpack([frame])), [frame])
    assert exactly(decode_msgpack(encode_msgpack([frame, frame])), [frame, frame])


_PROPERTY = settings(max_examples=150, derandomize=True, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(payload=json_payloads, version=st.sampled_from([V16, V201]))
def test_what_decode_accepts_travels_on_both_encodings(payload: str, version: Version) -> None:
    try:
        frame = decode(call(payload), version)
    except FrameError:
        event("refused")
        return
    event("accepted")
    again = encode_frame(frame)
    again.encode("utf-8")
    assert exactly(decode(again, version), frame)
    assert_travels(OverlayFrame(CALL, "CSMS", (), frame.id, action=frame.action,
                                payload=frame.payload))
    result = OverlayFrame(CALLRESULT, "edge-1", ("core-1",), "m1", payload=frame.payload)
    assert_travels(result)


@_PROPERTY
@given(payload=json_payloads)
def test_what_decode_json_accepts_travels_on_both_encodings(payload: str) -> None:
    try:
        frame = decode_json(overlay_call(payload))
    except FrameError:
        event("refused")
        return
    event("accepted")
    assert_travels(frame)


@_PROPERTY
@given(payload=msgpack_payloads)
def test_what_decode_msgpack_accepts_travels_on_both_encodings(payload: bytes) -> None:
    try:
        [frame] = decode_msgpack(frame_with(payload))
    except FrameError:
        event("refused")
        return
    event("accepted")
    assert_travels(frame)


def test_msgpack_that_a_node_would_not_write_is_checked_the_long_way() -> None:
    """The fast proof (canonical bytes, no suspicious type byte) only spares work: a valid
    frame packed another way (an int in 9 bytes, a float whose bytes look like a bin
    tag) decodes the same, and a duplicate key hidden by it is still refused."""
    head = b"\x96\x02\xa4CSMS\x91\xa2e1\xa1m\xa9Heartbeat"  # [2, "CSMS", ["e1"], "m", "Heartbeat",
    wide_int = head + b"\x81\xa1n\xd3" + (7).to_bytes(8, "big")  # {"n": 7 as int64}]
    [frame] = decode_msgpack(wide_int)
    assert frame.payload == {"n": 7}
    tag_like = head + b"\x81\xa1f\xcb" + struct.pack(">d", 10752.0)  # holds byte 0xc5
    assert b"\xc5" in tag_like
    [frame] = decode_msgpack(tag_like)
    assert frame.payload == {"f": 10752.0}
    duplicate = head + b"\x82\xa1k\xd3" + (1).to_bytes(8, "big") + b"\xa1k\x02"
    with pytest.raises(FrameError):
        decode_msgpack(duplicate)


def test_a_batch_is_proven_frame_by_frame() -> None:
    """A batch of many small frames holds far more arrays and maps than one frame may nest;
    it still decodes, while one frame nested too deep in the same batch refuses it."""
    small = OverlayFrame(CALL, "CSMS", ("CS-1",), "m", "Heartbeat", {"a": [{"b": [1]}]})
    frames = [small._replace(id=f"m{i}") for i in range(400)]
    assert [f.id for f in decode_msgpack(encode_msgpack(frames))] == [f.id for f in frames]
    deep: Any = 1
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    bad = msgpack.packb([f.as_list() for f in frames[:3]]
                        + [[CALL, "CSMS", ["CS-1"], "x", "DataTransfer", {"d": deep}]])
    with pytest.raises(FrameError, match="deeper"):
        decode_msgpack(bad)
