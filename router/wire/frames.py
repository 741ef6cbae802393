"""OCPP-J frame codec: the five message types, strict structural checks, error answers.

Decoding never raises anything but :class:`FrameError`, which carries what the node
needs to answer correctly: the message id when one could be read, the message type,
and which kind of problem it was. The error code depends on the OCPP version of the
link (see :func:`error_code`), because OCPP 1.6 and 2.x name the same faults differently.

A decoded frame holds only values that JSON and msgpack both carry unchanged, so any link
can send it on (the rules are :mod:`policies.values`). A frame that breaks one of these
rules but is otherwise well formed is refused as a format error with its message id (see
:func:`refusal`).
"""

from __future__ import annotations

import enum
import json
from typing import Any, NamedTuple

from policies.values import encodable, parse_json

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
        return _TYPES_21 if self is Version.V21 else _TYPES_BEFORE_21


SUBPROTOCOLS = tuple(v.value for v in Version)
# read for every frame decoded: made once
_TYPES_BEFORE_21 = frozenset((CALL, CALLRESULT, CALLERROR))
_TYPES_21 = frozenset((CALL, CALLRESULT, CALLERROR, CALLRESULTERROR, SEND))


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
        return parse_json(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError(Problem.RPC, f"not valid JSON: {exc}") from None


def refusal(flaw: str, message_id: str, message_type: int) -> FrameError:
    """The error for a well-formed frame that holds an unfit value: a format violation,
    answered with the frame's id unless the id itself cannot be sent back."""
    if not encodable(message_id):
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
    # Version.message_types, without the property's call: this runs for every frame
    if mtype not in (_TYPES_21 if version is Version.V21 else _TYPES_BEFORE_21):
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
