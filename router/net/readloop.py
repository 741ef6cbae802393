"""The forwarding loop: one task reads every plain-TCP link a consumer hands it.

A link read by a task of its own costs a trio wake-up per frame: the socket armed in
trio's epoll set for each wait, the task rescheduled, its coroutine chain resumed. Here
each link's socket is registered once, edge-triggered, in an epoll set of the loop's
own, which the loop waits on as one trio wait per batch of ready sockets. For each, it
reads what the kernel holds, lets websockets' sans-IO protocol parse it, and hands every
whole message to the link's consumer in a plain call; the consumer (a station session's
side, router/relay/session.py) forwards the message there and then, with writes that do
not wait (:meth:`WsLink.put_frame`). ``bench/floor.py`` measures what this saves.

A consumer that must wait for something (a full socket buffer, an answer to another
node's CALL, a close) returns False from ``take``: the loop stops reading that link
until the consumer calls :meth:`ReadLoop.resume`, so frames keep their order and a slow
far end slows only the links that write to it. The end of a link (end of stream, a
close frame, a protocol error, a dead keepalive, a write that found the connection gone)
reaches the consumer as ``lost``, after every message read before it. A read whose
reply (a pong) the socket does not take pauses the link too, until the consumer's task
has flushed it (``backlogged``).

TLS links, overlay links and backend links that fail over keep a task each: the loop
takes only links whose socket the node reads itself.
"""

from __future__ import annotations

import contextlib
import logging
import select
from dataclasses import dataclass, field
from typing import Protocol

import trio
from trio.lowlevel import RunVar, spawn_system_task

from router.net.wslink import WsLink

log = logging.getLogger("router.net")

RECEIVE_BYTES = 65536
# reads of one link per turn: a far end that sends without pause cannot keep the loop
# from the other links (the link is armed again, so epoll reports it on the next turn)
READS_PER_TURN = 4
MAX_EVENTS = 512  # ready sockets taken per wait; the rest are reported on the next
_WATCH = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class Consumer(Protocol):
    """Who gets a link's messages: one side of a station session."""

    def take(self, message: str | bytes) -> bool:
        """Handle one message now; False to have the loop stop reading the link (the
        consumer then holds what follows, and resumes the link when it is done)."""
        ...

    def lost(self, code: int, reason: str) -> None:
        """The link has closed (``code`` as :meth:`WsLink.get_message` would raise it)."""
        ...

    def failed(self, error: Exception) -> None:
        """``take`` raised: the consumer's own task should raise it."""
        ...

    def backlogged(self) -> None:
        """Reading the link left a reply (a pong) its socket did not take: the consumer's
        task should flush the link, then resume it. Until then the loop reads it no more,
        so a far end that pings and never reads cannot pile up pongs in the node."""
        ...


@dataclass(slots=True, eq=False)
class Reading:
    """One link the loop reads."""

    link: WsLink
    consumer: Consumer
    fd: int
    paused: bool = False  # the consumer holds messages back: do not read
    ready: bool = False  # the socket may hold bytes not read yet
    held: list[str | bytes] = field(default_factory=list)  # read, not yet taken
    # the far end has shut down or reset: read on until the end of stream, since an
    # end that came with the last bytes raises no edge of its own
    hup: bool = False
    done: bool = False  # the link has ended, or left the loop


