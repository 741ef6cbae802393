"""Overlay frames: OCPP-J with a destination and a network path, in JSON or msgpack.

On a peer link every frame names where it goes and where it has been, right after the
message type (the WWCP_OCPP field order):

    [2, dest, path, id, action, payload]        CALL
    [3, dest, path, id, payload]                CALLRESULT
    [4, dest, path, id, code, description, details]   CALLERROR (5: CALLRESULTERROR)
    [6, dest, path, id, action, payload]        SEND
    [7, dest, path, channel, offset, data]      CHANNEL_DATA (router/channels/)

``dest`` is a node id, ``"CSMS"`` (the backend responsible for the source station) or
``"*"`` (broadcast); ``path`` lists the node ids the frame has passed, oldest first.
JSON frames travel one per text message. msgpack frames travel in binary messages,
either one frame or a batch (an array of frames) per message. Decoding is strict and
raises :class:`~router.frames.FrameError`, as for standard frames; it lets through only
values both encodings carry unchanged, so a frame read on one link can be written on any
other (msgpack bin and ext values, for one, have no JSON form). The one exception is a
channel's data, bytes by nature: msgpack ``bin`` on a msgpack link, base64 text on a JSON
link, and bytes in the decoded frame either way.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, NamedTuple

import msgpack

from policies.values import MAX_DEPTH, UnfitValue, unique_keys, value_flaw
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    CALLRESULTERROR,
    MAX_MESSAGE_ID,
    SEND,
    FrameError,
    Problem,
    load_json,
    refusal,
)

#: A frame that has passed this many nodes is dropped: no route may loop forever.
MAX_HOPS = 16
MAX_NODE_ID = 48
ANYCAST_CSMS = "CSMS"
BROADCAST = "*"

#: A channel's bytes (router/channels/): [7, dest, path, channel id, offset, data].
CHANNEL_DATA = 7
MAX_CHANNEL_DATA = 64 * 1024  # bytes in one data frame at most
MAX_OFFSET = 2**63 - 1

_LENGTHS = {CALL: 6, CALLRESULT: 5, CALLERROR: 7, CALLRESULTERROR: 7, SEND: 6,
            CHANNEL_DATA: 6}


class OverlayFrame(NamedTuple):
    """One overlay frame; fields a type does not carry are None.

    A named tuple rather than a frozen dataclass: a frame is built twice per hop (decoded,
    then extended with the incoming link's id) and tuple construction is several times
    cheaper than a frozen dataclass's field-by-field ``__init__``.
    """

    type: int
    dest: str
    path: tuple[str, ...]
    id: str
    action: str | None = None
    payload: Any = None
    code: str | None = None
    description: str | None = None
    details: Any = None
    offset: int | None = None  # CHANNEL_DATA: the stream offset of its first byte

    def as_list(self) -> list[Any]:
        """The frame as the msgpack array it travels as (JSON: see :func:`encode_json`)."""
        head: list[Any] = [self.type, self.dest, list(self.path), self.id]
        if self.type in (CALL, SEND):
            return [*head, self.action, self.payload]
        if self.type == CALLRESULT:
            return [*head, self.payload]
        if self.type == CHANNEL_DATA:
            return [*head, self.offset, self.payload]
        return [*head, self.code, self.description, self.details]

    def passed(self, node_id: str) -> OverlayFrame:
        """The frame with ``node_id`` appended to its path (the authenticated neighbour)."""
        return self._replace(path=(*self.path, node_id))


def _node_id(value: Any, what: str, mid: str | None, mtype: int) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NODE_ID:
        raise FrameError(Problem.FORMAT, f"{what} must be a node id of 1-{MAX_NODE_ID} characters",
                         mid, mtype)
    return value


def from_list(msg: Any) -> OverlayFrame:
    """Check one decoded overlay frame array, its structure and every value in it, and
    return it as an OverlayFrame."""
    frame = _structure(msg)
    if frame.type == CHANNEL_DATA:
        return frame  # its structure is all it holds, checked
    flaw = value_flaw(msg)
    if flaw is not None:
        raise refusal(flaw, frame.id, frame.type)
    return frame


def _structure(msg: Any) -> OverlayFrame:
    if type(msg) is not list or not msg:
        raise FrameError(Problem.RPC, "an overlay frame is a non-empty array")
    mtype = msg[0]
    if type(mtype) is not int:
        raise FrameError(Problem.RPC, "the message type must be an integer")
    if mtype not in _LENGTHS:
        mid = msg[3] if len(msg) > 3 and type(msg[3]) is str else None
        raise FrameError(Problem.MESSAGE_TYPE, f"message type {mtype} is not supported", mid)
    if len(msg) != _LENGTHS[mtype]:
        raise FrameError(Problem.RPC, f"overlay message type {mtype} has {_LENGTHS[mtype]} "
                         f"elements, got {len(msg)}", None, mtype)
    mid = msg[3]
    if type(mid) is not str or not 1 <= len(mid) <= MAX_MESSAGE_ID:
        raise FrameError(Problem.RPC, f"the message id must be 1-{MAX_MESSAGE_ID} characters",
                         None, mtype)
    dest = _node_id(msg[1], "dest", mid, mtype)
    raw_path = msg[2]
    if type(raw_path) is not list or len(raw_path) > MAX_HOPS:
        raise FrameError(Problem.FORMAT, f"path must be a list of at most {MAX_HOPS} node ids",
                         mid, mtype)
    for hop in raw_path:  # inline: this runs for every frame on every hop
        if type(hop) is not str or not 0 < len(hop) <= MAX_NODE_ID:
            _node_id(hop, "each path element", mid, mtype)
    path = tuple(raw_path)
    if mtype == CHANNEL_DATA:
        return _channel_data(msg, dest, path, mid)
    if mtype in (CALL, SEND):
        action, payload = msg[4], msg[5]
        if type(action) is not str or not action:
            raise FrameError(Problem.FORMAT, "the action must be a non-empty string", mid, mtype)
        if type(payload) is not dict:
            raise FrameError(Problem.FORMAT, "the payload must be an object", mid, mtype)
        return OverlayFrame(mtype, dest, path, mid, action=action, payload=payload)
    if mtype == CALLRESULT:
        if type(msg[4]) is not dict:
            raise FrameError(Problem.FORMAT, "the payload must be an object", mid, mtype)
        return OverlayFrame(mtype, dest, path, mid, payload=msg[4])
    code, description, details = msg[4], msg[5], msg[6]
    if type(code) is not str or type(description) is not str or type(details) is not dict:
        raise FrameError(Problem.FORMAT, "an error frame carries code, description and details",
                         mid, mtype)
    return OverlayFrame(mtype, dest, path, mid, code=code, description=description,
                        details=details)


def _channel_data(msg: list[Any], dest: str, path: tuple[str, ...], cid: str) -> OverlayFrame:
    offset, data = msg[4], msg[5]
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        raise FrameError(Problem.FORMAT, "a channel data frame's offset must be a "
                         "non-negative integer", cid, CHANNEL_DATA)
    if type(data) is str:  # JSON: base64 (RFC 4648 section 4, padded)
        try:
            data = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise FrameError(Problem.FORMAT, "channel data on a JSON link must be base64",
                             cid, CHANNEL_DATA) from None
    if type(data) is not bytes or not 0 < len(data) <= MAX_CHANNEL_DATA:
        raise FrameError(Problem.FORMAT, f"channel data must be 1-{MAX_CHANNEL_DATA} bytes",
                         cid, CHANNEL_DATA)
    return OverlayFrame(CHANNEL_DATA, dest, path, cid, payload=data, offset=offset)


def decode_json(text: str) -> OverlayFrame:
    """One overlay frame from a text WebSocket message."""
    msg, flaw = load_json(text)
    frame = _structure(msg)
    if flaw is not None:
        raise refusal(flaw, frame.id, frame.type)
    return frame


def encode_json(frame: OverlayFrame) -> str:
    """An overlay frame as compact JSON text (a channel's data as base64)."""
    items = frame.as_list()
    if frame.type == CHANNEL_DATA:
        items[5] = base64.b64encode(frame.payload).decode("ascii")
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


def _unpack(data: bytes, max_frames: int, unique: bool) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_array_len=max(max_frames, 8), max_map_len=100_000,
                               object_pairs_hook=unique_keys if unique else None)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError, RecursionError) as exc:
        raise FrameError(Problem.RPC, f"not valid msgpack: {exc}") from None


