"""Sans-IO overlay topology: the route table and the route-exchange protocol.

It imports neither trio nor sockets: time comes in as a number, randomness as an
injected ``random.Random``, signing and verification as callables.
"""

from topology.exchange import (
    AnnouncementRejected,
    CachedVerifier,
    Event,
    ExchangeSession,
    PeerExpired,
    RoutesChanged,
    SessionStats,
)
from topology.feed import ChangeFeed
from topology.messages import (
    ACTION,
    JSONDict,
    RouteAnnouncement,
    SignFn,
    TopologyMessage,
    TopologyMessageError,
    VerifyFn,
    build_payload,
    check_signatures,
    claim_bytes,
    parse_payload,
    route_entry,
    sign_claim,
)
from topology.table import (
    LOCAL,
    Route,
    RouteTable,
    TableStats,
    Verdict,
    announced_alike,
    weighted_choice,
)

__all__ = [
    "ACTION",
    "LOCAL",
    "AnnouncementRejected",
    "CachedVerifier",
    "ChangeFeed",
    "Event",
    "ExchangeSession",
    "JSONDict",
    "PeerExpired",
    "Route",
    "RouteAnnouncement",
    "RouteTable",
    "RoutesChanged",
    "SessionStats",
    "SignFn",
    "TableStats",
    "TopologyMessage",
    "TopologyMessageError",
    "Verdict",
    "VerifyFn",
    "announced_alike",
    "build_payload",
    "check_signatures",
    "claim_bytes",
    "parse_payload",
    "route_entry",
    "sign_claim",
    "weighted_choice",
]
