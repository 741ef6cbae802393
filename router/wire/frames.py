"""OCPP-J frame codec: the five message types, strict structural checks, error answers.

Decoding never raises anything but :class:`FrameError`, which carries what the node
needs to answer correctly: the message id when one could be read, the message type,
and which kind of problem it was. The error code depends on the OCPP version of the
link (see :func:`error_code`), because OCPP 1.6 and 2.x name the same faults differently.

A decoded frame holds only values that JSON and msgpack both carry unchanged, so any link
can send it on: no duplicate object keys, no NaN or infinities, no lone surrogates, no
integers beyond 64 bits, no nesting deeper than :data:`MAX_DEPTH`. A frame that breaks one
of these rules but is otherwise well formed is refused as a format error with its message
id (see :func:`refusal`).
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, NamedTuple

CALL = 2
CALLRESULT = 3
CALLERROR = 4
CALLRESULTERROR = 5
SEND = 6

#: OCPP-J limits a message id to 36 characters (a UUID fits exactly).
MAX_MESSAGE_ID = 36

#: Number of elements for each message type on a standard (non-overlay) link.
_LENGTHS = {CALL: 4, CALLRESULT: 3, CALLERROR: 5, CALLRESULTERROR: 5, SEND: 4}


class Version(enum.Enum):
    """The OCPP version a link speaks, named by its WebSocket subprotocol."""

    V16 = "ocpp1.6"
    V201 = "ocpp2.0.1"
    V21 = "ocpp2.1"

    @classmethod
    def from_subprotocol(cls, name: str) -> Version:
        return cls(name)

    @property
    def message_types(self) -> frozenset[int]:
        """Message types this version defines (5 and 6 arrived with OCPP 2.1)."""
        if self is Version.V21:
            return frozenset((CALL, CALLRESULT, CALLERROR, CALLRESULTERROR, SEND))
        return frozenset((CALL, CALLRESULT, CALLERROR))


SUBPROTOCOLS = tuple(v.value for v in Version)


class Problem(enum.Enum):
    """What was wrong with a frame; mapped to a per-version CALLERROR code."""

    RPC = "rpc"  # not JSON, not an array, message id unreadable
    MESSAGE_TYPE = "message-type"  # a message type this version does not know
    FORMAT = "format"  # known type, wrong element count or element types
    BUSY = "busy"  # too many CALLs waiting on this link
    INTERNAL = "internal"  # the node could not get an answer (timeout, link lost, shutdown)
    SECURITY = "security"  # refused by policy


_CODES: dict[Problem, tuple[str, str]] = {
    # problem: (OCPP 1.6 code, OCPP 2.x code)
    Problem.RPC: ("FormationViolation", "RpcFrameworkError"),
    Problem.MESSAGE_TYPE: ("FormationViolation", "MessageTypeNotSupported"),
    Problem.FORMAT: ("FormationViolation", "FormatViolation"),
    Problem.BUSY: ("GenericError", "GenericError"),
    Problem.INTERNAL: ("InternalError", "InternalError"),
    Problem.SECURITY: ("SecurityError", "SecurityError"),
}


def error_code(problem: Problem, version: Version) -> str:
    """The CALLERROR code for a problem on a link of this OCPP version."""
    v16, v2x = _CODES[problem]
    return v16 if version is Version.V16 else v2x


class FrameError(Exception):
    """A frame the peer sent is not valid OCPP-J (the peer's fault, never the node's)."""

    def __init__(
        self,
        problem: Problem,
        description: str,
        message_id: str | None = None,
        message_type: int | None = None,
    ) -> None:
        super().__init__(description)
        self.problem = problem
        self.description = description
        self.message_id = message_id
        self.message_type = message_type

    @property
    def wants_answer(self) -> bool:
        """Whether the sender expects a CALLERROR: never for a broken answer or SEND."""
        return self.message_type not in (CALLRESULT, CALLERROR, CALLRESULTERROR, SEND)


class Frame(NamedTuple):
    """One decoded OCPP-J message. Fields that a type does not carry are None.

    A named tuple, not a frozen dataclass: a frame is built for every message, and tuple
    construction costs a fraction of a frozen dataclass's field-by-field ``__init__``.
    """

    type: int
    id: str
    action: str | None = None
    payload: Any = None
    code: str | None = None
    description: str | None = None
    details: Any = None


# -- values both encodings carry -------------------------------------------------------------

#: The integers msgpack holds (int64 and uint64); JSON itself sets no limit.
MIN_INT = -(2**63)
MAX_INT = 2**64 - 1
_MAX_INT_DIGITS = len(str(MIN_INT))  # the sign included
#: How deep arrays and objects may nest in a frame, its own array included. msgpack packs
#: no deeper than 511 levels and JSON encoding recurses, so a value nested 600 deep would
#: decode, then fail in the writer of the link it goes out on. OCPP payloads nest less than
#: 10 deep; the limit is generous so that texts up to 512 characters need no count.
MAX_DEPTH = 256


class UnfitValue(Exception):
    """Well-formed JSON or msgpack holding a value the node must not pass on; raised while
    parsing, turned into a :class:`FrameError` by the decoders."""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """An object from its key-value pairs (a parser's hook), refusing a key that appears
    twice: a receiver that keeps the first sees another value than one that keeps the last."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise UnfitValue(f"an object holds the key {_short(key)} twice")
            seen.add(key)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity unless told not to


def _json_int(digits: str) -> int:
    if len(digits) < _MAX_INT_DIGITS - 1:  # up to 18 digits: no need to compare
        return int(digits)
    # the length first: converting thousands of digits takes quadratic time
    if len(digits) <= _MAX_INT_DIGITS:
        value = int(digits)
        if MIN_INT <= value <= MAX_INT:
            return value
    raise UnfitValue(f"the integer {_short(digits)[1:-1]} does not fit in 64 bits")


def _json_float(digits: str) -> float:
    value = float(digits)
    if math.isinf(value):  # 1e400 would travel on as Infinity, which is not JSON
        raise UnfitValue(f"the number {_short(digits)[1:-1]} is too large for a float")
    return value


def _stand_in_int(digits: str) -> int:
    # the value is refused anyway; this spares converting thousands of digits
    if len(digits) <= _MAX_INT_DIGITS:
        return int(digits)
    return MIN_INT - 1 if digits.startswith("-") else MAX_INT + 1


# The checks run inside the C parser, as hooks. On a 300-byte MeterValues (4 objects, 2
# integers) they add about 18,000 instructions to the parse; a walk over the decoded value
# would add 30,000, a regex scan of the text for long runs of digits 50,000 (callgrind).
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=unique_keys, parse_constant=_no_constant,
                                parse_int=_json_int, parse_float=_json_float)