# msgpack type bytes of what JSON cannot carry: bin (0xc4-0xc6) and ext (0xc7-0xc9,
# 0xd4-0xd8); translate() deleting every other byte leaves them, in C
_KEEP_UNFIT_TYPES = bytes(b for b in range(256) if not (0xC4 <= b <= 0xC9 or 0xD4 <= b <= 0xD8))
# msgpack type bytes that open an array or a map (fixmap, fixarray, array16/32, map16/32)
_KEEP_CONTAINERS = bytes(b for b in range(256) if not (0x80 <= b <= 0x9F or 0xDC <= b <= 0xDF))
_PACKER = msgpack.Packer(use_bin_type=True)
# a float64 (0xcb) or float32 (0xca) whose first byte holds an all-ones exponent start:
# NaN and the infinities begin so (and some finite values, which the long way accepts)
_NONFINITE_STARTS = (b"\xcb\x7f", b"\xcb\xff", b"\xca\x7f", b"\xca\xff")


def _canonical_and_fit(data: bytes, items: list[Any], batch: bool) -> bool:
    """Cheap proof that the frames decoded from ``data`` hold only values JSON carries,
    and no key twice.

    No byte that could begin a bin, an ext or a non-finite float appears anywhere in
    ``data``; packing the frames again gives ``data`` back, which it cannot when a map held
    a key twice (the value kept one); and no frame holds more bytes that could open an
    array or a map than MAX_DEPTH, so none nests deeper (a frame with more is walked).
    Strings from msgpack are valid UTF-8 already, and its integers fit in 64 bits. False
    only means: check the long way.
    """
    if data.translate(None, _KEEP_UNFIT_TYPES) or any(
            start in data for start in _NONFINITE_STARTS):
        return False
    try:
        packed = [msgpack.packb(item, use_bin_type=True) for item in items]
    except (ValueError, TypeError, OverflowError):  # nested deeper than the packer goes
        return False
    header = _PACKER.pack_array_header(len(items)) if batch else b""
    if header + b"".join(packed) != data:
        return False
    for item, raw in zip(items, packed, strict=True):
        if (len(raw) > MAX_DEPTH and len(raw.translate(None, _KEEP_CONTAINERS)) > MAX_DEPTH
                and value_flaw(item) is not None):
            return False
    return True


