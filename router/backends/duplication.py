"""Duplication: copies of station frames to subscribed secondary backends.

Names: a *secondary* is a ``[[backends]]`` entry with ``role = "secondary"``; log fields
and metrics call it a ``subscriber`` and its counters ``fanout``, as they always have.

The primary path only ever calls :meth:`Duplicator.offer`, which never waits: a copy goes
into a secondary's bounded inbox or, if that is full, is counted as an overflow. Each
secondary drains its inbox in a task of its own, over one WebSocket per station to the
secondary (the station's identity in the path, as if the station were connected to it;
the station's latest BootNotification is replayed first so a standard CSMS accepts it).
When the secondary is down or falling behind, copies spill to a durable outbox (SQLite,
router/backends/outbox.py) and are replayed from it, oldest first, when it is back: delivery is
at-least-once, with the original payload. See docs/duplication.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from policies.jws import inner_action, unwrap
from router.backends.boots import BootCache
from router.backends.outbox import Outbox, OutboxError, OutboxItem
from router.config import BackendEntry, NodeSection, unwraps_signed
from router.logs import log_event
from router.net.handshake import HandshakeFailed, dial
from router.net.tls import TlsFor, tls_failure
from router.net.wslink import LinkClosed, WsLink
from router.relay.registry import SessionRegistry
from router.wire.frames import (
    CALL,
    CALLERROR,
    CALLRESULT,
    FrameError,
    Problem,
    Version,
    decode,
    error_answer,
)

log = logging.getLogger("router.fanout")
_REPLAY_BATCH = 200
IDLE_CLOSE_S = 300.0  # a station's link to a secondary closes after this long unused
EXPIRE_EVERY_S = 60.0
# after the outbox failed a write (disk full, I/O error) the drain pauses this long before
# it takes more copies from the inbox, doubling up to WRITE_RETRY_MAX_S while it fails
WRITE_RETRY_S = 1.0
WRITE_RETRY_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class DuplicationContext:
    """What duplication needs from the node: where to keep the outbox, the live ``[node]``
    settings, the message size limit, and the sessions (a secondary's command goes to
    the station's session, if it is allowed)."""

    state_dir: Path
    settings: Callable[[], NodeSection]
    max_message_bytes: int
    sessions: SessionRegistry
    tls: TlsFor  # the client TLS context of a secondary's settings


@dataclass(slots=True)
class SecondaryStats:
    """Per-secondary counters (exposed as metrics by the admin endpoint)."""

    offered: int = 0
    delivered: int = 0
    answered: int = 0
    spilled: int = 0
    replayed: int = 0
    dropped: int = 0  # outbox bounds (oldest first), inbox overflow, outbox write failures
    refused_commands: int = 0


class SecondaryLink:
    """One station's WebSocket to a secondary: our copies out, its answers consumed."""

    def __init__(self, sub: Secondary, station: str, ws: WsLink) -> None:
        self.sub = sub
        self.station = station
        self.ws = ws
        self.version = Version.from_subprotocol(ws.subprotocol or "ocpp2.0.1")
        self._waiting: tuple[str, trio.MemorySendChannel[bool]] | None = None
        self._ids = 0
        self.closed = False
        self.last_used = trio.current_time()

    async def call(self, action: str, payload_text: str) -> bool:
        """Send one copy as a CALL; True once the secondary answered it (either way)."""
        self._ids += 1
        self.last_used = trio.current_time()
        message_id = f"dup-{self._ids}"
        answered_send, answered = trio.open_memory_channel[bool](1)
        self._waiting = (message_id, answered_send)
        self.sub.current = self
        try:
            await self.ws.send_message(
                f'[{CALL},"{message_id}",{json.dumps(action)},{payload_text}]')
            with trio.move_on_after(self.sub.entry.answer_timeout_s):
                return await answered.receive()
            log_event(log, logging.WARNING, "secondary_timeout", subscriber=self.sub.name,
                      station=self.station, action=action)
            return False
        except (LinkClosed, trio.EndOfChannel):
            return False
        finally:
            self._waiting = None
            self.sub.current = None

    def abort(self) -> None:
        """Give up waiting for the copy in flight (its inbox is filling up behind it)."""
        waiting = self._waiting
        if waiting is not None:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError,
                                     trio.BrokenResourceError):
                waiting[1].send_nowait(False)

    async def read(self) -> None:
        """Consume the secondary's answers; its own CALLs go to the station only if allowed."""
        try:
            while True:
                text = await self.ws.get_message()
                if not isinstance(text, str):
                    continue
                try:
                    frame = decode(text, self.version)
                except FrameError:
                    continue
                if frame.type in (CALLRESULT, CALLERROR):
                    waiting = self._waiting
                    if waiting is not None and waiting[0] == frame.id:
                        self.sub.stats.answered += 1
                        # the wait may have been abandoned already (abort): that is fine
                        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError,
                                                 trio.BrokenResourceError):
                            waiting[1].send_nowait(True)
                elif frame.type == CALL:
                    await self.sub.command(self, frame.id, frame.action or "", frame.payload)
        except LinkClosed:
            pass
        except Exception:
            # a bug here must cost this one link, never the node
            log.exception("secondary link reader failed",
                          extra={"fields": {"subscriber": self.sub.name, "station": self.station}})
        finally:
            self.closed = True
            waiting = self._waiting
            if waiting is not None:
                waiting[1].close()

    async def answer(self, text: str) -> None:
        with contextlib.suppress(LinkClosed):
            await self.ws.send_message(text)


