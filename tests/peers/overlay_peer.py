"""A fake overlay peer: a bare ``websockets`` client that speaks overlay frames to a node.

It dials ``<listener>/<own node id>`` with subprotocol ``ocpp2.1`` and
``X-OCPP-NetworkingMode: OverlayNetwork`` (plus ``X-OCPP-Encoding: msgpack`` when asked),
exactly as docs/protocol.md says a node does, then lets a test send any overlay
frame it likes (well-formed or forged) and records every frame the node sends it.

It implements no routing: it never answers anything by itself, so a CALL the node
should not have sent to it stays visible (and unanswered) in :meth:`FakePeer.received`.
Route announcements are built with ``topology.messages`` and signed with
:func:`claim_signature`, the way an honest node signs its claims.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from policies import SigningKey, format_timestamp
from router.wire import overlay_frames as overlay
from router.wire.overlay_frames import OverlayFrame
from topology.messages import ACTION, build_payload, claim_bytes, route_entry

NETWORKING_MODE = "X-OCPP-NetworkingMode"
ENCODING = "X-OCPP-Encoding"
OVERLAY_SUBPROTOCOL = "ocpp2.1"

_ids = itertools.count(1)


def claim_signature(
    key: SigningKey,
    origin: str,
    destination: str,
    priority: int,
    weight: int,
    sequence: int,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One signature entry by ``key`` over the claim bytes of a route (topology.messages)."""
    data = claim_bytes(origin, destination, priority, weight, sequence, timeout)
    return {
        "keyId": key.key_id,
        "value": base64.b64encode(key.sign(data)).decode("ascii"),
        "algorithm": key.algorithm,
        "timestamp": format_timestamp(time.time()),
    }


