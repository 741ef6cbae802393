"""Naive WebSocket relay: the reference cost of "just proxying" with trio-websocket.

For each station it dials ``<backend><same path>`` offering the station's
subprotocols, accepts the station with the subprotocol the backend chose, then
copies messages both ways until either side closes. No parsing, no checks, no
queues of its own. Prints ``{"event": "listening", "port": N}`` when ready.

    .venv/bin/python bench/relay.py --backend ws://127.0.0.1:9100 --port 0
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from functools import partial

import trio
from benchutil import emit, raise_nofile_limit
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

MAX_MESSAGE = 65536


async def _copy(
    src: WebSocketConnection, dst: WebSocketConnection, scope: trio.CancelScope
) -> None:
    try:
        while True:
            await dst.send_message(await src.get_message())
    except ConnectionClosed:
        pass
    finally:
        scope.cancel()


def make_handler(backend: str) -> Callable[[WebSocketRequest], Awaitable[None]]:
    async def handler(request: WebSocketRequest) -> None:
        accepted = False
        try:
            async with open_websocket_url(
                backend + request.path,
                subprotocols=list(request.proposed_subprotocols),
                max_message_size=MAX_MESSAGE,
            ) as upstream:
                station = await request.accept(subprotocol=upstream.subprotocol)
                accepted = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_copy, station, upstream, nursery.cancel_scope)
                    nursery.start_soon(_copy, upstream, station, nursery.cancel_scope)
                await station.aclose()
        except (HandshakeError, OSError):
            if not accepted:
                await request.reject(502)

    return handler


async def main(host: str, port: int, backend: str) -> None:
    async with trio.open_nursery() as nursery:
        serve = partial(
            serve_websocket,
            make_handler(backend.rstrip("/")),
            host,
            port,
            None,
            max_message_size=MAX_MESSAGE,
        )
        server = await nursery.start(serve)
        emit("listening", host=host, port=server.port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backend", required=True, help="ws://host:port (path is copied)")
    args = parser.parse_args()
    raise_nofile_limit()
    trio.run(main, args.host, args.port, args.backend)
