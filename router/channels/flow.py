"""Credit-based flow control of one channel, as plain calls (sans-IO).

Each end of a channel advertises a **window** when the channel opens: how many bytes it
will hold that it has not yet written out. A sender may have at most the far end's window
in flight beyond what the far end has acknowledged; the receiver acknowledges
cumulatively (the total it has written out) once a quarter of its window has been
written since its last acknowledgement. Every data frame carries the offset of its first
byte in the stream, so a lost or reordered frame is seen, not written. docs/protocol.md
section 10 specifies it; the trio shell is router/channels/service.py.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WINDOW = 256 * 1024
MIN_WINDOW = 4 * 1024
MAX_WINDOW = 16 * 2**20
CHUNK = 16 * 1024  # bytes per data frame at most


class ChannelFault(Exception):
    """The far end broke the channel's rules; the channel closes with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class Outbound:
    """What this end sends: bytes sent, bytes the far end acknowledged, its window."""

    window: int  # the far end's
    sent: int = 0
    acked: int = 0

    def credit(self) -> int:
        """How many more bytes may be sent now."""
        return self.acked + self.window - self.sent

    def take(self, length: int) -> int:
        """Account ``length`` bytes about to be sent; returns their offset."""
        if not 0 < length <= self.credit():
            raise ValueError(f"{length} bytes exceed the credit of {self.credit()}")
        offset = self.sent
        self.sent += length
        return offset

    def acknowledge(self, received: int) -> bool:
        """The far end has written out ``received`` bytes in all; True if credit grew."""
        if not self.acked <= received <= self.sent:
            raise ChannelFault(f"acknowledgement of {received} bytes, but {self.sent} were "
                               f"sent and {self.acked} acknowledged before")
        grew = received > self.acked
        self.acked = received
        return grew


@dataclass(slots=True)
class Inbound:
    """What this end receives: the next offset due, what was written out and acknowledged."""

    window: int  # ours, as advertised
    received: int = 0
    written: int = 0
    acked: int = 0

    def accept(self, offset: int, length: int) -> None:
        """A data frame arrived; raises ChannelFault if it is out of order or over the window."""
        if offset != self.received:
            raise ChannelFault(f"data at offset {offset} where {self.received} was due: "
                               "frames were lost or reordered on the way")
        if self.received + length > self.written + self.window:
            raise ChannelFault(f"{length} bytes at offset {offset} overrun the window of "
                               f"{self.window} (written out: {self.written})")
        self.received += length

    def wrote(self, length: int) -> int | None:
        """``length`` bytes were written out; returns the acknowledgement to send, if due."""
        self.written += length
        if self.written - self.acked >= self.window // 4:
            self.acked = self.written
            return self.written
        return None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet written out."""
        return self.received - self.written
