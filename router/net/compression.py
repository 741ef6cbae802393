"""RFC 7692 permessage-deflate on the node's links, with websockets' own extension.

OCPP 2.1 Part 4 §3.4 makes compression required for a CSMS and a Local Controller and
optional for a station, so the node accepts it from stations and offers it to backends
and peers; each hop negotiates on its own and falls back to no compression.

Memory decides the parameters. A deflate context kept for a link's life (context
takeover) costs tens of KiB per direction, for every connected station, idle or not.
The node asks for **no context takeover in both directions**, which RFC 7692 lets a
server impose and a client request: every message is compressed and inflated with a
fresh context that is dropped when the message ends, so an idle link holds none.
Windows of 2^12 bytes and zlib ``memLevel`` 5 keep that per-message context near 40 KiB
for the moment it exists. OCPP messages are small and mostly self-similar inside one
message, so the loss against context takeover is modest; ``bench/forwarding.py``
measures both memory and the bytes saved.

CPU decides two more things, both within RFC 7692 (``docs/scaling.md`` has the figures):

- **Forwarded as it came.** A text message that arrived compressed in one frame, by a
  sender that starts every message with a fresh context, inflates the same way for any
  receiver whose window is at least as long as the message: no back-reference in it can
  reach further than its own start (the node's fresh inflater refuses one that does).
  The node inflates it to check it, as always; when it forwards the text unchanged to a
  link whose window is that long, it sends the compressed payload it received instead
  of deflating the text again (:class:`CompressedText`). Deflating is the costly half:
  about 4.6 us for a 300-byte MeterValues against 1.7 us to inflate it. The sender's
  own window does not count: zlib does not hold a sender to it, and a sender may lie.
  A stream that ends with a final block (BFINAL), or anywhere but between two blocks
  once its tail is appended (a stray byte opening a block header), is deflated again:
  a receiver keeping one inflater per link reads its next message from where this one
  stopped.
- **Small messages go uncompressed.** RFC 7692 §6 lets an endpoint send any message
  with RSV1 clear. Below :data:`SMALLEST_COMPRESSED` bytes deflate saves nothing (a
  45-byte CALLRESULT comes out 2 bytes longer) and costs a fresh context each time.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.extensions.base import ClientExtensionFactory, Extension, ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame, Opcode
from websockets.typing import ExtensionParameter

WINDOW_BITS = 12
MEM_LEVEL = 5
# Messages shorter than this many bytes are sent with RSV1 clear, uncompressed
SMALLEST_COMPRESSED = 128
# RFC 7692 §7.2.2: the receiver appends the empty stored block the sender took off
_TAIL = b"\x00\x00\xff\xff"
# an empty fixed-Huffman block marked final (BFINAL 1, BTYPE 01, end-of-block), padded
_FINAL_EMPTY_BLOCK = b"\x03\x00"


class Wire(bytes):
    """A message's compressed payload as it came off the wire (RSV1 frames only)."""


class CompressedText(str):
    """Text that arrived compressed, with ``wire``, its compressed payload as it came:
    any receiver whose window is at least 2^``bits`` bytes (the text's own length in
    UTF-8, rounded up) inflates that payload to this same text, whatever it received
    before."""

    wire: Wire
    bits: int


class Carried(bytes):
    """An inflated payload that keeps the wire it came as (see :class:`CompressedText`)."""

    wire: Wire
    bits: int

    def text(self) -> CompressedText:
        """The payload as text; raises UnicodeDecodeError as ``str(data, "utf-8")`` does."""
        text = CompressedText(self, "utf-8")
        text.wire = self.wire
        text.bits = self.bits
        return text


