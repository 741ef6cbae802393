"""An open WebSocket pair in memory (or over a Unix socket pair), for unit tests of links."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing
from websockets.client import ClientProtocol
from websockets.extensions.base import ClientExtensionFactory, ServerExtensionFactory
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from router.net.keepalive import Keepalive
from router.net.wslink import WsLink


def ws_pair(subprotocol: str = "ocpp2.0.1", *, lockstep: bool = False,
            keepalive: Keepalive | None = None, sockets: bool = False,
            client_extensions: Sequence[ClientExtensionFactory] | None = None,
            server_extensions: Sequence[ServerExtensionFactory] | None = None,
            ) -> tuple[WsLink, WsLink]:
    """An open WebSocket in memory: (the node's client link, the backend's server link).

    With ``lockstep``, a send completes only when the other side reads (a busy backend);
    ``keepalive`` makes the node's link ping a quiet backend; ``sockets`` joins the two
    over a Unix socket pair instead, so the links take their plain-socket paths (a send
    is written in place, a close closes the socket without a checkpoint). The extension
    factories are each end's, as in websockets (permessage-deflate: router/net/compression.py).
    """
    node_stream: trio.abc.Stream
    backend_stream: trio.abc.Stream
    if sockets:
        node_sock, backend_sock = trio.socket.socketpair()
        node_stream, backend_stream = trio.SocketStream(node_sock), trio.SocketStream(backend_sock)
    elif lockstep:
        node_stream, backend_stream = trio.testing.lockstep_stream_pair()
    else:
        node_stream, backend_stream = trio.testing.memory_stream_pair()
    client = ClientProtocol(parse_uri("ws://csms.test/ocpp/CS-1"),
                            subprotocols=[Subprotocol(subprotocol)], extensions=client_extensions)
    server = ServerProtocol(subprotocols=[Subprotocol(subprotocol)], extensions=server_extensions)
    client.send_request(client.connect())
    for chunk in client.data_to_send():
        server.receive_data(chunk)
    [request] = server.events_received()
    assert isinstance(request, Request)
    server.send_response(server.accept(request))
    for chunk in server.data_to_send():
        client.receive_data(chunk)
    client.events_received()
    assert client.state is State.OPEN and server.state is State.OPEN
    assert client.subprotocol == subprotocol
    return WsLink(node_stream, client, keepalive), WsLink(backend_stream, server)