class Secondary:
    """One secondary backend: its inbox, its outbox and its links, drained by one task."""

    def __init__(self, entry: BackendEntry, boots: BootCache, context: DuplicationContext,
                 ) -> None:
        self.context = context
        self.entry = entry
        self.name = entry.name
        self.boots = boots
        self.stats = SecondaryStats()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", entry.name)
        self.outbox = Outbox(context.state_dir / f"outbox-{safe}.sqlite",
                             max_rows_per_subscriber=entry.outbox_max_rows,
                             max_bytes_per_subscriber=entry.outbox_max_bytes,
                             max_age_s=entry.outbox_max_age_s)
        self.backlog = self.outbox.count(self.name)  # copies left from an earlier run
        self._send, self._recv = trio.open_memory_channel[OutboxItem](entry.queue)
        self.links: dict[str, SecondaryLink] = {}
        self._nursery: trio.Nursery | None = None
        self._last_overflow_log = 0.0
        self._write_retry_s = WRITE_RETRY_S  # the pause after the next failed outbox write
        self.current: SecondaryLink | None = None  # the link whose answer we wait for
        self._in_hand: OutboxItem | None = None  # taken from the inbox, being delivered

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    def unwrap_failed(self, station: str, action: str) -> None:
        """A Signed Message this secondary takes plain held nothing to unwrap: no copy."""
        self.stats.offered += 1
        self.stats.dropped += 1
        log_event(log, logging.WARNING, "fanout_unwrap_failed", subscriber=self.name,
                  station=station, action=action[:64])

    def offer(self, item: OutboxItem) -> None:
        """Never waits: the primary path calls this."""
        self.stats.offered += 1
        try:
            self._send.send_nowait(item)
            if self.current is not None and self.queued > self.entry.queue // 2:
                # the secondary is slower than the station: stop waiting on it and spill
                self.current.abort()
        except trio.WouldBlock:
            self.stats.dropped += 1
            now = time.monotonic()
            if now - self._last_overflow_log > 1.0:
                self._last_overflow_log = now
                log_event(log, logging.WARNING, "fanout_overflow", subscriber=self.name,
                          dropped=self.stats.dropped)

    async def _expire(self) -> None:
        """Enforce the outbox's age bound; the oldest copies go first, counted and logged."""
        while True:
            await trio.sleep(EXPIRE_EVERY_S)
            try:
                dropped = await trio.to_thread.run_sync(self.outbox.expire, time.time())
            except OutboxError as exc:
                self._outbox_error("expire", exc)
                continue
            count = dropped.get(self.name, 0)
            if count:
                self.stats.dropped += count
                self.backlog = max(0, self.backlog - count)
                log_event(log, logging.WARNING, "outbox_expired", subscriber=self.name,
                          dropped=count)

    async def _close_idle(self) -> None:
        """A station's link to the secondary closes after a while without copies."""
        while True:
            await trio.sleep(IDLE_CLOSE_S / 4)
            now = trio.current_time()
            for station, link in list(self.links.items()):
                if link.closed or (now - link.last_used > IDLE_CLOSE_S
                                   and link._waiting is None):
                    del self.links[station]
                    await link.ws.aclose(1000, "idle")

    async def run(self) -> None:
        """Drain for as long as the node runs; a failure restarts the drain, never the node.

        When the node stops (this task is cancelled), the copies still in memory, the one
        being delivered included, go to the durable outbox: only a crash loses them. The
        one being delivered may have reached the secondary already and is then sent again
        after the restart (at least once, as after any lost answer)."""
        try:
            while True:
                try:
                    await self._run_once()
                except Exception:
                    log.exception("fanout subscriber failed; restarting it",
                                  extra={"fields": {"subscriber": self.name}})
                    await trio.sleep(1.0)
        finally:
            left = [] if self._in_hand is None else [self._in_hand]
            self._in_hand = None
            left += self._drain()
            if left:
                with trio.CancelScope(shield=True):
                    await self._spill(left)

    async def _run_once(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._close_idle)
            nursery.start_soon(self._expire)
            backoff = 0.5
            while True:
                if self.backlog or self.queued > self.entry.queue // 2:
                    await self._spill(self._drain())
                    if await self._replay():
                        backoff = 0.5
                    else:
                        await self._wait_spilling(backoff)
                        backoff = min(backoff * 2, 30.0)
                    continue
                item = self._in_hand = await self._recv.receive()
                delivered = await self._deliver(item)
                self._in_hand = None
                if not delivered:
                    await self._spill([item, *self._drain()])

    def _drain(self) -> list[OutboxItem]:
        items = []
        while True:
            try:
                items.append(self._recv.receive_nowait())
            except trio.WouldBlock:
                return items

    async def _spill(self, items: list[OutboxItem]) -> bool:
        """Move copies taken from the inbox to the outbox; False if it cannot be written
        (disk full, I/O error): then they are counted as dropped and logged, and the drain
        pauses before it takes more copies (they wait in the inbox meanwhile)."""
        if not items:
            return True
        failure: Exception | None = None
        # once taken from the inbox a copy must reach the outbox or be counted: a deadline
        # or a cancel (shutdown, a failed sibling task) may only interrupt the waits
        with trio.CancelScope(shield=True):
            try:
                dropped = await trio.to_thread.run_sync(self.outbox.append, self.name, items)
            except (OutboxError, OSError, ValueError) as exc:
                failure = exc
        if failure is not None:
            self.stats.dropped += len(items)
            pause = self._write_retry_s
            self._write_retry_s = min(pause * 2, WRITE_RETRY_MAX_S)
            log_event(log, logging.ERROR, "outbox_write_failed", subscriber=self.name,
                      count=len(items), dropped=self.stats.dropped, retry_in_s=pause,
                      reason=str(failure))
            await trio.sleep(pause)
            return False
        self._write_retry_s = WRITE_RETRY_S
        self.stats.spilled += len(items)
        self.stats.dropped += dropped
        self.backlog += len(items) - dropped
        log_event(log, logging.INFO, "fanout_spill", subscriber=self.name, count=len(items),
                  backlog=self.backlog, dropped=dropped)
        return True

    def _outbox_error(self, operation: str, exc: OutboxError) -> None:
        """A failed outbox read, ack or expiry: nothing is lost, the drain tries again."""
        log_event(log, logging.ERROR, "outbox_error", subscriber=self.name,
                  operation=operation, reason=str(exc))

    async def _wait_spilling(self, seconds: float) -> None:
        """Back off from a down secondary while new copies keep going to the outbox."""
        with trio.move_on_after(seconds):
            while True:
                item = await self._recv.receive()
                await self._spill([item, *self._drain()])

    async def _replay(self) -> bool:
        """Deliver the oldest spilled copies; False when the secondary is still unreachable
        (or the outbox cannot be read)."""
        try:
            rows = await trio.to_thread.run_sync(self.outbox.peek, self.name, _REPLAY_BATCH)
        except OutboxError as exc:
            self._outbox_error("read", exc)
            return False
        if not rows:
            self.backlog = 0
            return True
        last = None
        for row_id, item in rows:
            if not await self._deliver(item):
                break
            last = row_id
            self.stats.replayed += 1
        if last is not None:
            try:
                await trio.to_thread.run_sync(self.outbox.ack, self.name, last)
                self.backlog = await trio.to_thread.run_sync(self.outbox.count, self.name)
            except OutboxError as exc:
                # the delivered copies stay in the outbox and go again: at least once
                self._outbox_error("ack", exc)
                return False
            if not self.backlog:
                log_event(log, logging.INFO, "fanout_replayed", subscriber=self.name,
                          replayed=self.stats.replayed)
        return last is not None

    async def _deliver(self, item: OutboxItem) -> bool:
        link = self.links.get(item.station)
        if link is None or link.closed:
            link = await self._open(item.station, item.subprotocol, item.action)
            if link is None:
                return False
        if await link.call(item.action, item.payload):
            self.stats.delivered += 1
            return True
        return False

    async def _open(self, station: str, subprotocol: str, action: str) -> SecondaryLink | None:
        url = self.entry.station_url(quote(station, safe=""))
        try:
            with trio.fail_after(self.context.settings().connect_timeout_s):
                dialing = self.entry.dialing
                ws = await dial(url, [subprotocol], {}, self.context.max_message_bytes,
                                ssl_context=self.context.tls(dialing), dialing=dialing)
        except (HandshakeFailed, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log_event(log, logging.INFO, "secondary_unreachable", subscriber=self.name,
                      station=station, reason=tls_failure(exc) or repr(exc))
            return None
        link = SecondaryLink(self, station, ws)
        self.links[station] = link
        assert self._nursery is not None
        self._nursery.start_soon(link.read)
        boot = self.boots.get(station)
        # a standard CSMS expects a station to boot before anything else
        if (action != "BootNotification" and boot is not None
                and not await link.call("BootNotification", boot[1])):
            await ws.aclose(1001, "boot replay failed")
            return None
        log_event(log, logging.INFO, "secondary_connected", subscriber=self.name,
                  station=station)
        return link

    async def command(self, link: SecondaryLink, message_id: str, action: str,
                      payload: Any) -> None:
        """A CALL from the secondary toward the station: read-only unless allowed."""
        if not self.entry.allow_commands:
            self.stats.refused_commands += 1
            log_event(log, logging.WARNING, "secondary_command_refused", subscriber=self.name,
                      station=link.station, action=action)
            await link.answer(error_answer(
                Problem.SECURITY, link.version, message_id,
                f"secondary backend {self.name!r} is read-only (allow_commands = false)"))
            return
        session = self.context.sessions.get(link.station)
        if session is None:
            await link.answer(error_answer(Problem.INTERNAL, link.version, message_id,
                                           "the station is not connected"))
            return
        await session.call_from(self.name, message_id, action, payload, link.answer)


class Duplicator:
    """Every secondary of a node; the copy is made where the backends are configured."""

    def __init__(self, secondaries: list[BackendEntry], context: DuplicationContext) -> None:
        self.secondaries: list[Secondary] = []
        if secondaries:
            context.state_dir.mkdir(parents=True, exist_ok=True)
            boots = BootCache(context.state_dir / "boots.json")
            self.boots: BootCache | None = boots
            self.secondaries = [Secondary(entry, boots, context) for entry in secondaries]
        else:
            self.boots = None

    @property
    def active(self) -> bool:
        return bool(self.secondaries)

    def offer(self, station: str, subprotocol: str, action: str, payload: Any,
              signed: tuple[str, Any] | None = None) -> None:
        """A station CALL reached the primary path: copy it to whoever subscribed. Never
        waits and does no I/O (inboxes and the boot cache are in memory).

        An OCPP 2.1 Signed Message (``<Action>-Signed``; ``signed`` holds it when the gate
        unwrapped it for the primary) is matched by its plain action and goes to each
        secondary as its ``signed_messages`` says: signed, verifiable end to end, or plain.
        """
        plain = inner_action(action)
        if plain is not None:
            signed = (action, payload)
        subject = plain or action
        forms: dict[bool, tuple[str, str] | None] = {}  # unwrap? -> (action, payload text)
        for sub in self.secondaries:
            if not (sub.entry.subscribes(subject) and sub.entry.serves(station)):
                continue
            unwrap_it = signed is None or unwraps_signed(sub.entry.signed_messages,
                                                         subprotocol)
            if unwrap_it not in forms:
                forms[unwrap_it] = _copy_form(action, payload, signed, unwrap_it)
            form = forms[unwrap_it]
            if form is None:
                sub.unwrap_failed(station, action)
                continue
            sub.offer(OutboxItem(station, subprotocol, form[0], form[1], time.time()))
        if subject == "BootNotification" and self.boots is not None:
            form = forms.get(True) or _copy_form(action, payload, signed, True)
            if form is not None:
                self.boots.remember(station, subprotocol, form[1])

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            if self.boots is not None:
                nursery.start_soon(self.boots.run)
            for sub in self.secondaries:
                nursery.start_soon(sub.run)

    def reconfigure(self, backends: tuple[BackendEntry, ...]) -> None:
        """A reload: secondaries that are still configured take their new subscriptions,
        stations, answer timeout and ``allow_commands``; their queue and outbox bounds,
        and adding or removing one, need a restart (the node's reload says so)."""
        for sub in self.secondaries:
            entry = next((b for b in backends if b.name == sub.name), None)
            if entry is not None:
                sub.entry = entry

    def close(self) -> None:
        """Write the boot cache and close the outboxes (merges their write-ahead logs);
        after the tasks have stopped."""
        if self.boots is not None:
            self.boots.close()
        for sub in self.secondaries:
            sub.outbox.close()


def _copy_form(action: str, payload: Any, signed: tuple[str, Any] | None,
               plain: bool) -> tuple[str, str] | None:
    """A copy's action and payload text: the Signed Message, or the plain action and
    payload (None when a signed payload holds no JSON object to unwrap)."""
    if not plain and signed is not None:
        return signed[0], payload_text(signed[1])
    inner = inner_action(action)
    if inner is None:
        return action, payload_text(payload)
    unwrapped = unwrap(payload)
    return None if unwrapped is None else (inner, payload_text(unwrapped))


def payload_text(payload: Any) -> str:
    """A copy's payload as compact JSON text that can always be sent and stored as UTF-8:
    a lone surrogate a station escaped (``\\ud800``) stays escaped, else no send or outbox
    write of the copy could encode it."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(payload, separators=(",", ":"))
    return text

