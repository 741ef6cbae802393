"""Binary channels over the overlay: TCP tunnels between any two nodes.

A ``[[tunnels]]`` entry makes this node listen on a local TCP port; each connection
accepted there opens a channel to the entry's ``node``, which connects to ``target`` if
and only if its ``[channels] allow_targets`` lists it. Bytes then flow both ways as
overlay data frames (type 7: msgpack ``bin`` on msgpack links, base64 on JSON links),
routed by destination like every overlay frame, under credit-based flow control
(router/channels/flow.py), so a far end that stops reading holds back only its own
channel. The open is a ``ChannelOpen`` CALL that passes the firewall gate at both ends
(direction ``to-station``: toward the site; source: the tunnel's name where it opens,
the opening node's id where it is served), so a policy can require a role signature or
restrict which nodes may open. Every open, refusal and close is logged and audited with
the bytes moved. docs/protocol.md section 10 specifies the frames; docs/channels.md is
the operator's page.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from router.channels.channel import Channel, Refused, TunnelBindError
from router.channels.files import Digests, FileProblem, FileSource, resolve
from router.channels.flow import (
    CHUNK,
    MAX_WINDOW,
    MIN_WINDOW,
    ChannelFault,
    Inbound,
    Outbound,
)
from router.config import ChannelsSection, TunnelEntry
from router.logs import log_event
from router.net.handshake import open_tcp
from router.net.wslink import LinkClosed
from router.overlay.state import OverlayState
from router.relay.gate import Gate
from router.wire.frames import CALL, CALLERROR, CALLRESULT, MAX_MESSAGE_ID, SEND, Frame
from router.wire.overlay_frames import CHANNEL_DATA, OverlayFrame

log = logging.getLogger("router.channels")

OPEN = "ChannelOpen"
ACK = "ChannelAck"
CLOSE = "ChannelClose"
ACTIONS = (OPEN, ACK, CLOSE)
DIRECTION = "to-station"  # the policy direction of an open: toward the site's network
OPEN_TIMEOUT_S = 15.0
DRAIN_S = 10.0  # a closed channel writes out what arrived for at most this long
CLOSE_SEND_S = 5.0  # a close waits at most this long for room on the peer link
MAX_REASON = 200
GIVEN_UP_KEPT = 256  # opens given up on, remembered for a late answer


class NoRoute(Exception):
    """No open peer link leads to the channel's other end."""