def decode_msgpack(data: bytes, max_frames: int = 10_000) -> list[OverlayFrame]:
    """The overlay frames of one binary WebSocket message: one frame or a batch."""
    # what a node packs (canonical, plain values) is proven fit in C; the rest is checked
    # value by value
    plain = _unpack(data, max_frames, unique=False)
    batch = type(plain) is list and bool(plain) and type(plain[0]) is list
    items = plain if batch else [plain]
    if len(items) > max_frames:
        raise FrameError(Problem.RPC, f"a batch holds at most {max_frames} frames")
    if _canonical_and_fit(data, items, batch):
        return [_structure(item) for item in items]
    try:
        msg, duplicate = _unpack(data, max_frames, unique=True), None
    except UnfitValue as exc:
        # read it again for its structure; a duplicate key refuses the whole message
        msg, duplicate = _unpack(data, max_frames, unique=False), str(exc)
    if type(msg) is list and msg and type(msg[0]) is list:
        if len(msg) > max_frames:
            raise FrameError(Problem.RPC, f"a batch holds at most {max_frames} frames")
        items = msg
    else:
        items = [msg]
    frames = [from_list(item) for item in items]
    if duplicate is None:
        return frames
    if len(frames) == 1:
        raise refusal(duplicate, frames[0].id, frames[0].type)
    raise FrameError(Problem.FORMAT, f"{duplicate}, in a batch of {len(frames)} frames")


def encode_msgpack(frames: list[OverlayFrame]) -> bytes:
    """One binary message: a single frame, or a batch when there are several."""
    if len(frames) == 1:
        return msgpack.packb(frames[0].as_list(), use_bin_type=True)  # type: ignore[no-any-return]
    return msgpack.packb([f.as_list() for f in frames], use_bin_type=True)  # type: ignore[no-any-return]