def signed_route(
    destination: str,
    path: Sequence[str],
    *,
    sequence: int,
    key: SigningKey | None,
    priority: int = 0,
    weight: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A ``routes[]`` entry signed by ``key`` as the origin ``path[0]`` (unsigned if None)."""
    signatures = ()
    if key is not None:
        signatures = (claim_signature(key, path[0], destination, priority, weight, sequence,
                                      timeout),)
    return route_entry(destination, path, priority, weight, sequence, timeout=timeout,
                       signatures=signatures)


class FakePeer:
    """One overlay link opened by a test; see the module docstring."""

    def __init__(self, ws: ClientConnection, node_id: str, encoding: str) -> None:
        self.ws = ws
        self.node_id = node_id
        self.encoding = encoding
        self.accepted_encoding = (ws.response.headers.get(ENCODING)
                                  if ws.response is not None else None)
        self._received: list[OverlayFrame] = []
        self.undecodable: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read(), name=f"fake-peer-{node_id}")

    # -- receiving -------------------------------------------------------------------

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                try:
                    if isinstance(message, str):
                        frames = [overlay.decode_json(message)]
                    else:
                        frames = overlay.decode_msgpack(message)
                except Exception as exc:  # recorded, the test decides
                    self.undecodable.append(f"{exc}: {message!r}"[:500])
                    frames = []
                async with self._changed:
                    self._received.extend(frames)
                    self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def received(self, predicate: Callable[[OverlayFrame], bool] | None = None
                 ) -> list[OverlayFrame]:
        """Every frame the node sent so far (matching ``predicate``), in order."""
        return [f for f in self._received if predicate is None or predicate(f)]

    def topology(self) -> list[OverlayFrame]:
        """The NotifyNetworkTopology SEND frames received so far."""
        return self.received(lambda f: f.type == overlay.SEND and f.action == ACTION)

    def not_topology(self) -> list[OverlayFrame]:
        """Everything else the node sent (calls, answers, control messages)."""
        return self.received(lambda f: not (f.type == overlay.SEND and f.action == ACTION))

    def announced(self) -> set[str]:
        """Destinations the node announced to this peer and did not withdraw since."""
        held: set[str] = set()
        for frame in self.topology():
            info = (frame.payload or {}).get("networkTopologyInformation", {})
            if info.get("kind") == "full" and info.get("part") == 1:
                held = set()
            held -= set(info.get("withdrawn", []))
            held |= {route["destinationId"] for route in info.get("routes", [])}
        return held

    async def wait_for(
        self, predicate: Callable[[OverlayFrame], bool], timeout: float = 10.0, what: str = ""
    ) -> OverlayFrame:
        """Wait for a received frame matching ``predicate`` (it may already be there)."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                while True:
                    for frame in self._received:
                        if predicate(frame):
                            return frame
                    if self.ws.close_code is not None and self._reader.done():
                        raise ConnectionError(
                            f"fake peer {self.node_id}: link closed ({self.ws.close_code}) "
                            f"while waiting for {what or predicate}")
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"fake peer {self.node_id}: no frame {what or predicate} within "
                               f"{timeout}s; got {[f.as_list() for f in self._received]}"
                               ) from None

    async def wait_answer(self, message_id: str, timeout: float = 10.0) -> OverlayFrame:
        """Wait for the CALLRESULT / CALLERROR with this message id."""
        return await self.wait_for(
            lambda f: f.id == message_id and f.type in (overlay.CALLRESULT, overlay.CALLERROR),
            timeout, f"answer to {message_id}")

    async def wait_full_sync(self, timeout: float = 10.0) -> list[OverlayFrame]:
        """Wait until the node's full sync to this peer is complete; return its parts."""
        def last_part(frame: OverlayFrame) -> bool:
            info = (frame.payload or {}).get("networkTopologyInformation", {})
            return (frame.type == overlay.SEND and frame.action == ACTION
                    and info.get("kind") == "full" and info.get("part") == info.get("parts"))
        await self.wait_for(last_part, timeout, "the node's full sync")
        return [f for f in self.topology()
                if f.payload["networkTopologyInformation"].get("kind") == "full"]

    # -- sending ---------------------------------------------------------------------

    async def send_frames(self, frames: Sequence[OverlayFrame | list[Any]]) -> None:
        """Send frames as they are (JSON: one message each; msgpack: one batch)."""
        built = [f if isinstance(f, OverlayFrame) else overlay.from_list(f) for f in frames]
        if self.encoding == "msgpack":
            await self.ws.send(overlay.encode_msgpack(built))
        else:
            for frame in built:
                await self.ws.send(overlay.encode_json(frame))

    async def send_raw(self, message: str | bytes) -> None:
        """One WebSocket message exactly as given."""
        await self.ws.send(message)

    async def notify(self, payload: Mapping[str, Any], dest: str, path: Sequence[str] = ()
                     ) -> str:
        """Send a NotifyNetworkTopology SEND to ``dest``; returns its message id."""
        mid = f"ntt-{next(_ids)}"
        await self.send_frames([[overlay.SEND, dest, list(path), mid, ACTION, dict(payload)]])
        return mid

    async def announce(
        self,
        dest: str,
        routes: Sequence[Mapping[str, Any]] = (),
        withdrawn: Sequence[str] = (),
        *,
        routing_node: str | None = None,
        kind: str = "update",
        part: int | None = None,
        parts: int | None = None,
    ) -> str:
        """Announce ``routes`` (entries from :func:`signed_route`) as ``routing_node``."""
        if kind == "full" and part is None:
            part = parts = 1
        payload = build_payload(routing_node or self.node_id, kind, [dict(r) for r in routes],
                                withdrawn, part=part, parts=parts)
        return await self.notify(payload, dest)

    async def call(self, dest: str, path: Sequence[str], action: str,
                   payload: Mapping[str, Any]) -> str:
        """Send an overlay CALL; returns its message id (answers: :meth:`wait_answer`)."""
        mid = f"call-{next(_ids)}"
        await self.send_frames([[overlay.CALL, dest, list(path), mid, action, dict(payload)]])
        return mid

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def open_fake_peer(
    base_url: str,
    node_id: str,
    *,
    encoding: str = "json",
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] = (OVERLAY_SUBPROTOCOL,),
    open_timeout: float = 10.0,
) -> AsyncIterator[FakePeer]:
    """Connect to a node's listener (``ws://host:port/ocpp``) as overlay peer ``node_id``."""
    extra = {NETWORKING_MODE: "OverlayNetwork"}
    if encoding == "msgpack":
        extra[ENCODING] = "msgpack"
    extra.update(headers or {})
    ws = await connect(f"{base_url.rstrip('/')}/{node_id}",
                       subprotocols=[Subprotocol(p) for p in subprotocols],
                       additional_headers=extra, open_timeout=open_timeout,
                       close_timeout=3.0, max_size=None, ping_interval=None)
    peer = FakePeer(ws, node_id, encoding)
    try:
        yield peer
    finally:
        await peer.close()
