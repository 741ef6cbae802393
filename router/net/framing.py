"""A link's data frames read and written here; every other frame by websockets.

websockets parses a frame with generator coroutines over a byte buffer: a generator per
field read, a copy and a deletion in the buffer for each, an enum lookup, a frame object
and its checks. On this project's machine that is 2.2 us of the 2.4 us ``receive_data``
spends on a 240-byte MeterValues, paid for every frame the node forwards; reading the
same frame's header here, and unmasking its payload with websockets' own C helper, takes
0.35 us. Writing is the same story on a smaller scale: a frame object, its checks, the
extensions' encode and a ``BytesIO``, for a header of two to fourteen bytes
(``docs/architecture.md``, "Frames read and written by the link").

**Reading.** A frame is taken here only when all of this holds, which is the whole of a
forwarding node's usual traffic:

- the protocol is open and no fragmented message is under way (``current_size``);
- the frame came whole, with FIN set;
- it is a text or binary frame with no reserved bit, or (``inflate``) a text frame with
  RSV1 from a permessage-deflate sender without context takeover
  (``router/net/compression.py``);
- it is masked exactly when the link is a server's (RFC 6455 §5.1, §5.3);
- its length is within websockets' own limit for it.

Every other frame (control frames, fragments, a frame with a fault, a frame longer than
the limit, a header cut across reads) goes to websockets, as much of it as has come, and
is settled there as websockets settles it: close code, reason, pongs, what it discards.
So websockets starts every frame it reads at the frame's first byte: the reader counts
the bytes it still owes to a frame it handed on (``_owed``), and keeps a copy of a header
websockets has only begun (``_head``, at most 14 bytes) to learn that frame's length.
Once the protocol is no longer open, all bytes go to websockets. A link built while
websockets was not waiting for a frame's first byte (inside a frame, or discarding after
a fault or a close that came with the handshake) is left to websockets alone:
:meth:`Framing.of` gives None for it. (``router/net/handshake.py`` refuses a station that
sends anything before the 101, so on the node this is the dialling side only: frames a
CSMS sent right behind its 101.)

The outcome does not depend on how TCP cut the bytes: what a link delivers, sends and
closes with is what websockets gives when fed one byte at a time (``tests/test_framing.py``
checks this on generated streams, hostile ones included).

**Writing.** :meth:`Framing.text_frame` frames a whole text message when websockets would
frame it unchanged: no extension, or the node's own ``Deflate`` with a payload it sends as
it is (a :class:`~router.net.compression.Wire`, with RSV1, or one too short to compress).
A client's frame is masked with four bytes from ``os.urandom``, the source websockets uses
(``secrets.token_bytes``), as RFC 6455 §5.3 asks ("derived from a strong source of
entropy"). Anything else (a payload to compress, websockets' stock extension, a message
in fragments) is framed by websockets.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from os import urandom
from typing import Protocol

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.base import Extension
from websockets.frames import CloseCode, Opcode
from websockets.protocol import SERVER, State
from websockets.protocol import Protocol as WsProtocol
from websockets.streams import StreamReader

from router.net.compression import SMALLEST_COMPRESSED, Deflate, Wire

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C helper
    from websockets.utils import apply_mask

_HEADER_MAX = 14  # two bytes, an 8-byte length, a 4-byte mask
_TEXT = 0x81  # FIN and the opcode, no reserved bit
_BINARY = 0x82
_DEFLATED_TEXT = 0xC1  # FIN, RSV1 and the text opcode
_MASKED = 0x80
_SHORT = struct.Struct("!BBH")  # a header with a 16-bit length
_LONG = struct.Struct("!BBQ")  # with a 64-bit length

Bytes = bytes | bytearray
Inflate = Callable[[Bytes, "int | None"], bytes]


class Sink(Protocol):
    """The link the framing reads for (passed on each call: the framing holds no
    reference to it, so a link and its framing make no cycle for the collector)."""

    def deliver(self, opcode: Opcode, data: Bytes) -> None:
        """A whole message, as the link's own reassembly of websockets' frames delivers."""
        ...

    def take_events(self) -> None:
        """Take what websockets parsed."""
        ...


class Framing:
    """Feeds a link's bytes to websockets, except the whole data frames it reads itself,
    and frames the text messages websockets would frame unchanged (see the module)."""

    __slots__ = ("_deflate", "_head", "_inflate", "_mask_bit", "_owed", "_proto")

    def __init__(self, proto: WsProtocol, inflate: Inflate | None = None) -> None:
        self._proto = proto
        self._inflate = inflate  # a whole deflated text message's payload, or None
        # the mask bit of frames read: a server's (it reads masked frames, writes plain)
        self._mask_bit = _MASKED if proto.side is SERVER else 0
        # the node's own deflate: payloads it sends as they are may be framed here
        self._deflate = bool(proto.extensions)
        # a header websockets was handed before all of it came: kept to learn its length
        self._head: Bytes = b""
        self._owed = 0  # bytes still due to websockets for the frame it was handed

    @classmethod
    def of(cls, proto: WsProtocol) -> Framing | None:
        """Framing for this open protocol, or None when websockets must read and write
        every frame: it is not waiting for a frame's first byte (:func:`at_frame_start`),
        logs every frame (debug), or has an extension other than the node's own deflate."""
        if (proto.state is not State.OPEN or proto.debug or not at_frame_start(proto)
                or not hasattr(proto, "current_size") or not hasattr(proto, "max_message_size")):
            return None  # the last two: websockets before 16, whose names differ
        readable, inflate = _inflater(proto.extensions)
        return cls(proto, inflate) if readable else None

    def feed(self, data: Bytes, link: Sink) -> None:
        """Read bytes that came from the far end for ``link`` (not b"": see :meth:`end`)."""
        proto = self._proto
        pos, end = 0, len(data)
        owed = self._owed
        if self._head:
            # websockets has the start of a header: it reads that frame
            head = self._head + data[:_HEADER_MAX]
            start, length = _header(head, 0)
            if start > len(head):
                self._head = head  # all of data: a header is shorter than _HEADER_MAX
                _to_websockets(proto, link, data)
                return
            owed = start + length - len(self._head)
            self._head = b""
        if owed:
            pos = owed if owed < end else end
            self._owed = owed - pos
            _to_websockets(proto, link, data if pos == end else data[:pos])
        limit = _limit(proto)
        mask_bit = self._mask_bit
        while pos < end:
            if proto.state is not State.OPEN:
                _to_websockets(proto, link, data[pos:] if pos else data)
                return
            start, length = _header(data, pos)
            if start > end:
                # a header cut short: websockets reads it as it comes, and the frame
                self._head = bytes(data[pos:])
                _to_websockets(proto, link, self._head)
                return
            stop = start + length
            if (stop <= end and data[pos + 1] & _MASKED == mask_bit
                    and proto.current_size is None and (limit is None or length <= limit)):
                first = data[pos]
                if first in (_TEXT, _BINARY) or (
                        first == _DEFLATED_TEXT and self._inflate is not None):
                    payload = data[start:stop]
                    if mask_bit:
                        payload = apply_mask(payload, data[start - 4:start])
                    pos = stop
                    if first == _DEFLATED_TEXT:
                        self._inflated(payload, limit, link)
                    else:
                        link.deliver(Opcode.TEXT if first == _TEXT else Opcode.BINARY, payload)
                    continue
            # websockets reads this frame, or as much of it as has come
            if stop > end:
                self._owed = stop - end
                _to_websockets(proto, link, data[pos:] if pos else data)
                return
            _to_websockets(proto, link, data[pos:stop])
            pos = stop

    def text_frame(self, payload: bytes) -> bytes | None:
        """A whole text message framed as websockets frames it, or None for websockets to
        frame: a payload to compress, or a message in fragments under way."""
        if type(payload) is Wire:
            first = _DEFLATED_TEXT  # sent as it came (router/net/compression.py)
        elif not self._deflate or len(payload) < SMALLEST_COMPRESSED:
            first = _TEXT
        else:
            return None
        if self._proto.expect_continuation_frame:
            return None  # websockets raises for it
        length = len(payload)
        if self._mask_bit:  # a server: no mask
            if length < 126:
                return bytes((first, length)) + payload
            header = _SHORT.pack(first, 126, length) if length < 65536 else _LONG.pack(
                first, 127, length)
            return header + payload
        key = urandom(4)
        if length < 126:
            header = bytes((first, _MASKED | length))
        elif length < 65536:
            header = _SHORT.pack(first, _MASKED | 126, length)
        else:
            header = _LONG.pack(first, _MASKED | 127, length)
        return header + key + apply_mask(payload, key)

    def end(self) -> None:
        """The far end's end of stream (websockets has every byte before it)."""
        self._proto.receive_eof()

    def _inflated(self, payload: Bytes, limit: int | None, link: Sink) -> None:
        """A whole deflated text message: its text to the link, or the protocol failed as
        websockets' parser fails it for the same fault."""
        assert self._inflate is not None
        proto = self._proto
        try:
            text = self._inflate(payload, limit)
        except ProtocolError as exc:
            proto.fail(CloseCode.PROTOCOL_ERROR, str(exc))
            proto.parser_exc = exc
            return
        except PayloadTooBig as exc:
            exc.set_current_size(proto.current_size)
            proto.fail(CloseCode.MESSAGE_TOO_BIG, str(exc))
            proto.parser_exc = exc
            return
        link.deliver(Opcode.TEXT, text)


