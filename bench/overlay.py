"""Overlay benchmark: peer-link throughput per encoding, and a 100,000-route full sync.

Link throughput: two real ``PeerLink`` endpoints (router/overlay/peer_link.py) joined by
a loopback TCP connection in one trio process. The sender queues overlay frames (a ~300-byte
MeterValues CALL) through ``PeerLink.send``; its writer frames them (JSON text, one
msgpack frame per message, or msgpack batches); the receiver's reader decodes each frame
and extends its path, exactly as in a node, then hands it to a counting stub instead of
the mesh. CPU time of the process (both ends) divides the frame count: frames/s per core.

Full sync: ``bench/routes.py``'s measurement of 100,000 station routes between two
exchange sessions, JSON on the wire, with the node's GC settings.

    .venv/bin/python bench/overlay.py [--frames 200000]
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from routes import full_sync  # noqa: E402

from router.net.handshake import dial, read_upgrade  # noqa: E402
from router.overlay.peer_link import PeerLink  # noqa: E402
from router.wire.frames import CALL  # noqa: E402
from router.wire.overlay_frames import OverlayFrame  # noqa: E402
from topology import ExchangeSession, RouteTable  # noqa: E402

PAYLOAD = {"evseId": 1, "meterValue": [{"timestamp": "2026-11-22T10:00:00Z", "sampledValue": [
    {"value": 1234.5, "measurand": "Energy.Active.Import.Register", "unit": "Wh"},
    {"value": 11.2, "measurand": "Power.Active.Import", "unit": "kW"}]}]}


class CountingMesh:
    """Just enough of an overlay for a PeerLink: counts what the reader dispatches."""

    def __init__(self, node_id: str, expected: int) -> None:
        self.node_id = node_id
        self.table = RouteTable(node_id, rng=__import__("random").Random(1))
        self.changed = trio.Event()
        self.received = 0
        self.expected = expected
        self.done = trio.Event()

    async def dispatch(self, link: PeerLink, frame: OverlayFrame) -> None:
        if frame.action == "MeterValues":
            self.received += 1
            if self.received >= self.expected:
                self.done.set()

    def handle_events(self, link: PeerLink, events: list[Any]) -> bool:
        return False

    async def link_gone(self, link: PeerLink) -> None:
        return None

    def count(self, what: str) -> None:
        return None

    def exchange(self, peer_id: str) -> ExchangeSession:
        return ExchangeSession(self.node_id, peer_id, self.table, hold_time_s=3600.0,
                               keepalive_s=1800.0)


async def link_throughput(encoding: str, frames: int, batch: bool) -> tuple[float, float]:
    """(frames/s wall, frames/s per CPU core) for one encoding."""
    sender_mesh = CountingMesh("edge-1", 0)
    receiver_mesh = CountingMesh("core-1", frames)
    async with trio.open_nursery() as nursery:
        accepted: trio.MemorySendChannel[Any]
        accepted, incoming = trio.open_memory_channel[Any](1)

        async def serve(stream: trio.SocketStream) -> None:
            upgrade = await read_upgrade(stream, 2**24)
            ws = await upgrade.accept("ocpp2.1")
            await accepted.send(ws)
            await trio.sleep_forever()

        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        port = listeners[0].socket.getsockname()[1]
        sender_ws = await dial(f"ws://127.0.0.1:{port}/ocpp/edge-1", ["ocpp2.1"], {}, 2**24)
        receiver_ws = await incoming.receive()
        sender = PeerLink(sender_mesh, "core-1", sender_ws, encoding,
                          sender_mesh.exchange("core-1"))
        receiver = PeerLink(receiver_mesh, "edge-1", receiver_ws, encoding,
                            receiver_mesh.exchange("edge-1"))
        nursery.start_soon(sender.run)
        nursery.start_soon(receiver.run)
        frame = OverlayFrame(CALL, "CSMS", ("CS-0001",), "0" * 36, "MeterValues", PAYLOAD)
        await trio.sleep(0.05)  # both exchange sessions have sent their full sync
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(frames):
            if batch:
                # many stations' sessions fill the queue within one scheduling round
                if not sender.send_nowait(frame):
                    await sender.send(frame)
            else:
                # one frame per WebSocket message: let the writer take each as it comes
                await sender.send(frame)
                await trio.lowlevel.checkpoint()
        await receiver_mesh.done.wait()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        nursery.cancel_scope.cancel()
    return frames / wall, frames / cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--routes", type=int, default=100_000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)  # as `ocpp-router run` does
    print(f"overlay link throughput: {args.frames:,} MeterValues CALL frames, two PeerLink "
          "ends over loopback TCP in one process (CPU of both ends counted)")
    print(f"  {'encoding':26s} {'frames/s':>10s} {'frames/s per core':>18s}")
    results = {}
    for label, encoding, batch in (("JSON (one frame/message)", "json", False),
                                   ("msgpack (one frame/message)", "msgpack", False),
                                   ("msgpack, batched", "msgpack", True)):
        wall_rate, cpu_rate = trio.run(link_throughput, encoding, args.frames, batch)
        results[label] = cpu_rate
        print(f"  {label:26s} {wall_rate:10,.0f} {cpu_rate:18,.0f}")
    batched = results["msgpack, batched"]
    print(f"  aim >= 50,000 frames/s per core with batched msgpack: "
          f"{'met' if batched >= 50_000 else 'MISSED'} ({batched:,.0f})")
    figures = full_sync(args.routes, wire=True)
    total = figures.get("total", sum(figures.values()))
    print(f"full sync of {args.routes:,} station routes between two exchange sessions "
          f"(JSON on the wire): {total:.2f} s; aim <= 2 s: {'met' if total <= 2 else 'MISSED'}")
    del soft, hard
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
