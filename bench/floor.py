"""Floor relays: how much of the node's CPU per frame is its event loop, not its checks.

Two stripped relays built from the node's own parts (``router.net.handshake`` for both
upgrades, the node's links for the frames: their own framing, websockets for the rest),
forwarding every text message as it is: no decoding, no call ledger, no firewall, no
counters.

* ``--mode tasks``: the node's shape. Each direction is a trio task reading a
  :class:`router.net.wslink.WsLink` and writing the other, so every frame is a trio
  wake-up (epoll armed per wait, the task rescheduled and resumed), as in the node.
* ``--mode loop``: one task for all links. It waits on an epoll set of its own that
  holds every link's socket and, when any is readable, reads, parses and forwards all
  the ready frames in a plain loop: no task switch per frame.

``bench/forwarding.py --scenarios nginx,floor-loop,floor-tasks,node`` measures the four in
one run: the steps between them are what WebSocket framing in Python, trio's task per link, and
the node's own checks each cost per frame. Prints ``{"event": "listening", "port": N}``.

    .venv/bin/python bench/floor.py --backend ws://127.0.0.1:9100 --mode loop --port 0
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import sys
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the router package

from benchutil import emit, raise_nofile_limit

from router.net.handshake import DialFailed, HandshakeFailed, dial, read_upgrade
from router.net.wslink import LinkClosed, WsLink, close_stream
from router.wire.frames import SEND, Frame

MAX_MESSAGE = 65536
# put_frame reads the frame only when it has no text; the floor always has the text
_UNUSED = Frame(SEND, "-", action="-", payload={})
RECEIVE_BYTES = 65536


class Loop:
    """One epoll set for every link's socket, served by one trio task."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        # fd -> (its socket, its link, the other link, the other's socket)
        self.ends: dict[int, tuple[socket.socket, WsLink, WsLink, socket.socket]] = {}
        self.done: dict[int, trio.Event] = {}  # fd -> set when its pair has ended

    def add(self, a: WsLink, b: WsLink) -> trio.Event:
        """Forward between ``a`` and ``b`` until either closes; the event is set then."""
        done = trio.Event()
        raw_a, raw_b = a._raw, b._raw
        assert raw_a is not None and raw_b is not None, "plain TCP links only"
        self.ends[raw_a.fileno()] = (raw_a, a, b, raw_b)
        self.ends[raw_b.fileno()] = (raw_b, b, a, raw_a)
        self.epoll.register(raw_a.fileno(), select.EPOLLIN)
        self.epoll.register(raw_b.fileno(), select.EPOLLIN)
        self.done[raw_a.fileno()] = self.done[raw_b.fileno()] = done
        return done

    def _drop(self, fd: int) -> None:
        raw, _link, _other, other_raw = self.ends.pop(fd)
        self.ends.pop(other_raw.fileno(), None)
        for sock in (raw, other_raw):
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(sock.fileno())
        self.done.pop(other_raw.fileno(), None)
        self.done.pop(fd).set()

    async def run(self) -> None:
        epoll, ends = self.epoll, self.ends
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _flags in epoll.poll(0):
                end = ends.get(fd)
                if end is None:
                    continue
                raw, link, other, _other_raw = end
                try:
                    data = raw.recv(RECEIVE_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._drop(fd)
                    continue
                # the link's own framing, as the node reads and writes (router/net/framing.py)
                try:
                    for message in link.feed(data, 0.0):
                        if isinstance(message, str):
                            # text as the node handles it: checked UTF-8 in, the same out
                            other.put_frame(_UNUSED, message)
                    if other.backlog:
                        # a full send buffer: rare with OCPP-sized frames; the floor waits
                        await other.flush()
                except LinkClosed:
                    self._drop(fd)
                    continue
                if link.closed is not None or other.closed is not None:
                    self._drop(fd)


async def _copy(src: WsLink, dst: WsLink, scope: trio.CancelScope) -> None:
    try:
        while True:
            message = await src.get_message()
            if isinstance(message, str):
                await dst.send_message(message)
    except LinkClosed:
        pass
    finally:
        scope.cancel()


async def handle(backend: str, mode: str, loop: Loop, stream: trio.SocketStream) -> None:
    try:
        upgrade = await read_upgrade(stream, MAX_MESSAGE)
        path = upgrade.request.path
        try:
            upstream = await dial(backend + path, upgrade.offered_subprotocols(), {},
                                  MAX_MESSAGE)
        except (DialFailed, HandshakeFailed, OSError):
            await upgrade.reject(502, "backend refused")
            return
        station = await upgrade.accept(upstream.subprotocol)
        if mode == "tasks":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, station, upstream, nursery.cancel_scope)
                await _copy(upstream, station, nursery.cancel_scope)
        else:
            await loop.add(station, upstream).wait()
        await close_stream(upstream.stream)
    except (HandshakeFailed, OSError, trio.BrokenResourceError):
        pass
    finally:
        await close_stream(stream)


async def main(host: str, port: int, backend: str, mode: str) -> None:
    loop = Loop()
    async with trio.open_nursery() as nursery:
        if mode == "loop":
            nursery.start_soon(loop.run)
        listeners = await nursery.start(partial(
            trio.serve_tcp, partial(handle, backend, mode, loop), port, host=host))
        emit("listening", host=host, port=listeners[0].socket.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", required=True, help="ws://host:port (path is copied)")
    parser.add_argument("--mode", choices=("tasks", "loop"), required=True)
    args = parser.parse_args()
    raise_nofile_limit()
    trio.run(main, args.host, args.port, args.backend.rstrip("/"), args.mode)
