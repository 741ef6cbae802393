"""A minimal raw OCPP-J backend (CSMS side) for end-to-end tests of the node.

It runs a ``websockets`` asyncio server on 127.0.0.1 (kernel-chosen port) in a
background thread, so plain synchronous tests can drive it. Stations reach it at
``<url>/<identity>``; the identity is the URL-decoded last path segment.

Behaviour:

* accepts ``ocpp2.1``, ``ocpp2.0.1`` and ``ocpp1.6`` (first one the client offers that
  the backend supports, i.e. the client's order);
* records every text frame it receives, per identity, exactly as received;
* answers every CALL ``[2, id, action, payload]`` with ``[3, id, {"echo": action}]``
  unless :meth:`RawBackend.set_answer` says otherwise (other payload, delayed, held
  until :meth:`RawBackend.release`, or never);
* :meth:`RawBackend.send` puts any raw frame on a station's backend socket.

Synchronisation helpers (:meth:`RawBackend.wait_until`, :meth:`RawBackend.wait_frames`,
:meth:`RawBackend.wait_connected`) block on a condition variable with a timeout; no
sleeping is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event
from websockets.typing import Subprotocol

ALL_SUBPROTOCOLS = ("ocpp2.1", "ocpp2.0.1", "ocpp1.6")

Payload = Callable[[str, str, Any], Any]
"""Builds a CALLRESULT payload from (identity, action, request payload)."""


def echo_payload(identity: str, action: str, payload: Any) -> Any:
    return {"echo": action}


@dataclass
class Answer:
    """How the backend answers CALLs with one action."""

    payload: Payload = echo_payload
    delay: float = 0.0
    never: bool = False
    held: bool = False


@dataclass
class PendingCall:
    identity: str
    message_id: str
    action: str
    payload: Any
    connection: ServerConnection


class RawBackend:
    """Raw OCPP-J backend in a background thread; use as a context manager."""

    def __init__(
        self,
        subprotocols: Sequence[str] = ALL_SUBPROTOCOLS,
        *,
        path: str = "/ocpp",
        max_size: int | None = 16 * 1024 * 1024,
    ) -> None:
        self.supported = list(subprotocols)
        self.path = path.rstrip("/")
        self.max_size = max_size
        self.port = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # Everything below is guarded by self._cond.
        self.frames: dict[str, list[str]] = defaultdict(list)
        self.binary: dict[str, list[bytes]] = defaultdict(list)
        self.handshakes: list[str] = []
        self.connections: dict[str, ServerConnection] = {}
        self.subprotocol: dict[str, str | None] = {}
        self.connect_count: dict[str, int] = defaultdict(int)
        self.closes: dict[str, list[tuple[int | None, str]]] = defaultdict(list)
        self.close_frames: dict[str, list[tuple[int, str]]] = defaultdict(list)
        self.outstanding: dict[str, int] = defaultdict(int)
        self.max_outstanding: dict[str, int] = defaultdict(int)
        self.unanswered: list[PendingCall] = []
        self._held: list[PendingCall] = []
        self._answers: dict[tuple[str | None, str], Answer] = {}
        self._refuse: dict[str, int] = {}
        self._no_subprotocol: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """What goes into the node's ``[[backends]] url`` (the node appends /<identity>)."""
        return f"ws://127.0.0.1:{self.port}{self.path}"

    def start(self) -> RawBackend:
        self._thread = threading.Thread(target=self._run, name="raw-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise TimeoutError("raw backend did not start")
        if self._error is not None:
            raise RuntimeError("raw backend failed to start") from self._error
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
        if self._thread is not None:
            self._thread.join(10.0)

    def __enter__(self) -> RawBackend:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced through start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        backend = self

        class Connection(ServerConnection):
            """Notes each close frame as it arrives (the TCP close may come much later)."""

            def process_event(self, event: Event) -> None:
                super().process_event(event)
                if isinstance(event, Frame) and event.opcode is Opcode.CLOSE:
                    backend._on_close_frame(self)

        async with serve(
            self._handler,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol(s) for s in self.supported] or None,
            select_subprotocol=self._select_subprotocol,
            process_request=self._process_request,
            compression=None,
            max_size=self.max_size,
            max_queue=None,
            ping_interval=None,
            create_connection=Connection,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    # ------------------------------------------------------------------ configuration

    def set_answer(
        self,
        action: str,
        *,
        identity: str | None = None,
        payload: Payload | None = None,
        delay: float = 0.0,
        never: bool = False,
        held: bool = False,
    ) -> None:
        """Change how CALLs with ``action`` are answered (for one identity, or all).

        ``never``: not answered at all (listed in :attr:`unanswered`).
        ``held``: answered only once :meth:`release` is called for the action.
        """
        with self._cond:
            self._answers[(identity, action)] = Answer(payload or echo_payload, delay, never, held)

    def _answer_for(self, identity: str, action: str) -> Answer:
        return (
            self._answers.get((identity, action)) or self._answers.get((None, action)) or Answer()
        )

    def release(self, action: str) -> None:
        """Answer every held CALL with ``action`` and stop holding new ones."""

        async def _release() -> None:
            with self._cond:
                for (_, act), answer in self._answers.items():
                    if act == action:
                        answer.held = False
                held = [c for c in self._held if c.action == action]
                self._held = [c for c in self._held if c.action != action]
            for call in held:
                await self._answer(call, self._answer_for(call.identity, action))

        self._call_in_loop(_release())

    def refuse(self, identity: str, status: int) -> None:
        """Answer the node's handshake for ``identity`` with this HTTP status."""
        with self._cond:
            self._refuse[identity] = status

    def accept_without_subprotocol(self, identity: str) -> None:
        """Complete the handshake for ``identity`` without choosing a subprotocol."""
        with self._cond:
            self._no_subprotocol.add(identity)

    # ------------------------------------------------------------------ actions

    def send(self, identity: str, message: str | bytes, *, text: bool | None = None) -> None:
        """Send a raw frame on the backend socket of ``identity``'s link."""
        with self._cond:
            ws = self.connections.get(identity)
        if ws is None:
            raise KeyError(f"no backend connection for {identity!r}")
        self._call_in_loop(ws.send(message, text=text))

    def close(self, identity: str, code: int = 1000, reason: str = "") -> None:
        """Start closing ``identity``'s backend socket (does not wait for the handshake)."""
        with self._cond:
            ws = self.connections.get(identity)
        if ws is None:
            raise KeyError(f"no backend connection for {identity!r}")
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(ws.close(code, reason), self._loop)

    def _call_in_loop(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ observation

    def received(self, identity: str) -> list[str]:
        with self._cond:
            return list(self.frames.get(identity, ()))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Block until ``predicate()`` (evaluated under the backend's lock) is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("raw backend: condition not met in time")
                self._cond.wait(left)

    def wait_frames(self, identity: str, count: int, timeout: float = 10.0) -> list[str]:
        """Block until at least ``count`` text frames arrived for ``identity``."""
        self.wait_until(lambda: len(self.frames.get(identity, ())) >= count, timeout)
        return self.received(identity)

    def wait_connected(self, identity: str, timeout: float = 10.0) -> str | None:
        """Block until the node opened a link for ``identity``; return its subprotocol."""
        self.wait_until(lambda: identity in self.connections, timeout)
        with self._cond:
            return self.subprotocol[identity]

    def wait_close_frame(self, identity: str, timeout: float = 10.0) -> tuple[int, str]:
        """Block until the node sent a close frame on ``identity``'s link; (code, reason)."""
        self.wait_until(lambda: bool(self.close_frames.get(identity)), timeout)
        with self._cond:
            return self.close_frames[identity][-1]

    def wait_closed(self, identity: str, timeout: float = 10.0) -> tuple[int | None, str]:
        """Block until a link for ``identity`` is gone (TCP closed); (code, reason) of the last."""
        self.wait_until(lambda: bool(self.closes.get(identity)), timeout)
        with self._cond:
            return self.closes[identity][-1]

    # ------------------------------------------------------------------ server side

    def _identity(self, path: str) -> str | None:
        path = path.split("?", 1)[0]
        prefix = self.path + "/"
        if not path.startswith(prefix):
            return None
        return unquote(path[len(prefix) :])

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        identity = self._identity(request.path)
        with self._cond:
            self.handshakes.append(identity if identity is not None else request.path)
            self._cond.notify_all()
            status = self._refuse.get(identity or "")
        if identity is None:
            return connection.respond(404, "unknown path\n")
        if status is not None:
            return connection.respond(status, "refused by test backend\n")
        return None

    def _on_close_frame(self, ws: ServerConnection) -> None:
        identity = self._identity(ws.request.path if ws.request else "") or ""
        rcvd = ws.protocol.close_rcvd
        with self._cond:
            self.close_frames[identity].append(
                (rcvd.code, rcvd.reason) if rcvd is not None else (1005, "")
            )
            self._cond.notify_all()

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Sequence[str]
    ) -> Subprotocol | None:
        identity = self._identity(connection.request.path if connection.request else "")
        with self._cond:
            if identity in self._no_subprotocol:
                return None
        for proto in offered:
            if proto in self.supported:
                return Subprotocol(proto)
        raise NegotiationError("no common subprotocol")

    async def _handler(self, ws: ServerConnection) -> None:
        identity = self._identity(ws.request.path if ws.request else "") or ""
        with self._cond:
            self.connections[identity] = ws
            self.subprotocol[identity] = ws.subprotocol
            self.connect_count[identity] += 1
            self._cond.notify_all()
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    with self._cond:
                        self.binary[identity].append(message)
                        self._cond.notify_all()
                    continue
                with self._cond:
                    self.frames[identity].append(message)
                    self._cond.notify_all()
                self._on_text(ws, identity, message, tasks)
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                if self.connections.get(identity) is ws:
                    del self.connections[identity]
                self.closes[identity].append((ws.close_code, ws.close_reason or ""))
                self._cond.notify_all()

    def _on_text(
        self, ws: ServerConnection, identity: str, message: str, tasks: set[asyncio.Task[None]]
    ) -> None:
        try:
            frame = json.loads(message)
        except ValueError:
            return
        if not (
            isinstance(frame, list)
            and len(frame) >= 3
            and frame[0] == 2
            and isinstance(frame[1], str)
            and isinstance(frame[2], str)
        ):
            return
        action = frame[2]
        call = PendingCall(identity, frame[1], action, frame[3] if len(frame) > 3 else None, ws)
        with self._cond:
            self.outstanding[identity] += 1
            self.max_outstanding[identity] = max(
                self.max_outstanding[identity], self.outstanding[identity]
            )
            answer = self._answer_for(identity, action)
            if answer.never:
                self.unanswered.append(call)
                self._cond.notify_all()
                return
            if answer.held:
                self._held.append(call)
                self._cond.notify_all()
                return
        task = asyncio.get_running_loop().create_task(self._answer(call, answer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _answer(self, call: PendingCall, answer: Answer) -> None:
        if answer.delay > 0:
            await asyncio.sleep(answer.delay)
        result = answer.payload(call.identity, call.action, call.payload)
        with self._cond:
            self.outstanding[call.identity] -= 1
            self._cond.notify_all()
        with contextlib.suppress(ConnectionClosed):
            await call.connection.send(json.dumps([3, call.message_id, result]))

    def held_count(self, action: str) -> int:
        with self._cond:
            return sum(1 for c in self._held if c.action == action)