# Reads an unfit text once more, for the message id and type to answer with.
_LENIENT_JSON = json.JSONDecoder(parse_constant=_no_constant, parse_int=_stand_in_int)


def _encodes(text: str) -> bool:
    """Whether a str holds no lone surrogate, so that it encodes to UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def value_flaw(value: Any) -> str | None:
    """Why ``value`` cannot travel unchanged as both JSON and msgpack, or None if it can.

    A dict cannot show a duplicate key any more: parsers refuse those with
    :func:`unique_keys` as their object hook.
    """
    level = [value]
    for _ in range(MAX_DEPTH):  # one level of nesting at a time
        deeper: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str:
                # isascii() costs nothing; only a non-ASCII str can hold a surrogate
                if not item.isascii() and not _encodes(item):
                    return f"the string {_short(item)} holds a lone surrogate"
            elif kind is dict:
                for key in item:
                    if type(key) is not str:
                        return f"an object key must be a string, not {type(key).__name__}"
                    if not key.isascii() and not _encodes(key):
                        return f"the key {_short(key)} holds a lone surrogate"
                deeper.extend(item.values())
            elif kind is list:
                deeper.extend(item)
            elif kind is int:
                if not MIN_INT <= item <= MAX_INT:
                    return f"the integer {_short(item)} does not fit in 64 bits"
            elif kind is float:
                if not math.isfinite(item):
                    return f"the number {item} is not JSON"
            elif item is not None and kind is not bool:
                return f"a value of type {kind.__name__} is not JSON"
        if not deeper:
            return None
        level = deeper
    return f"arrays and objects nest deeper than {MAX_DEPTH} levels"


def _parse(text: str) -> Any:
    try:
        value, end = _STRICT_JSON.raw_decode(text)
    except json.JSONDecodeError:
        return _STRICT_JSON.decode(text)  # space before the value, or not JSON: decode() says
    if end != len(text):
        return _STRICT_JSON.decode(text)  # space after the value, or something else
    return value


def _may_hold_surrogate(text: str) -> bool:
    # Text that is valid UTF-8 (all a link delivers) makes one only from an escape, and
    # "\u00e9" and its kind need no walk.
    if "\\" in text and ("\\ud" in text or "\\uD" in text):
        return True
    if text.isascii():
        return False
    try:
        text.encode("latin-1")  # a copy, when all characters are Latin-1 (é, ü, ß...)
    except UnicodeEncodeError:
        return not _encodes(text)
    return False


def _may_nest_too_deep(text: str) -> bool:
    # Each level takes two characters at least, so most frames skip counting brackets.
    return len(text) > 2 * MAX_DEPTH and text.count("[") + text.count("{") > MAX_DEPTH


def _text(data: bytes) -> str:
    try:
        # strict, unlike json.loads, which lets encoded surrogates through
        return data.decode(json.detect_encoding(data))
    except UnicodeDecodeError as exc:
        raise FrameError(Problem.RPC, f"not valid JSON: {exc}") from None


def load_json(text: str | bytes) -> tuple[Any, str | None]:
    """Parse JSON text for a decoder: the value, and why it must not be passed on (None when
    it may). Text that is not JSON at all, NaN included, raises FrameError (RPC)."""
    if not isinstance(text, str):
        text = _text(text)
    try:
        value = _parse(text)
    except UnfitValue as exc:
        try:
            return _LENIENT_JSON.decode(text), str(exc)
        except (ValueError, RecursionError) as again:
            raise FrameError(Problem.RPC, f"not valid JSON: {again}") from None
    except (ValueError, RecursionError) as exc:
        raise FrameError(Problem.RPC, f"not valid JSON: {exc}") from None
    # most frames are short ASCII text without a backslash: the first line settles them
    if ("\\" in text or not text.isascii() or len(text) > 2 * MAX_DEPTH) and (
        _may_hold_surrogate(text) or _may_nest_too_deep(text)
    ):
        return value, value_flaw(value)
    return value, None


def refusal(flaw: str, message_id: str, message_type: int) -> FrameError:
    """The error for a well-formed frame that holds an unfit value: a format violation,
    answered with the frame's id unless the id itself cannot be sent back."""
    if not _encodes(message_id):
        return FrameError(Problem.RPC, flaw, None, message_type)
    return FrameError(Problem.FORMAT, flaw, message_id, message_type)