class ChannelService:
    """The node's channels: tunnels it listens for and channels it serves."""

    def __init__(self, state: OverlayState, gate: Callable[[], Gate],
                 tunnels: tuple[TunnelEntry, ...],
                 settings: Callable[[], ChannelsSection]) -> None:
        self.state = state
        self._gate = gate
        self.tunnels = tunnels
        self._settings = settings  # read at each use: a reload may change them
        self.channels: dict[tuple[str, str], Channel] = {}
        # ChannelOpen CALLs of this node awaiting their answer: id -> (from whom, done, answer)
        self._pending: dict[str, tuple[str, trio.Event, list[OverlayFrame]]] = {}
        # opens given up on, for an answer that comes late: id -> (node, channel id)
        self._given_up: dict[str, tuple[str, str]] = {}
        self._nursery: trio.Nursery | None = None
        # opens being served (checked, dialling, answering): they count as channels
        self._opening: set[tuple[str, str]] = set()
        # ChannelOpen CALLs being served: checked, dialled, answered, or the channel they
        # became at this end
        self._serving = 0
        self._digests = Digests()
        self.fetching: set[Path] = set()  # the files fetches are writing (fetching.py)
        self.ports: dict[str, int] = {}  # tunnel name -> the port it listens on
        self.counters: dict[str, int] = {
            "opened": 0, "refused": 0, "closed": 0, "bytes_out": 0, "bytes_in": 0,
            "stalls": 0, "faults": 0, "dropped": 0}

    @property
    def settings(self) -> ChannelsSection:
        return self._settings()

    def _full(self) -> bool:
        """Channels open and being opened, both ends, at ``max_channels``."""
        return len(self.channels) + len(self._opening) >= self.settings.max_channels

    def count(self, what: str, by: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + by

    # --- running ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen for every tunnel and watch open channels, until cancelled; raises
        TunnelBindError (before anything runs) when a tunnel cannot listen."""
        bound: list[tuple[TunnelEntry, list[Any]]] = []
        try:
            for tunnel in self.tunnels:
                bound.append((tunnel, await trio.open_tcp_listeners(tunnel.port,
                                                                    host=tunnel.host)))
        except OSError as exc:
            for _tunnel, listeners in bound:
                for listener in listeners:
                    await listener.aclose()
            log_event(log, logging.ERROR, "tunnel_failed", tunnel=tunnel.name,
                      host=tunnel.host, port=tunnel.port, reason=why(exc))
            raise TunnelBindError(exc.errno or 0, f"tunnel {tunnel.name}: cannot listen on "
                                  f"{tunnel.host}:{tunnel.port}: {why(exc)}") from exc
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for tunnel, listeners in bound:
                self.ports[tunnel.name] = listeners[0].socket.getsockname()[1]
                nursery.start_soon(self._serve_tunnel, tunnel, listeners)
                log_event(log, logging.INFO, "tunnel_listening", tunnel=tunnel.name,
                          host=tunnel.host, port=self.ports[tunnel.name], far_node=tunnel.node,
                          target=tunnel.target)
            nursery.start_soon(self._watch)
            task_status.started()

    async def _serve_tunnel(self, tunnel: TunnelEntry, listeners: list[Any]) -> None:
        async def handle(stream: trio.SocketStream) -> None:
            try:
                await self._open(tunnel, stream)
            except Exception as exc:
                self.count("faults")  # costs this connection, never the node
                log.exception("tunnel connection failed",
                              extra={"fields": {"tunnel": tunnel.name, "error": repr(exc)}})
            finally:
                await _close_gently(stream)

        await trio.serve_listeners(handle, listeners)

    async def _watch(self) -> None:
        """Once a second: close channels idle too long or whose far end has no route."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for channel in list(self.channels.values()):
                if self.state.link_toward(channel.other) is None:
                    self.end(channel, f"route to {channel.other} lost", tell=False)
                    channel.scope.cancel()  # even one writing out after a close
                elif now - channel.last_active >= self.settings.idle_timeout_s:
                    self.end(channel, f"idle for {self.settings.idle_timeout_s:g} s",
                              tell=True)

    # --- frames from the overlay ----------------------------------------------------------

    def handle(self, frame: OverlayFrame) -> bool:
        """A frame for this node: True if it was a channel's (it is dealt with then).

        Runs on a peer link's reader: it never waits. The frame's path is checked
        already (router/overlay/forwarding.plausible), so ``path[0]`` is its origin.
        """
        mtype = frame.type
        if mtype == CHANNEL_DATA:
            self._data(frame)
            return True
        if mtype in (CALLRESULT, CALLERROR):
            pending = self._pending.get(frame.id)
            if pending is None:
                late = self._given_up.pop(frame.id, None)
                if late is not None and mtype == CALLRESULT and frame.path[:1] == (late[0],):
                    # the far end opened the channel after we stopped waiting: close it
                    # there, or it would hold its target until its idle timeout
                    self._close_late(*late)
                return late is not None
            expected_from, done, answer = pending
            if frame.path[:1] != (expected_from,):
                self.count("dropped")
                return True
            answer.append(frame)
            done.set()
            return True
        if frame.action not in ACTIONS or not frame.path:
            return False
        origin = frame.path[0]
        payload = frame.payload if isinstance(frame.payload, dict) else {}
        if mtype == CALL and frame.action == OPEN:
            if self._nursery is None:
                return False
            if self._serving >= 2 * self.settings.max_channels:
                # a flood of opens: each would be refused anyway; none is answered, so a
                # slow answer path cannot pile up tasks here
                self.count("dropped")
                return True
            self._serving += 1
            self._nursery.start_soon(self._serve_open_counted, frame)
            return True
        if mtype != SEND:
            return False
        cid = payload.get("channel")
        channel = self.channels.get((origin, cid)) if isinstance(cid, str) else None
        if channel is None:
            self.count("dropped")
            return True
        if frame.action == ACK:
            received = payload.get("received")
            try:
                if type(received) is not int:
                    raise ChannelFault("an acknowledgement needs an integer 'received'")
                if channel.outbound.acknowledge(received):
                    channel.credit.set()
            except ChannelFault as fault:
                self.count("faults")
                self.end(channel, fault.reason, tell=True)
        else:  # CLOSE: what arrived is still written out, then the TCP side closes
            reason = str(payload.get("reason", ""))[:MAX_REASON]
            self.end(channel, f"closed by {origin}: {reason}", tell=False, drain=True)
        return True

    def _data(self, frame: OverlayFrame) -> None:
        channel = self.channels.get((frame.path[0], frame.id)) if frame.path else None
        if channel is None or channel.reason:
            self.count("dropped")
            return
        data = frame.payload
        assert isinstance(data, bytes) and frame.offset is not None  # decoding checked
        try:
            channel.inbound.accept(frame.offset, len(data))
        except ChannelFault as fault:
            self.count("faults")
            self.end(channel, fault.reason, tell=True)
            return
        channel.last_active = trio.current_time()
        channel.buffer += data  # within the window: Inbound.accept checked
        channel.readable.set()

    # --- opening --------------------------------------------------------------------------

    async def _open(self, tunnel: TunnelEntry, stream: trio.SocketStream) -> None:
        """A connection on a tunnel's listener: open a channel to the tunnel's node."""
        if self._full():
            self._refused(tunnel.name, tunnel.node, tunnel.target, "here",
                          f"this node holds its limit of {self.settings.max_channels} channels")
            return
        opened = await self.request(tunnel.node, tunnel.name, tunnel.target,
                                     {"target": tunnel.target}, stream)
        if not isinstance(opened, Refused):
            await self.run_channel(opened[0])

    async def request(self, node: str, name: str, what: str, fields: dict[str, Any],
                       stream: trio.abc.Stream) -> tuple[Channel, dict[str, Any]] | Refused:
        """Ask ``node`` to open a channel (a ``target`` or a ``file`` in ``fields``) for
        ``stream``: the channel, registered, and the answer; or why not (logged).

        The channel is registered before the open leaves, with no credit until the answer
        gives the far end's window: data the far end sends right behind its answer (in the
        same batch) finds it."""
        cid, mid = uuid.uuid4().hex[:16], uuid.uuid4().hex[:20]
        window = self.settings.window_bytes
        payload: dict[str, Any] = {"channel": cid, **fields, "window": window}
        verdict = self._gate().check(Frame(CALL, mid, action=OPEN, payload=payload), None,
                                     OPEN, DIRECTION, name, None, True)
        if not verdict.forward:
            return self._refused(name, node, what, "here",
                                 verdict.refusal or "refused by policy")
        payload = verdict.frame.payload
        done = trio.Event()
        answer: list[OverlayFrame] = []
        channel = self._register(node, cid, name, what, stream, 0, window)
        self._pending[mid] = (node, done, answer)
        why, by = "", "here"
        try:
            await self._send(node, OverlayFrame(CALL, node, (), mid, OPEN, payload))
            with trio.move_on_after(OPEN_TIMEOUT_S):
                await done.wait()
        except NoRoute:
            why = f"no route to {node}"
        finally:
            del self._pending[mid]
        body: dict[str, Any] = {}
        if not why and not answer:
            why = f"no answer from {node} within {OPEN_TIMEOUT_S:g} s"
            if len(self._given_up) >= GIVEN_UP_KEPT:
                self._given_up.pop(next(iter(self._given_up)))
            self._given_up[mid] = (node, cid)
        elif not why:
            reply = answer[0]
            body = reply.payload if reply.type == CALLRESULT else {}
            their_window = body.get("window")
            if type(their_window) is int and MIN_WINDOW <= their_window <= MAX_WINDOW:
                channel.outbound.window = their_window
                channel.credit.set()
                return channel, body
            why = (f"{reply.code}: {reply.description}" if reply.type == CALLERROR
                   else "the answer carries no valid window")
            by = node
        if self.channels.get(channel.key) is channel:
            del self.channels[channel.key]
        return self._refused(name, node, what, by, why)

    async def _serve_open_counted(self, frame: OverlayFrame) -> None:
        try:
            await self._serve_open(frame)
        except Exception as exc:
            # a bug, or a fault nobody foresaw, costs this channel, never the node
            self.count("faults")
            log.exception("channel failed", extra={"fields": {"far_node": frame.path[0],
                                                              "error": repr(exc)}})
        finally:
            self._serving -= 1

    async def _serve_open(self, frame: OverlayFrame) -> None:
        """A ``ChannelOpen`` from another node: check, connect to the target (or open the
        file), answer."""
        origin = frame.path[0]
        payload = frame.payload
        cid, window = payload.get("channel"), payload.get("window")
        target, file = payload.get("target"), payload.get("file")
        is_file = type(file) is str
        what = str(f"file {file}" if is_file else target)[:100]
        settings = self.settings
        problem: tuple[str, str] | None = None
        if (type(cid) is not str or not 1 <= len(cid) <= MAX_MESSAGE_ID
                or type(window) is not int or not MIN_WINDOW <= window <= MAX_WINDOW
                or (type(target) is str) == is_file
                or ("file" in payload and not is_file)
                or ("target" in payload and type(target) is not str)):
            problem = ("FormationViolation", "ChannelOpen needs channel (1-36 characters), "
                       f"window ({MIN_WINDOW}-{MAX_WINDOW} bytes) and either target or file")
        elif not is_file and target not in settings.allow_targets:
            problem = ("SecurityError", f"target {what} is not in this node's "
                       "[channels] allow_targets")
        elif is_file and settings.files_dir is None:
            problem = ("SecurityError", "this node serves no files ([channels] files_dir)")
        elif (origin, cid) in self.channels or (origin, cid) in self._opening:
            problem = ("OccurrenceConstraintViolation", f"channel {cid} is open already")
        elif self._full():
            problem = ("GenericError", f"this node holds its limit of "
                       f"{settings.max_channels} channels")
        if problem is None:
            verdict = self._gate().check(Frame(CALL, frame.id, action=OPEN, payload=payload),
                                         None, OPEN, DIRECTION, origin, None, False)
            if not verdict.forward:
                problem = ("SecurityError", verdict.refusal or "refused by policy")
        if problem is not None:
            await self._refuse_open(frame, origin, str(cid)[:MAX_MESSAGE_ID], what, problem)
            return
        assert isinstance(cid, str) and isinstance(window, int)
        key = (origin, cid)
        self._opening.add(key)
        stream: trio.abc.Stream
        try:
            if is_file:
                stream, extra = await self._open_file(str(file), payload.get("offset", 0))
            else:
                stream, extra = await self._connect(str(target)), {}
        except FileProblem as exc:
            self._opening.discard(key)
            await self._refuse_open(frame, origin, cid, what, ("PropertyConstraintViolation",
                                                               str(exc)))
            return
        except (OSError, trio.TooSlowError, ValueError) as exc:
            self._opening.discard(key)
            why = f"cannot connect to {what}: {getattr(exc, 'strerror', None) or exc!r}"
            await self._refuse_open(frame, origin, cid, what, ("InternalError", why))
            return
        try:
            ours = settings.window_bytes
            # registered before the answer leaves: the opener's data may follow it at once
            channel = self._register(origin, cid, what, what, stream, window, ours)
            self._opening.discard(key)
            if await self._answer(origin, OverlayFrame(CALLRESULT, origin, (), frame.id,
                                                       payload={"window": ours, **extra})):
                await self.run_channel(channel)
            else:
                del self.channels[key]
        finally:
            self._opening.discard(key)
            await trio.aclose_forcefully(stream)

    async def _refuse_open(self, frame: OverlayFrame, origin: str, cid: str, what: str,
                           problem: tuple[str, str]) -> None:
        self._refused(cid, origin, what, "here", problem[1])
        await self._answer(origin, OverlayFrame(CALLERROR, origin, (), frame.id,
                                                code=problem[0], description=problem[1],
                                                details={}))

    async def _connect(self, target: str) -> trio.abc.Stream:
        host, _, port = target.rpartition(":")
        with trio.fail_after(self.settings.connect_timeout_s):
            return await open_tcp(host.strip("[]"), int(port))

    async def _open_file(self, name: str, offset: object) -> tuple[FileSource, dict[str, Any]]:
        files_dir = self.settings.files_dir
        assert files_dir is not None
        try:
            path = resolve(files_dir, name)
            size = path.stat().st_size
            if type(offset) is not int or not 0 <= offset <= size:
                raise FileProblem(f"offset must be an integer from 0 to the size, {size}")
            digest = await self._digests.of(path)
            return FileSource(path, offset), {"size": size, "sha256": digest}
        except OSError as exc:
            raise FileProblem(f"cannot read {name[:100]}: {why(exc)}") from None

    def _refused(self, name: str, other: str, target: str, by: str, reason: str) -> Refused:
        self.count("refused")
        entry = {"channel": name, "far_node": other, "target": target, "refused_by": by,
                 "reason": reason}
        self._gate().audit("channel_refused", entry)  # audited before it is logged
        log_event(log, logging.WARNING, "channel_refused", **entry)
        return Refused(by, reason)

    # --- a channel's life -----------------------------------------------------------------

    def _register(self, other: str, cid: str, name: str, target: str,
                  stream: trio.abc.Stream, their_window: int, our_window: int) -> Channel:
        now = trio.current_time()
        channel = Channel(other, cid, name, target, stream, Outbound(their_window),
                          Inbound(our_window), now, now)
        self.channels[channel.key] = channel
        return channel

    async def run_channel(self, channel: Channel) -> None:
        """Carry a registered channel until it ends; then forget it, audited."""
        other, cid, name, target = channel.other, channel.cid, channel.name, channel.target
        try:
            self.count("opened")
            opened = {"channel": name, "id": cid, "far_node": other, "target": target}
            self._gate().audit("channel_opened", opened)  # audited before it is logged
            log_event(log, logging.INFO, "channel_opened", **opened)
            with channel.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._to_stream, channel, nursery.cancel_scope)
                    with channel.reader_scope:
                        await self._from_stream(channel)
        finally:
            if self.channels.get(channel.key) is channel:
                del self.channels[channel.key]
            if channel.draining and channel.scope.cancelled_caught:
                channel.reason += f"; not all written out within {DRAIN_S:g} s"
            self.count("closed")
            entry = {"channel": name, "id": cid, "far_node": other, "target": target,
                     "reason": channel.reason or "closed", "bytes_out": channel.outbound.sent,
                     "bytes_in": channel.inbound.written,
                     "seconds": round(trio.current_time() - channel.opened_at, 3)}
            self._gate().audit("channel_closed", entry)
            log_event(log, logging.INFO, "channel_closed", **entry)

    async def _from_stream(self, channel: Channel) -> None:
        """TCP to overlay, within the far end's credit."""
        outbound = channel.outbound
        while True:
            credit = outbound.credit()
            if credit <= 0:
                self.count("stalls")
                channel.credit = trio.Event()
                await channel.credit.wait()
                continue
            try:
                data = await channel.stream.receive_some(min(CHUNK, credit))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.end(channel, f"{channel.name} side failed: {why(exc)}", tell=True)
                return
            if not data:
                self.end(channel, getattr(channel.stream, "end_reason", None)
                          or f"{channel.name} side closed the connection", tell=True)
                return
            offset = outbound.take(len(data))
            channel.last_active = trio.current_time()
            self.count("bytes_out", len(data))
            try:
                await self._send(channel.other, OverlayFrame(
                    CHANNEL_DATA, channel.other, (), channel.cid, payload=data, offset=offset))
            except NoRoute:
                self.end(channel, f"route to {channel.other} lost", tell=False)
                return

    async def _to_stream(self, channel: Channel, scope: trio.CancelScope) -> None:
        """Overlay to TCP; acknowledges as it writes. Ends the channel when it ends."""
        try:
            while True:
                if not channel.buffer:
                    if channel.draining:
                        return
                    channel.readable = trio.Event()
                    await channel.readable.wait()
                    continue
                data = bytes(channel.buffer)
                channel.buffer.clear()
                try:
                    await channel.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.end(channel, f"{channel.name} side failed: {why(exc)}", tell=True)
                    return
                self.count("bytes_in", len(data))
                channel.last_active = trio.current_time()
                ack = channel.inbound.wrote(len(data))
                if getattr(channel.stream, "complete", False):
                    return  # a fetch with every byte: nothing more is due
                if ack is not None:
                    await self._control(channel, ACK, {"received": ack})
        finally:
            scope.cancel()

    def end(self, channel: Channel, reason: str, *, tell: bool, drain: bool = False) -> None:
        """Close a channel once: tell the far end why (if asked and a route exists); with
        ``drain``, what arrived is written out (for at most DRAIN_S) before the TCP side
        closes."""
        if channel.reason:
            return
        channel.reason = reason
        if tell:
            frame = OverlayFrame(SEND, channel.other, (), uuid.uuid4().hex[:20], CLOSE,
                                 {"channel": channel.cid, "reason": reason[:MAX_REASON]})
            if self._nursery is not None:
                self._nursery.start_soon(self._send_close, frame)
            else:
                self.count("dropped")
        if drain:
            channel.draining = True
            channel.readable.set()
            channel.reader_scope.cancel()
            channel.scope.deadline = min(channel.scope.deadline,
                                         trio.current_time() + DRAIN_S)
        else:
            channel.scope.cancel()

    def _close_late(self, node: str, cid: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._send_close, OverlayFrame(
                SEND, node, (), uuid.uuid4().hex[:20], CLOSE,
                {"channel": cid, "reason": "the open was given up before its answer came"}))

    async def _send_close(self, frame: OverlayFrame) -> None:
        with trio.move_on_after(CLOSE_SEND_S) as waited:
            try:
                await self._send(frame.dest, frame)
            except NoRoute:
                self.count("dropped")
        if waited.cancelled_caught:
            self.count("dropped")

    # --- sending --------------------------------------------------------------------------

    async def _send(self, dest: str, frame: OverlayFrame) -> None:
        """Queue a frame toward ``dest`` (waiting while that link's queue is full)."""
        link = self.state.link_toward(dest)
        if link is None:
            raise NoRoute(dest)
        try:
            if frame.type != CHANNEL_DATA:
                await link.send(frame)
            elif await link.send_bulk(frame):  # at most half the link's queue
                self.count("stalls")
        except LinkClosed:
            raise NoRoute(dest) from None

    async def _control(self, channel: Channel, action: str, body: dict[str, Any]) -> None:
        try:
            await self._send(channel.other, OverlayFrame(
                SEND, channel.other, (), uuid.uuid4().hex[:20], action,
                {"channel": channel.cid, **body}))
        except NoRoute:
            self.end(channel, f"route to {channel.other} lost", tell=False)

    async def _answer(self, dest: str, frame: OverlayFrame) -> bool:
        try:
            await self._send(dest, frame)
        except NoRoute:
            self.count("dropped")
            return False
        return True


async def _close_gently(stream: trio.SocketStream) -> None:
    """Close a tunnel client's connection with a FIN it can read as the end: a socket
    closed with unread bytes in it sends a reset instead (a refused channel's client has
    usually sent its first request already)."""
    with trio.CancelScope(shield=True), trio.move_on_after(0.5):
        try:
            await stream.send_eof()
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def why(exc: BaseException) -> str:
    """An exception as a short reason for a log line or a close."""
    return (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)[:100]
