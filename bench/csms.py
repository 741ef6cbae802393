"""Minimal benchmark CSMS: answers every CALL with an empty CALLRESULT, nothing else.

Runs in its own process (asyncio + websockets) so it costs the measured middle
process nothing. Accepts any path and any identity; picks the first offered
OCPP subprotocol it knows. Prints ``{"event": "listening", "port": N}`` on stdout
once ready and runs until SIGTERM/SIGINT. ``--compression deflate`` accepts
permessage-deflate with websockets' default server settings when a client offers it.

    .venv/bin/python bench/csms.py --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time

from benchutil import GcPauses, emit, raise_nofile_limit
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SUBPROTOCOLS = [Subprotocol("ocpp1.6"), Subprotocol("ocpp2.0.1"), Subprotocol("ocpp2.1")]


def answer(frame: str) -> str | None:
    """The CALLRESULT for a CALL frame, or None for anything else.

    The load generator writes CALLs as ``[2,"<id>",...`` and the node forwards
    frames as the same text, so the id is sliced out without a JSON parse; other
    spellings fall back to json.loads.
    """
    if frame.startswith('[2,"'):
        end = frame.find('"', 4)
        if end > 4 and "\\" not in frame[4:end]:
            return f'[3,"{frame[4:end]}",{{}}]'
    try:
        parsed = json.loads(frame)
    except ValueError:
        return None
    if isinstance(parsed, list) and len(parsed) == 4 and parsed[0] == 2:
        return json.dumps([3, parsed[1], {}], separators=(",", ":"))
    return None


STALL = False  # --stall: accept and read everything, answer nothing (a stalled secondary)


def log_gc_pause(generation: int, ms: float) -> None:
    """A long collector pause, as one JSON line on stderr (bench/fleet.py reads them)."""
    sys.stderr.write(json.dumps({"event": "gc_pause", "ts": time.time(),
                                 "generation": generation, "ms": round(ms, 1)}) + "\n")


async def handle(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            if isinstance(message, str) and not STALL:
                reply = answer(message)
                if reply is not None:
                    await ws.send(reply)
    except ConnectionClosed:
        pass


async def main(host: str, port: int, compression: str | None,
               tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handle,
        host,
        port,
        subprotocols=SUBPROTOCOLS,
        compression=compression,
        ssl=tls,
        ping_interval=None,
        max_size=65536,
        backlog=4096,
    ) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        emit("listening", host=host, port=bound)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--stall", action="store_true", help="never answer (a stalled peer)")
    parser.add_argument("--compression", choices=("none", "deflate"), default="none",
                        help="deflate: accept websockets' default permessage-deflate")
    parser.add_argument("--tls-cert", default=None, help="wss: server certificate chain (PEM)")
    parser.add_argument("--tls-key", default=None, help="wss: its private key (PEM)")
    args = parser.parse_args()
    STALL = args.stall
    raise_nofile_limit()
    GcPauses(on_pause=log_gc_pause)
    server_tls = None
    if args.tls_cert:
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(main(args.host, args.port, None if args.compression == "none" else "deflate",
                     server_tls))
