"""RFC 7692 permessage-deflate on the node's links, with websockets' own extension.

OCPP 2.1 Part 4 §3.4 makes compression required for a CSMS and a Local Controller and
optional for a station, so the node accepts it from stations and offers it to backends
and peers; each hop negotiates on its own and falls back to no compression.

Memory decides the parameters. A deflate context kept for a link's life (context
takeover) costs tens of KiB per direction, for every connected station, idle or not.
The node asks for **no context takeover in both directions**, which RFC 7692 lets a
server impose and a client request: every message is compressed and inflated with a
fresh context that websockets drops when the message ends, so an idle link holds none.
Windows of 2^12 bytes and zlib ``memLevel`` 5 keep that per-message context near 40 KiB
for the moment it exists. OCPP messages are small and mostly self-similar inside one
message, so the loss against context takeover is modest; ``bench/forwarding.py``
measures both memory and the bytes saved.
"""

from __future__ import annotations

from websockets.extensions.base import ClientExtensionFactory, ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)

WINDOW_BITS = 12
MEM_LEVEL = 5


def server_extensions(enabled: bool) -> list[ServerExtensionFactory] | None:
    """What the node accepts from a client that offers permessage-deflate (None: nothing)."""
    if not enabled:
        return None
    return [ServerPerMessageDeflateFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        server_max_window_bits=WINDOW_BITS,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )]


def client_extensions(enabled: bool) -> list[ClientExtensionFactory] | None:
    """What the node offers when it dials a backend or a peer (None: no offer)."""
    if not enabled:
        return None
    return [ClientPerMessageDeflateFactory(
        server_no_context_takeover=True,
        client_no_context_takeover=True,
        client_max_window_bits=WINDOW_BITS,
        compress_settings={"memLevel": MEM_LEVEL},
    )]
