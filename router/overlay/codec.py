"""How overlay frames travel on one peer link, as plain calls (sans-IO).

A JSON link carries one frame per text message. A msgpack link carries binary messages,
each one frame or a batch of frames, and also reads text frames (a peer may mix). The
reader hands each message to :meth:`PeerCodec.decode`; the writer hands whatever frames
are waiting to :meth:`PeerCodec.encode`, so frames queued together leave together.
"""

from __future__ import annotations

from router.wire.overlay_frames import (
    OverlayFrame,
    decode_json,
    decode_msgpack,
    encode_json,
    encode_msgpack,
)

ENCODINGS = ("json", "msgpack")


class WrongEncoding(Exception):
    """A binary message on a JSON link: the link is closed with 1003 (unsupported data)."""

    close_code = 1003


class PeerCodec:
    """The encoding negotiated for one peer link: ``"json"`` or ``"msgpack"``."""

    __slots__ = ("encoding",)

    def __init__(self, encoding: str) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown overlay encoding {encoding!r}")
        self.encoding = encoding

    def decode(self, message: str | bytes) -> list[OverlayFrame]:
        """The frames of one WebSocket message; raises FrameError or WrongEncoding."""
        if isinstance(message, str):
            return [decode_json(message)]
        if self.encoding == "msgpack":
            return decode_msgpack(message)
        raise WrongEncoding("binary message on a JSON overlay link")

    def encode(self, frames: list[OverlayFrame]) -> list[str | bytes]:
        """The WebSocket messages that carry ``frames``, in order: one binary message for
        a msgpack link, one text message per frame for a JSON link."""
        if self.encoding == "msgpack":
            return [encode_msgpack(frames)]
        return [encode_json(frame) for frame in frames]