def _header(data: Bytes, pos: int) -> tuple[int, int]:
    """Where the payload of the frame at ``pos`` starts, and its length; a start past the
    end of ``data`` when the frame's header has not all come."""
    second = data[pos + 1] if len(data) - pos > 1 else 0
    length = second & 0x7F
    start = pos + 2
    if length == 126:
        start += 2
    elif length == 127:
        start += 8
    if second & _MASKED:
        start += 4
    if start > len(data):
        return start, 0
    if length == 126:
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
    elif length == 127:
        length = int.from_bytes(data[pos + 2:pos + 10], "big")
    return start, length


def _to_websockets(proto: WsProtocol, link: Sink, data: Bytes) -> None:
    proto.receive_data(data)
    link.take_events()


def _limit(proto: WsProtocol) -> int | None:
    """The longest frame websockets accepts outside a fragmented message."""
    limit = proto.max_message_size
    fragment = proto.max_fragment_size
    if fragment is not None and (limit is None or fragment < limit):
        return fragment
    return limit


def at_frame_start(proto: WsProtocol) -> bool:
    """Whether websockets' frame parser waits for the first byte of a frame, with nothing
    held. It waits in its stream's end-of-stream check then, inside a field read
    otherwise; a parser that failed, or read a close, waits in the same check but in
    ``discard``, which drops every byte, so the chain must pass through ``parse``."""
    if proto.reader.buffer:
        return False
    codes = []
    parser: object = proto.parser
    while parser is not None:
        codes.append(getattr(parser, "gi_code", None))
        parser = getattr(parser, "gi_yieldfrom", None)
    return codes[-1] is _AT_EOF and _PARSE in codes


_AT_EOF = StreamReader.at_eof.__code__
_PARSE = WsProtocol.parse.__code__


def _inflater(extensions: Sequence[Extension]) -> tuple[bool, Inflate | None]:
    """Whether a link may be framed here (no extension, or the node's own deflate: its
    encode leaves alone what :meth:`Framing.text_frame` frames), and that extension's
    whole-message inflate when it reads each message with a fresh context."""
    if not extensions:
        return True, None
    deflate = extensions[0]
    if len(extensions) > 1 or type(deflate) is not Deflate:
        return False, None
    return True, deflate.inflate if deflate.remote_no_context_takeover else None