class ReadLoop:
    """An epoll set of plain-TCP links and the task that serves it (see the module)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readings: dict[int, Reading] = {}

    def __len__(self) -> int:
        return len(self._readings)

    def add(self, link: WsLink, consumer: Consumer) -> Reading:
        """Read ``link`` for ``consumer`` until :meth:`remove`; call :meth:`resume` once
        the consumer is ready for messages (some may have arrived already)."""
        raw = link.sock
        assert raw is not None, "the loop reads plain TCP links only"
        fd = raw.fileno()
        # ready: bytes may be waiting already; held: messages parsed in the read that
        # completed the handshake
        reading = Reading(link, consumer, fd, paused=True, ready=True,
                          held=link.take_messages())
        # a socket closed without leaving the loop (its fd number reused since) is gone
        # from the epoll set already: replace its entry
        old = self._readings.get(fd)
        if old is not None:
            old.done = True
            self._unregister(fd)
        self._readings[fd] = reading
        self._epoll.register(fd, _WATCH)
        link.on_dead = lambda: self._dead(reading)
        return reading

    def remove(self, reading: Reading) -> None:
        """Stop reading the link; it stays open and may be read by a task again."""
        reading.done = True
        reading.link.on_dead = None
        self.pause(reading)
        if self._readings.get(reading.fd) is reading:
            del self._readings[reading.fd]
            self._unregister(reading.fd)

    def pause(self, reading: Reading) -> None:
        """Stop reading the link until :meth:`resume` (the consumer holds messages)."""
        reading.paused = True
        reading.link.set_reading(False)

    def resume(self, reading: Reading) -> None:
        """Read the link again, at once if bytes may be waiting (in the caller's task)."""
        if reading.done:
            return
        reading.paused = False
        reading.link.set_reading(True)
        if reading.ready or reading.held:
            self._serve(reading, trio.current_time())

    def _unregister(self, fd: int) -> None:
        # closed already, which took it out of the set
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def _dead(self, reading: Reading) -> None:
        """The keepalive watcher gave the link up, or a write found the connection gone:
        the consumer hears it as a reader would."""
        if not reading.done:
            reading.done = reading.paused = True
            code, reason = reading.link.ended() or (1006, "")
            reading.consumer.lost(code, reason)

    async def run(self) -> None:
        epoll, readings = self._epoll, self._readings
        fileno = epoll.fileno()
        while True:
            await trio.lowlevel.wait_readable(fileno)
            now = trio.current_time()
            for fd, events in epoll.poll(0, MAX_EVENTS):
                reading = readings.get(fd)
                if reading is None:
                    continue
                reading.ready = True
                if events & _HANGUP:
                    reading.hup = True
                if reading.paused:
                    continue
                try:
                    self._serve(reading, now)
                except Exception:
                    # a bug here must cost one link, never the loop and every link on it
                    log.exception("forwarding loop failed on a link")
                    reading.done = reading.paused = True
                    reading.consumer.lost(1011, "internal error")

    def _serve(self, reading: Reading, now: float) -> None:
        """Read the link until the kernel has no more, its consumer pauses, or it ends."""
        link = reading.link
        raw = link.sock
        consumer = reading.consumer
        assert raw is not None
        messages, reading.held = reading.held, []
        reads = 0
        while True:
            for index, message in enumerate(messages):
                if reading.paused:
                    # the consumer paused at the one before: the rest wait for resume
                    reading.held = messages[index:]
                    return
                try:
                    if not consumer.take(message):
                        self.pause(reading)
                except Exception as exc:  # the consumer's task raises it
                    self.pause(reading)
                    consumer.failed(exc)
            ended = link.ended()
            if ended is not None:
                if not reading.done:  # not told already (a dead keepalive, a failed write)
                    reading.done = reading.paused = True
                    consumer.lost(*ended)
                return
            if reading.paused or not reading.ready:
                return
            if reads == READS_PER_TURN:
                # modifying an edge-triggered entry reports it again if it is still ready
                with contextlib.suppress(OSError):
                    self._epoll.modify(reading.fd, _WATCH)
                return
            reads += 1
            try:
                data = raw.recv(RECEIVE_BYTES)
            except BlockingIOError:
                reading.ready = False
                return
            except OSError:
                data = b""
            # a short read emptied the socket: the next bytes raise a new edge (but an
            # end of stream that came with them raised its edge already)
            reading.ready = len(data) == RECEIVE_BYTES or (reading.hup and bool(data))
            backlog = link.backlog
            messages = link.feed(data, now)
            if link.backlog > backlog:
                # the read's reply (a pong) waits: messages wait behind the flush
                self.pause(reading)
                consumer.backlogged()


def read_loop() -> ReadLoop:
    """The run's forwarding loop, started on first use as a trio system task."""
    try:
        return _LOOP.get()
    except LookupError:
        loop = ReadLoop()
        _LOOP.set(loop)
        spawn_system_task(loop.run, name="forwarding loop")
        return loop


_LOOP: RunVar[ReadLoop] = RunVar("forwarding_loop")
