"""One channel at one end, as the channel service keeps it (router/channels/service.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from router.channels.flow import Inbound, Outbound


@dataclass(slots=True, eq=False)
class Channel:
    """One channel at this end: a TCP stream on one side, the overlay on the other."""

    other: str  # the node at the far end
    cid: str
    name: str  # the tunnel's name (opening end) or the target (serving end)
    target: str
    stream: trio.abc.Stream
    outbound: Outbound
    inbound: Inbound
    opened_at: float
    last_active: float
    # bytes received and not yet written out: one buffer, so its memory is what the
    # window allows however small the frames (a queue of 1-byte frames would not be)
    buffer: bytearray = field(default_factory=bytearray)
    readable: trio.Event = field(default_factory=trio.Event)  # set when buffer grows
    draining: bool = False  # the far end closed: write out the buffer, then end
    credit: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reader_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reason: str = ""  # why it closed, once closing

    @property
    def key(self) -> tuple[str, str]:
        return (self.other, self.cid)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why an open this node asked for did not happen (logged and audited already)."""

    by: str  # "here" (no route, no answer, a local policy or limit), or the far node
    why: str


class TunnelBindError(OSError):
    """A ``[[tunnels]]`` listener cannot listen where it says (port in use, bad host)."""

    def __str__(self) -> str:
        return str(self.strerror)
