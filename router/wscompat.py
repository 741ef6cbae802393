"""A fix for trio-websocket's handling of protocol errors that wsproto detects locally.

When a peer sends a text message that is not valid UTF-8, wsproto yields a
``CloseConnection(1007)`` event while the connection is still OPEN: it tells the
application to close with that code. trio-websocket 0.12 only answers close events
that arrive in REMOTE_CLOSING (a peer's own close), so it drops the TCP connection
without any close frame and the peer sees 1006. RFC 6455 section 8.1 wants 1007 sent.
``install()`` makes the handler send the close frame wsproto asked for first.
"""

from __future__ import annotations

import contextlib
from typing import Any

from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

_installed = False


def install() -> None:
    """Patch WebSocketConnection once; idempotent."""
    global _installed
    if _installed:
        return
    original = WebSocketConnection._handle_close_connection_event

    async def handle_close(self: Any, event: CloseConnection) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            with contextlib.suppress(ConnectionClosed):
                await self._send(CloseConnection(code=event.code, reason=event.reason))
        await original(self, event)

    WebSocketConnection._handle_close_connection_event = handle_close  # type: ignore[method-assign]
    _installed = True