# -- standard frames --------------------------------------------------------------------------


def decode(text: str | bytes, version: Version) -> Frame:
    """Parse one OCPP-J message and check its structure and values for this version."""
    msg, flaw = load_json(text)
    if type(msg) is not list or not msg:
        raise FrameError(Problem.RPC, "an OCPP-J message is a non-empty JSON array")
    mtype = msg[0]
    # bool is an int subclass in Python; JSON true is not a message type
    if type(mtype) is not int:
        raise FrameError(Problem.RPC, "the message type must be an integer")
    mid = msg[1] if len(msg) > 1 else None
    if type(mid) is not str:
        raise FrameError(Problem.RPC, "the message id must be a string", None, mtype)
    if not mid or len(mid) > MAX_MESSAGE_ID:
        raise FrameError(
            Problem.RPC, f"the message id must be 1-{MAX_MESSAGE_ID} characters", None, mtype
        )
    if mtype not in version.message_types:
        raise FrameError(
            Problem.MESSAGE_TYPE,
            f"message type {mtype} is not supported on {version.value}",
            mid,
            None,  # unknown to this version: answered like any unreadable request
        )
    if len(msg) != _LENGTHS[mtype]:
        raise FrameError(
            Problem.FORMAT,
            f"message type {mtype} has {_LENGTHS[mtype]} elements, got {len(msg)}",
            mid,
            mtype,
        )
    if mtype in (CALL, SEND):
        action, payload = msg[2], msg[3]
        if type(action) is not str or not action:
            raise FrameError(Problem.FORMAT, "the action must be a non-empty string", mid, mtype)
        if type(payload) is not dict:
            raise FrameError(Problem.FORMAT, "the payload must be a JSON object", mid, mtype)
        frame = Frame(mtype, mid, action=action, payload=payload)
    elif mtype == CALLRESULT:
        if type(msg[2]) is not dict:
            raise FrameError(Problem.FORMAT, "the payload must be a JSON object", mid, mtype)
        frame = Frame(mtype, mid, payload=msg[2])
    else:
        code, description, details = msg[2], msg[3], msg[4]
        if type(code) is not str or type(description) is not str or type(details) is not dict:
            raise FrameError(
                Problem.FORMAT,
                "an error frame carries a code string, a description string and a details object",
                mid,
                mtype,
            )
        frame = Frame(mtype, mid, code=code, description=description, details=details)
    if flaw is not None:
        raise refusal(flaw, mid, mtype)  # only now: the frame's own faults are reported first
    return frame