class Deflate(PerMessageDeflate):
    """websockets' permessage-deflate, which keeps a whole text message's compressed
    payload beside what it inflated (:class:`Carried`), sends a :class:`Wire` as it is,
    and leaves small messages uncompressed."""

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        if not (frame.rsv1 and frame.fin and frame.opcode is Opcode.TEXT
                and self.remote_no_context_takeover):
            return super().decode(frame, max_size=max_size)
        frame.data = self.inflate(frame.data, max_size)
        frame.rsv1 = False
        return frame

    def inflate(self, payload: bytes | bytearray | memoryview, max_size: int | None) -> bytes:
        """A whole text message's payload, deflated with a fresh context: what websockets'
        own decode makes of it, as a :class:`Carried` when it may go on as it came. Raises
        ProtocolError and PayloadTooBig as that decode does (also for
        router/net/framing.py, which reads such frames without a frame object)."""
        wire = Wire(payload)
        inflater = zlib.decompressobj(wbits=-self.remote_max_window_bits)
        # one byte over the limit tells "too big" from "exactly the limit"
        try:
            data = inflater.decompress(wire + _TAIL, 0 if max_size is None else max_size + 1)
        except zlib.error as exc:
            raise ProtocolError("decompression failed") from exc
        if max_size is not None and (len(data) > max_size or inflater.unconsumed_tail):
            raise PayloadTooBig(None, max_size)
        if not _at_boundary(inflater):
            return data  # the text, not the wire: deflated again before it goes on
        carried = Carried(data)
        carried.wire = wire
        # the farthest a back-reference can reach: the message's own length
        carried.bits = max(9, (len(data) - 1).bit_length())
        return carried

    def encode(self, frame: Frame) -> Frame:
        if frame.fin and (frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY):
            data = frame.data
            if type(data) is Wire:
                frame.rsv1 = True
                return frame
            if len(data) < SMALLEST_COMPRESSED:
                return frame
        return super().encode(frame)


def _at_boundary(inflater: zlib._Decompress) -> bool:
    """Whether a stream, its tail appended, stopped where RFC 7692 §7.2.1 has a sender stop:
    between two blocks, the last of them not final. Only such a stream may go on as it
    came: a receiver that keeps one inflater for the link reads its next message from
    where this one stopped, and a final block, or a block header left open (a stray
    byte after the sync flush), would make it read that message otherwise, or fail.
    An empty final block fed after it must end the stream at once, adding nothing."""
    if inflater.eof:
        return False  # a final block of its own, and maybe bytes after it
    try:
        added = inflater.decompress(_FINAL_EMPTY_BLOCK)
    except zlib.error:
        return False
    return not added and inflater.eof and not inflater.unused_data


def _deflate(extension: PerMessageDeflate) -> Deflate:
    return Deflate(extension.remote_no_context_takeover, extension.local_no_context_takeover,
                   extension.remote_max_window_bits, extension.local_max_window_bits,
                   extension.compress_settings)


class _ServerFactory(ServerPerMessageDeflateFactory):
    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension],
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, extension = super().process_request_params(params, accepted_extensions)
        return response, _deflate(extension)


class _ClientFactory(ClientPerMessageDeflateFactory):
    def process_response_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension],
    ) -> PerMessageDeflate:
        return _deflate(super().process_response_params(params, accepted_extensions))


def server_extensions(enabled: bool) -> list[ServerExtensionFactory] | None:
    """What the node accepts from a client that offers permessage-deflate (None: nothing)."""
    if not enabled:
        return None
    return [_ServerFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        server_max_window_bits=WINDOW_BITS,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )]


def client_extensions(enabled: bool) -> list[ClientExtensionFactory] | None:
    """What the node offers when it dials a backend or a peer (None: no offer)."""
    if not enabled:
        return None
    return [_ClientFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )]


def passing_bits(extensions: Sequence[Any]) -> int:
    """The window (in bits) a link with these extensions announced for what it sends:
    a :class:`CompressedText` whose ``bits`` are no more goes out as it came; 0 when
    none may."""
    if len(extensions) != 1:
        return 0
    [extension] = extensions
    if type(extension) is not Deflate or not extension.local_no_context_takeover:
        return 0
    return extension.local_max_window_bits