def check_version(frame: Frame, version: Version) -> None:
    """Raise the FrameError :func:`decode` would for a frame this version does not define
    (a frame decoded elsewhere, from an overlay link, must still fit the station's link)."""
    if frame.type not in version.message_types:
        raise FrameError(
            Problem.MESSAGE_TYPE,
            f"message type {frame.type} is not supported on {version.value}",
            frame.id,
            None,
        )


def encode_parts(
    mtype: int, message_id: str, *, action: str | None = None, payload: Any = None,
    code: str | None = None, description: str | None = None, details: Any = None,
) -> str:
    """Any standard frame from its parts (used where a frame is rebuilt: a new payload, a
    rewritten id, an overlay frame delivered to a standard peer)."""
    if mtype in (CALL, SEND):
        body: list[Any] = [mtype, message_id, action, payload]
    elif mtype == CALLRESULT:
        body = [mtype, message_id, payload]
    else:
        body = [mtype, message_id, code, description, details]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def encode_frame(frame: Frame) -> str:
    """A decoded frame as compact JSON text again."""
    return encode_parts(frame.type, frame.id, action=frame.action, payload=frame.payload,
                        code=frame.code, description=frame.description, details=frame.details)


def encode_call(message_id: str, action: str, payload: dict[str, Any]) -> str:
    """A CALL frame as compact JSON text."""
    return json.dumps([CALL, message_id, action, payload], separators=(",", ":"))


def encode_result(message_id: str, payload: dict[str, Any]) -> str:
    """A CALLRESULT frame as compact JSON text."""
    return json.dumps([CALLRESULT, message_id, payload], separators=(",", ":"))


def encode_error(
    message_id: str, code: str, description: str, details: dict[str, Any] | None = None
) -> str:
    """A CALLERROR frame as compact JSON text."""
    return json.dumps(
        [CALLERROR, message_id, code, description, details or {}], separators=(",", ":")
    )


def error_answer(
    problem: Problem, version: Version, message_id: str | None, description: str
) -> str:
    """The node's CALLERROR for a problem; id ``"-1"`` when the sender's id was unreadable."""
    return encode_error(
        message_id if message_id is not None else "-1", error_code(problem, version), description
    )


def error_frame(
    problem: Problem, version: Version, message_id: str | None, description: str
) -> Frame:
    """The node's CALLERROR for a problem as a frame (see :func:`error_answer` for its text)."""
    return Frame(CALLERROR, message_id if message_id is not None else "-1",
                 code=error_code(problem, version), description=description, details={})
